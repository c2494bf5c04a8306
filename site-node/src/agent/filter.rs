//! What an update passes through before it leaves the site.

use tutela_protocol::pb;
use tutela_protocol::tensor::DType;

use crate::config::Corruption;
use crate::weights::NamedTensors;

/// Transforms an update before it leaves the site: the seam where DP clipping and noise (and
/// secure-aggregation masking) plug in. Filters run in the order they were added, on TRAIN
/// updates only (initial weights are drawn from the job's seed and carry no data).
pub trait UpdateFilter: Send + Sync {
    fn name(&self) -> &str;
    /// Changes `update` in place, or says why the update may not leave the site.
    fn apply(&self, task: &pb::Task, update: &mut NamedTensors) -> Result<(), String>;
}

/// `[testing] corrupt_update`: spoils an update after every honest filter, like a malicious or
/// broken node would.
pub(super) struct CorruptUpdate(pub(super) Corruption);

impl UpdateFilter for CorruptUpdate {
    fn name(&self) -> &str {
        "testing.corrupt_update"
    }

    fn apply(&self, _task: &pb::Task, update: &mut NamedTensors) -> Result<(), String> {
        let Some((spec, bytes)) = update.first_mut() else {
            return Ok(());
        };
        match self.0 {
            Corruption::Nan => {
                if spec.dtype == DType::F32 && bytes.len() >= 4 {
                    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
                }
            }
            Corruption::WrongShape => {
                let numel = spec.numel().unwrap_or(0);
                spec.shape = vec![numel + 1];
                bytes.extend_from_slice(&vec![0u8; spec.dtype.size() as usize]);
            }
            Corruption::Scale => {
                for (spec, bytes) in update.iter_mut() {
                    if spec.dtype != DType::F32 {
                        continue;
                    }
                    for word in bytes.chunks_exact_mut(4) {
                        let mut w = [0u8; 4];
                        w.copy_from_slice(word);
                        word.copy_from_slice(&(f32::from_le_bytes(w) * 1e6).to_le_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}
