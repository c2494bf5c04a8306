//! What an update passes through before it leaves the site.

use tutela_protocol::tensor::DType;

use super::worker::{Failure, Shared};
use crate::config::Corruption;
use crate::failure::{FailureCode, SiteFailure};
use crate::weights::NamedTensors;

/// Transforms an update before it leaves the site: the seam where DP clipping and noise (and
/// secure-aggregation masking) plug in. It is the coordinator's trait too
/// (`tutela_protocol::update_filter`: one meaning of a filter on both sides); here the chain runs
/// on the update in memory ([`tutela_protocol::update_filter::filter_in_memory`]), in the order
/// the filters were added, on TRAIN updates only (initial weights are drawn from the job's seed
/// and carry no data).
pub use tutela_protocol::update_filter::UpdateFilter;

/// Runs the node's filters on an update, then `[testing] corrupt_update` if set (after every
/// honest filter, as a broken or malicious node would bypass them).
pub(super) fn filter_update(shared: &Shared, update: &mut NamedTensors) -> Result<(), Failure> {
    let declined =
        |why: String| Failure::Decline(SiteFailure::new(FailureCode::UpdateFiltered, why));
    if !shared.filters.is_empty() {
        let manifest = tutela_protocol::update_filter::manifest_of(update)
            .map_err(|e| declined(format!("the update's tensors: {e}")))?;
        let info = tutela_protocol::update_filter::UpdateInfo {
            site: &shared.site,
            weight: 1.0,
            manifest: &manifest,
        };
        tutela_protocol::update_filter::filter_in_memory(&shared.filters, &info, update)
            .map_err(|why| declined(format!("update filter: {why}")))?;
    }
    if let Some(c) = shared.testing.corrupt_update {
        corrupt_update(c, update);
    }
    Ok(())
}

/// `[testing] corrupt_update`: spoils an update like a malicious or broken node would (it may
/// change a shape, which no filter can, so it is not one).
fn corrupt_update(corruption: Corruption, update: &mut NamedTensors) {
    let Some((spec, bytes)) = update.first_mut() else {
        return;
    };
    match corruption {
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
        Corruption::Scale => scale_update(update, 1e6),
        Corruption::Scale100 => scale_update(update, 100.0),
        Corruption::SignFlip => scale_update(update, -10.0),
    }
}

/// Multiplies every F32 value of `update` by `factor`.
fn scale_update(update: &mut NamedTensors, factor: f32) {
    for (spec, bytes) in update.iter_mut() {
        if spec.dtype != DType::F32 {
            continue;
        }
        for word in bytes.chunks_exact_mut(4) {
            let mut w = [0u8; 4];
            w.copy_from_slice(word);
            word.copy_from_slice(&(f32::from_le_bytes(w) * factor).to_le_bytes());
        }
    }
}
