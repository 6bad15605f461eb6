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
    create_checked(gpu, label, size, usage, false)
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
    let buffer = create_checked(gpu, label, size, usage, true)?;
    {
        let mut mapped = buffer.slice(..).get_mapped_range_mut().map_err(|err| {
            gpu.unless_lost(Error::GpuValidation {
                context: label,
                message: err.to_string(),
            })
        })?;
        mapped.slice(..contents.len()).copy_from_slice(contents);
        // The padding of a mapped-at-creation buffer is already zero.
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
    gpu.check_alive()?;
    let device = gpu.device();
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation,
    });
    // Native error scopes resolve at once: nothing waits for the GPU here.
    // (Popped innermost first, as wgpu requires.)
    let invalid = pollster::block_on(validation.pop());
    let exhausted = pollster::block_on(out_of_memory.pop());
    if exhausted.is_some() {
        return Err(Error::OutOfMemory {
            what: label,
            bytes: Some(size),
        });
    }
    // A backend may lose the device over a failed allocation (wgpu's GL
    // backend can), which no error scope reports.
    gpu.check_alive()?;
    match invalid {
        None => Ok(buffer),
        Some(err) => Err(gpu.unless_lost(Error::GpuValidation {
            context: label,
            message: err.to_string(),
        })),
    }
}
