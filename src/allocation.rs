//! Buffer creation that reports a device out of memory as
//! [`Error::OutOfMemory`].
//!
//! wgpu hands an allocation failure to the device's uncaptured-error
//! handler, whose default panics, and `DeviceExt::create_buffer_init`
//! panics on the failed buffer's mapping even inside an error scope. Every
//! buffer the crate creates therefore goes through here: created under an
//! out-of-memory error scope, and filled only once that scope is clear.

use crate::error::{Error, Result};

/// A buffer of `size` bytes (zeroed, as wgpu initialises every buffer).
pub(crate) fn create_buffer(
    device: &wgpu::Device,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    create_checked(device, label, size, usage, false)
}

/// A buffer holding `contents`, padded with zeros to whole 4-byte words
/// (wgpu's copy alignment).
pub(crate) fn create_buffer_with(
    device: &wgpu::Device,
    label: &'static str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let size = (contents.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
    if size == 0 {
        return create_buffer(device, label, 0, usage);
    }
    let buffer = create_checked(device, label, size, usage, true)?;
    {
        let mut mapped =
            buffer
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|err| Error::GpuValidation {
                    context: label,
                    message: err.to_string(),
                })?;
        mapped.slice(..contents.len()).copy_from_slice(contents);
        // The padding of a mapped-at-creation buffer is already zero.
    }
    buffer.unmap();
    Ok(buffer)
}

fn create_checked(
    device: &wgpu::Device,
    label: &'static str,
    size: u64,
    usage: wgpu::BufferUsages,
    mapped_at_creation: bool,
) -> Result<wgpu::Buffer> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage,
        mapped_at_creation,
    });
    // Native error scopes resolve at once: nothing waits for the GPU here.
    match pollster::block_on(scope.pop()) {
        None => Ok(buffer),
        Some(_) => Err(Error::OutOfMemory {
            what: label,
            bytes: size,
        }),
    }
}
