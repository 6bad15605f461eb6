//! The arithmetic of standard attention, the baseline of FlashAttention's
//! rule: its `q . k` is an f32 sum, so a dot product that f32 cannot hold
//! comes out as f32 sums it, while the exact reference keeps it.

use super::{attention, attention_backward, attention_backward_f32, attention_rows_in_precision};
use crate::config::{AttentionConfig, AttentionShape};
use crate::tensor::DType;

/// Two keys: key 0's dot with the all-ones query is `2^24 + 1 - 2^24`,
/// exactly 1 but 0 in sequential f32 (`2^24 + 1` rounds to `2^24`); key
/// 1's is exactly 0. Values: all ones for key 0, zeros for key 1.
fn cancelling_dot() -> (AttentionShape, [Vec<f32>; 3], AttentionConfig) {
    let shape = AttentionShape {
        seq_q: 1,
        seq_kv: 2,
        ..AttentionShape::self_attention(1, 1, 1, 8)
    };
    let big = 16_777_216.0f32;
    let q = vec![1.0; 8];
    let mut k = vec![0.0; 16];
    k[..3].copy_from_slice(&[big, 1.0, -big]);
    let mut v = vec![0.0; 16];
    v[..8].fill(1.0);
    (shape, [q, k, v], AttentionConfig::new().scale(1.0))
}

#[test]
fn standard_f32_attention_sums_scores_in_f32() {
    let (shape, [q, k, v], config) = cancelling_dot();
    let exact = attention(&shape, &q, &k, &v, &config).unwrap();
    // Scores (1, 0): key 0 weighs e / (1 + e).
    let e = 1f64.exp();
    assert!(
        (exact.out[0] - e / (1.0 + e)).abs() < 1e-12,
        "{}",
        exact.out[0]
    );
    assert!(
        (exact.lse[0] - (1.0 + e).ln()).abs() < 1e-12,
        "{}",
        exact.lse[0]
    );
    // Scores (0, 0) in f32: both keys weigh 1/2.
    let standard =
        attention_rows_in_precision(&shape, &q, &k, &v, &config, DType::F32, |_, _, _| true)
            .unwrap();
    assert!(standard.out.iter().all(|&o| o == 0.5), "{:?}", standard.out);
    assert_eq!(standard.lse[0], f64::from(2f32.ln()));
}

#[test]
fn standard_f32_backward_sums_scores_in_f32() {
    let (shape, [q, k, v], config) = cancelling_dot();
    let d_out = [1.0; 8];
    let inputs = [&q[..], &k[..], &v[..], &d_out[..]];
    let exact = attention_backward(&shape, inputs, &config, None).unwrap();
    let e = 1f64.exp();
    assert!(
        (exact.out[0] - e / (1.0 + e)).abs() < 1e-12,
        "{}",
        exact.out[0]
    );
    // dV = P^T dO with dO all ones: each key's weight, in every element.
    let (key0, key1) = exact.dv.split_at(8);
    assert!(
        key0.iter().all(|&g| (g - e / (1.0 + e)).abs() < 1e-12),
        "{key0:?}"
    );
    assert!(
        key1.iter().all(|&g| (g - 1.0 / (1.0 + e)).abs() < 1e-12),
        "{key1:?}"
    );
    let standard = attention_backward_f32(&shape, inputs, &config, None).unwrap();
    assert!(standard.out.iter().all(|&o| o == 0.5), "{:?}", standard.out);
    // The gradients follow the f32 scores: both keys weigh 1/2.
    assert!(
        standard.dv.iter().all(|&g| (g - 0.5).abs() < 1e-7),
        "{:?}",
        standard.dv
    );
}

/// Host masks are checked as device masks are: one value per element of
/// their dims, dims that broadcast to the call.
#[test]
fn host_masks_that_do_not_fit_are_typed_errors() {
    use super::{HostMask, attention_masked};
    use crate::error::Error;
    let shape = AttentionShape::self_attention(1, 2, 1, 8);
    let x = vec![0.5f32; 16];
    let config = AttentionConfig::new();
    let too_small = HostMask::Bool {
        dims: [1, 1, 1, 1],
        values: &[true],
    };
    let err = attention_masked(&shape, &x, &x, &x, &config, &too_small).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MaskShape {
                dims: [1, 1, 1, 1],
                shape: [1, 1, 2, 2]
            }
        ),
        "{err}"
    );
    let short = HostMask::Bias {
        dims: [1, 1, 2, 2],
        values: &[0.0; 3],
    };
    let err = attention_masked(&shape, &x, &x, &x, &config, &short).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataLength {
                expected: 4,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
    let inputs = [&x[..], &x[..], &x[..], &x[..]];
    let err = attention_backward(&shape, inputs, &config, Some(&too_small)).unwrap_err();
    assert!(matches!(err, Error::MaskShape { .. }), "{err}");
}

/// The reference RoPE checks its lengths and positions.
#[test]
fn rope_input_that_does_not_fit_is_a_typed_error() {
    use crate::error::Error;
    use crate::{Rope, RopeStyle, TensorShape};
    let rope = Rope::new(RopeStyle::HalfSplit);
    let shape = TensorShape::new(2, 3, 1, 8);
    let data = vec![0.5f32; shape.elements()];
    let err = super::rope(&rope, shape, &data, &[0]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataLength {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = super::rope(&rope, shape, &data[1..], &[0, 0]).unwrap_err();
    assert!(matches!(err, Error::DataLength { .. }), "{err}");
    let err = super::rope(&rope, shape, &data, &[0, u64::MAX]).unwrap_err();
    assert!(matches!(err, Error::ShapeOverflow { .. }), "{err}");
    let empty = TensorShape::new(2, 0, 1, 8);
    let err = super::rope(&rope, empty, &[], &[0, 0]).unwrap_err();
    assert!(matches!(err, Error::ZeroDimension { .. }), "{err}");
    assert!(super::rope(&rope, shape, &data, &[0, 7]).is_ok());
}
