//! Checks every operation runs on its operands (device, storage type,
//! alignment, bounds, binding size, matching dimensions) and their strides
//! in the kernels' vec4 units.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::TensorStrides;
use crate::tensor::{DType, Strides, Tensor, check_binding_size};

/// Tensors are read as vec4, so strides and offsets are multiples of 4.
pub(crate) const VEC_WIDTH: usize = 4;

/// One `(what, left_name, left, right_name, right)` dimension check.
pub(crate) type DimPair = (&'static str, &'static str, usize, &'static str, usize);

/// `ShapeMismatch` for the first pair whose two sides differ.
pub(crate) fn require_equal(pairs: &[DimPair]) -> Result<()> {
    match pairs.iter().find(|pair| pair.2 != pair.4) {
        Some(&(what, left_name, left, right_name, right)) => Err(Error::ShapeMismatch {
            what,
            left_name,
            left,
            right_name,
            right,
        }),
        None => Ok(()),
    }
}

/// Dtype, alignment, bounds and binding-size checks for one operand.
pub(crate) fn check_operand(
    gpu: &Gpu,
    name: &'static str,
    tensor: &Tensor,
    storage: DType,
) -> Result<()> {
    check_unbound_operand(gpu, name, tensor, storage)?;
    check_binding_size(gpu, name, tensor.buffer().size())
}

/// [`check_operand`] for an output: also that it writes each element once.
pub(crate) fn check_output(
    gpu: &Gpu,
    name: &'static str,
    tensor: &Tensor,
    storage: DType,
) -> Result<()> {
    check_operand(gpu, name, tensor, storage)?;
    tensor.check_distinct(name)
}

/// [`check_operand`] for an operand bound in windows: its buffer may be
/// larger than one binding.
pub(crate) fn check_unbound_operand(
    gpu: &Gpu,
    name: &'static str,
    tensor: &Tensor,
    storage: DType,
) -> Result<()> {
    tensor.check_device(gpu, name)?;
    if tensor.dtype() != storage {
        return Err(Error::DTypeUnsupported {
            tensor: name,
            got: tensor.dtype(),
            needed: storage,
        });
    }
    let s = tensor.strides();
    for (what, value) in [
        ("batch stride", s.batch),
        ("seq stride", s.seq),
        ("head stride", s.head),
        ("offset", tensor.offset()),
    ] {
        if !value.is_multiple_of(VEC_WIDTH) {
            return Err(Error::Misaligned {
                tensor: name,
                what,
                value,
                multiple: VEC_WIDTH,
            });
        }
    }
    tensor.check_in_bounds(name)
}

pub(crate) fn vec4_strides(tensor: &Tensor) -> TensorStrides {
    vec4_view(tensor.strides(), tensor.offset())
}

/// Element strides and offset in the kernels' vec4 units (all multiples
/// of 4, checked by `check_operand`).
pub(crate) fn vec4_view(s: Strides, offset: usize) -> TensorStrides {
    TensorStrides {
        batch: (s.batch / VEC_WIDTH) as u32,
        seq: (s.seq / VEC_WIDTH) as u32,
        head: (s.head / VEC_WIDTH) as u32,
        offset: (offset / VEC_WIDTH) as u32,
    }
}
