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
    tensor.check_in_bounds(name)?;
    check_index_range(name, tensor, VEC_WIDTH as u64)
}

/// [`Error::OutputAliasesInput`] for the first buffer in `writes` that
/// another operand of the call also uses: one in `reads`, or an earlier
/// one in `writes`. What a call reads may share buffers (K and V as views
/// of one QKV projection); what it writes may not, since wgpu accepts two
/// writable bindings of one buffer and the kernels would race on them, and
/// refuses a buffer bound both writable and read-only in one dispatch.
pub(crate) fn check_own_buffers(
    writes: &[(&'static str, &wgpu::Buffer)],
    reads: &[(&'static str, &wgpu::Buffer)],
) -> Result<()> {
    for (i, &(tensor, buffer)) in writes.iter().enumerate() {
        let others = reads.iter().chain(&writes[..i]);
        if let Some(&(input, _)) = others.into_iter().find(|(_, other)| *other == buffer) {
            return Err(Error::OutputAliasesInput { tensor, input });
        }
    }
    Ok(())
}

/// The kernels index a bound buffer with u32 offsets in units of `unit`
/// elements (vec4s of the view's type for attention operands, elements
/// for RoPE): a view past `unit * 2^32` elements would wrap.
pub(crate) fn check_index_range(name: &'static str, tensor: &Tensor, unit: u64) -> Result<()> {
    check_extent_indexable(name, tensor.extent() as u64, unit)
}

/// [`check_index_range`] of a view reaching element `extent` (one past
/// its last).
fn check_extent_indexable(name: &'static str, extent: u64, unit: u64) -> Result<()> {
    let max = unit.saturating_mul(1 << 32);
    if extent > max {
        return Err(Error::IndexRange {
            tensor: name,
            extent,
            max,
            unit,
        });
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Views up to `unit * 2^32` elements are addressed; one element more
    /// would wrap the kernels' u32 index (a buffer that large exists only
    /// where a binding may pass 16-64 GiB, so the GPU tests cannot reach it).
    #[test]
    fn views_past_32_bit_indices_are_refused() {
        for unit in [1, 4] {
            let max = unit << 32;
            check_extent_indexable("t", max, unit).unwrap();
            let err = check_extent_indexable("t", max + 1, unit).unwrap_err();
            assert!(
                matches!(err, Error::IndexRange { tensor: "t", extent, max: m, unit: u }
                    if extent == max + 1 && m == max && u == unit),
                "{err}"
            );
        }
    }
}
