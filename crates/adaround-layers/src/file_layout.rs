//! How weight files of other frameworks name and lay out a layer's tensors: what each layer
//! kind declares through [`AdaRoundLayer::file_names`](crate::AdaRoundLayer::file_names),
//! and what the `adaround` crate's weight import reads.

use serde::{Deserialize, Serialize};

/// How a weight file names and lays out its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Burn's names and layouts (a file saved from this model).
    Burn,
    /// PyTorch's `state_dict` names and layouts.
    PyTorch,
    /// Keras' weight names and layouts (channels-last kernels).
    Keras,
}

/// How a file tensor becomes a tensor in Burn's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// Same layout.
    Identity,
    /// `[a, b]` to `[b, a]`.
    Transpose,
    /// Keras `[kh, kw, c_in, c_out]` to `[c_out, c_in, kh, kw]`.
    KerasConv,
    /// Keras depthwise `[kh, kw, c, m]` to `[c * m, 1, kh, kw]`.
    KerasDepthwise,
}

impl Conversion {
    /// For a file tensor of shape `found`: the axis permutation (axis `perm[i]` of the file's
    /// tensor becomes axis `i` before the final reshape) and the shape in Burn's layout;
    /// `None` when `found` has the wrong rank for this conversion.
    pub fn plan(self, found: &[usize]) -> Option<(Vec<usize>, Vec<usize>)> {
        match (self, found) {
            (Self::Identity, _) => Some(((0..found.len()).collect(), found.to_vec())),
            (Self::Transpose, [a, b]) => Some((vec![1, 0], vec![*b, *a])),
            (Self::KerasConv, [kh, kw, ci, co]) => {
                Some((vec![3, 2, 0, 1], vec![*co, *ci, *kh, *kw]))
            }
            (Self::KerasDepthwise, [kh, kw, c, m]) => {
                Some((vec![2, 3, 0, 1], vec![c * m, 1, *kh, *kw]))
            }
            _ => None,
        }
    }

    /// What the file should hold for a tensor of shape `expected` in Burn's layout, as a
    /// clause for error messages (empty for the identity).
    pub fn in_file(self, expected: &[usize]) -> String {
        match (self, expected) {
            (Self::Transpose, [a, b]) => format!(", i.e. {:?} in the file", [b, a]),
            (Self::KerasConv, [co, ci, kh, kw]) => {
                format!(", i.e. {:?} in the file", [kh, kw, ci, co])
            }
            (Self::KerasDepthwise, [cm, _, kh, kw]) => {
                format!(", i.e. [{kh}, {kw}, c, m] with c * m = {cm} in the file")
            }
            _ => String::new(),
        }
    }
}

/// `values` of row-major `shape`, with axis `perm[i]` of the input as axis `i` of the output.
pub fn permute<T: Copy>(values: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    if perm.iter().enumerate().all(|(i, p)| i == *p) {
        return values.to_vec();
    }
    let rank = shape.len();
    let mut strides = vec![1; rank];
    for axis in (0..rank.saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|p| shape[*p]).collect();
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0; rank];
    for _ in 0..values.len() {
        let offset: usize = (0..rank).map(|i| index[i] * strides[perm[i]]).sum();
        out.push(values[offset]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < out_shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_permute_like_a_transpose_of_axes() {
        // [2, 3] transposed.
        let v = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            permute(&v, &[2, 3], &[1, 0]),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        // Keras [kh=1, kw=2, c_in=2, c_out=3] to [c_out, c_in, kh, kw]: element
        // (0, w, i, o) sits at w*6 + i*3 + o and must land at o*4 + i*2 + w.
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let (perm, shape) = Conversion::KerasConv.plan(&[1, 2, 2, 3]).unwrap();
        assert_eq!(shape, vec![3, 2, 1, 2]);
        let out = permute(&v, &[1, 2, 2, 3], &perm);
        for w in 0..2 {
            for i in 0..2 {
                for o in 0..3 {
                    assert_eq!(out[o * 4 + i * 2 + w], (w * 6 + i * 3 + o) as f32);
                }
            }
        }
        assert_eq!(Conversion::Transpose.plan(&[2, 3, 4]), None);
    }
}
