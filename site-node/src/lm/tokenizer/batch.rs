//! Padded batches of token ids with attention masks, the input of a decoder language model.

use super::TokenizerError;

/// Sequences of token ids padded on the right to one length, row-major, as `i64` (libtorch's
/// index type): `input_ids[r * columns + c]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    /// 1 where `input_ids` holds a token of the sequence, 0 over padding.
    pub attention_mask: Vec<i64>,
    pub rows: usize,
    pub columns: usize,
    /// Each row's length before padding (after any cut to `max_len`).
    pub lengths: Vec<usize>,
}

impl Batch {
    /// `input_ids` and `attention_mask` as `[rows, columns]` int64 tensors on `device`.
    pub fn tensors(&self, device: tch::Device) -> (tch::Tensor, tch::Tensor) {
        let shape = [self.rows as i64, self.columns as i64];
        let ids = tch::Tensor::from_slice(&self.input_ids)
            .view(shape)
            .to_device(device);
        let mask = tch::Tensor::from_slice(&self.attention_mask)
            .view(shape)
            .to_device(device);
        (ids, mask)
    }
}

/// Pads `sequences` with `pad` on the right to the longest of them, after cutting each to its
/// first `max_len` ids when given. Padding on the right keeps every sequence's positions starting
/// at 0, as causal training wants; the mask tells the model which positions are padding.
pub fn pad(
    sequences: &[Vec<u32>],
    pad: u32,
    max_len: Option<usize>,
) -> Result<Batch, TokenizerError> {
    if max_len == Some(0) {
        return Err(TokenizerError::Options(
            "max_len must be at least 1".to_string(),
        ));
    }
    let lengths: Vec<usize> = sequences
        .iter()
        .map(|s| max_len.map_or(s.len(), |m| s.len().min(m)))
        .collect();
    let columns = lengths.iter().copied().max().unwrap_or(0);
    let rows = sequences.len();
    let mut input_ids = vec![i64::from(pad); rows * columns];
    let mut attention_mask = vec![0i64; rows * columns];
    for (r, (sequence, &len)) in sequences.iter().zip(&lengths).enumerate() {
        let row = r * columns;
        for (c, &id) in sequence[..len].iter().enumerate() {
            input_ids[row + c] = i64::from(id);
            attention_mask[row + c] = 1;
        }
    }
    Ok(Batch {
        input_ids,
        attention_mask,
        rows,
        columns,
        lengths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_on_the_right_and_masks_the_padding() {
        let b = pad(&[vec![5, 6, 7], vec![8], vec![]], 2, None).unwrap();
        assert_eq!((b.rows, b.columns), (3, 3));
        assert_eq!(b.input_ids, vec![5, 6, 7, 8, 2, 2, 2, 2, 2]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(b.lengths, vec![3, 1, 0]);
    }

    #[test]
    fn cuts_to_max_len() {
        let b = pad(&[vec![5, 6, 7], vec![8]], 0, Some(2)).unwrap();
        assert_eq!((b.rows, b.columns), (2, 2));
        assert_eq!(b.input_ids, vec![5, 6, 8, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 0]);
        assert!(pad(&[vec![1]], 0, Some(0)).is_err());
        let empty = pad(&[], 0, None).unwrap();
        assert_eq!((empty.rows, empty.columns), (0, 0));
    }
}
