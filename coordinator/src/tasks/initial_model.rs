//! The initial model's values, checked as they stream in (see [`FiniteModel`]).

use tutela_protocol::stream::SinkError;
use tutela_protocol::tensor::{Manifest, TensorSpec};

use crate::aggregate::filter::{ElementCursor, FilterPass, FiniteValues, ValuesAt};

/// An initial model's values as they arrive, checked finite: a NaN or an infinity in the model
/// every round starts from would poison each site's training and every aggregate after it.
pub(super) struct FiniteModel {
    tensors: Vec<TensorSpec>,
    lens: Vec<usize>,
    cursor: ElementCursor,
    scratch: Vec<f32>,
}

impl FiniteModel {
    /// The check of a model with `manifest`'s tensors, which must be F32 (the aggregation's
    /// global model is, and every round starts from this one).
    pub(super) fn new(manifest: &Manifest) -> Result<FiniteModel, SinkError> {
        let lens = crate::aggregate::f32_tensor_lens(manifest)
            .map_err(|e| SinkError::Rejected(format!("the initial model: {e}")))?;
        Ok(FiniteModel {
            tensors: manifest.tensors().to_vec(),
            lens,
            cursor: ElementCursor::default(),
            scratch: Vec::new(),
        })
    }

    pub(super) fn write(
        &mut self,
        index: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SinkError> {
        let (tensors, scratch) = (&self.tensors, &mut self.scratch);
        self.cursor.feed(
            (tensors, &self.lens),
            (index, offset, data),
            |t, first, bytes| {
                scratch.clear();
                scratch.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                );
                let at = ValuesAt {
                    tensor_index: t,
                    tensor: &tensors[t],
                    first_element: first as u64,
                };
                FiniteValues
                    .values(&at, scratch)
                    .map_err(|r| SinkError::Rejected(format!("the initial model: {}", r.0)))
            },
        )
    }
}
