//! wgpu's error scopes around the crate's device calls, turned into typed
//! errors: at once on native backends, whose scopes answer synchronously;
//! in a browser, whose scopes answer with promises on its event loop, from
//! the next operation on the same [`Gpu`] (or the next readback, which
//! awaits that loop).

use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Runs `record` under an out-of-memory and a validation scope and reports
/// what they caught as [`Error::OutOfMemory`] (`what`, `bytes`) or
/// [`Error::GpuValidation`] (`what`), either as [`Error::DeviceLost`] when
/// the device went with it.
pub(crate) fn under_error_scopes<T>(
    gpu: &Gpu,
    what: &'static str,
    bytes: Option<u64>,
    record: impl FnOnce() -> T,
) -> Result<T> {
    gpu.check_alive()?;
    let device = gpu.device();
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = record();
    // Popped innermost first, as wgpu requires.
    let invalid = validation.pop();
    let exhausted = out_of_memory.pop();
    settle(gpu, what, bytes, invalid, exhausted)?;
    Ok(value)
}

/// What the scopes caught, first out-of-memory, then validation.
fn caught(
    what: &'static str,
    bytes: Option<u64>,
    invalid: Option<wgpu::Error>,
    exhausted: Option<wgpu::Error>,
) -> Option<Error> {
    if exhausted.is_some() {
        return Some(Error::OutOfMemory { what, bytes });
    }
    invalid.map(|err| Error::GpuValidation {
        context: what,
        message: err.to_string(),
    })
}

#[cfg(not(target_arch = "wasm32"))]
fn settle(
    gpu: &Gpu,
    what: &'static str,
    bytes: Option<u64>,
    invalid: impl Future<Output = Option<wgpu::Error>>,
    exhausted: impl Future<Output = Option<wgpu::Error>>,
) -> Result<()> {
    // Native scopes have answered by now: nothing waits for the GPU here.
    let found = caught(
        what,
        bytes,
        pollster::block_on(invalid),
        pollster::block_on(exhausted),
    );
    // A backend may lose the device over a failed call (wgpu's GL backend
    // can over an allocation), which no scope reports.
    match found {
        Some(error) => Err(gpu.unless_lost(error)),
        None => gpu.check_alive(),
    }
}

#[cfg(target_arch = "wasm32")]
fn settle(
    gpu: &Gpu,
    what: &'static str,
    bytes: Option<u64>,
    invalid: impl Future<Output = Option<wgpu::Error>> + 'static,
    exhausted: impl Future<Output = Option<wgpu::Error>> + 'static,
) -> Result<()> {
    // A browser answers once control returns to its event loop: the first
    // error is kept for the Gpu's next operation to report.
    let deferred = gpu.deferred_errors();
    wasm_bindgen_futures::spawn_local(async move {
        let invalid = invalid.await;
        let exhausted = exhausted.await;
        if let Some(error) = caught(what, bytes, invalid, exhausted) {
            let mut slot = deferred.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(error);
        }
    });
    Ok(())
}
