//! Buffer creation that reports a device out of memory as
//! [`Error::OutOfMemory`] and a lost device as [`Error::DeviceLost`].
//!
//! wgpu hands an allocation failure to the device's uncaptured-error
//! handler, whose default panics, and `DeviceExt::create_buffer_init`
//! panics on the failed buffer's mapping even inside an error scope; on a
//! lost device, creation "succeeds" with an invalid buffer that fails only
//! when used. Every buffer the crate creates therefore goes through here:
//! created under out-of-memory and validation error scopes, and filled
//! only once they are clear.

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// A buffer of `size` bytes (zeroed, as wgpu initialises every buffer).
pub(crate) fn create_buffer(
    gpu: &Gpu,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    if needs_a_mapping_to_be_checked(gpu, size, usage) {
        return create_mapped(gpu, label, size, usage, |_zeroed| {});
    }
    create_checked(gpu, label, size, usage, false)
}

/// Whether a zeroed buffer must be mapped at creation for a failed
/// allocation to show. wgpu's GL backend checks no allocation: a buffer
/// that got no storage is created without error and reads back as zeros
/// whatever a kernel writes to it. Mapped at creation, its zeros are staged
/// through an equally large mapping, which does fail when memory is out
/// (wgpu then loses the device, a typed error from `create_checked`). A
/// readback buffer needs no such help (its own mapping is the check), and
/// wgpu maps only whole 4-byte words at creation.
fn needs_a_mapping_to_be_checked(gpu: &Gpu, size: u64, usage: wgpu::BufferUsages) -> bool {
    gpu.info().adapter.backend == wgpu::Backend::Gl
        && size > 0
        && size.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
        && !usage.contains(wgpu::BufferUsages::MAP_READ)
}

/// A buffer holding `contents`, padded with zeros to whole 4-byte words
/// (wgpu's copy alignment).
pub(crate) fn create_buffer_with(
    gpu: &Gpu,
    label: &'static str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let size = (contents.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
    if size == 0 {
        return create_buffer(gpu, label, 0, usage);
    }
    // The padding of a mapped-at-creation buffer is already zero.
    create_mapped(gpu, label, size, usage, |mapped| {
        mapped.slice(..contents.len()).copy_from_slice(contents)
    })
}

/// A buffer of `size` (> 0, whole words) bytes, mapped at creation, its
/// zeroed mapping handed to `fill`, then unmapped.
fn create_mapped(
    gpu: &Gpu,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
    fill: impl FnOnce(&mut wgpu::BufferViewMut),
) -> Result<wgpu::Buffer> {
    let buffer = create_checked(gpu, label, size, usage, true)?;
    {
        let mut mapped = buffer.slice(..).get_mapped_range_mut().map_err(|err| {
            gpu.unless_lost(Error::GpuValidation {
                context: label,
                message: err.to_string(),
            })
        })?;
        fill(&mut mapped);
    }
    buffer.unmap();
    Ok(buffer)
}

fn create_checked(
    gpu: &Gpu,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
    mapped_at_creation: bool,
) -> Result<wgpu::Buffer> {
    crate::error_scopes::under_error_scopes(gpu, label, Some(size), || {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation,
        })
    })
}
