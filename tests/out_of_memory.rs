//! A device out of memory gives `Error::OutOfMemory` with the buffer's size,
//! never wgpu's default error handler (which panics), and the device keeps
//! working afterwards.
//!
//! Lavapipe allocates device memory with the host's allocator, so capping
//! this process's address space (`RLIMIT_AS`) runs it out of memory on
//! demand. The cap holds for the whole process: this file is a test binary
//! of its own, with one test, and nothing else allocates while it holds.
//! On llvmpipe's GL the same cap makes an allocation lose the device (wgpu's
//! GL backend), which must be a typed error too, never a buffer without
//! storage.

mod common;

use common::{Inputs, assert_close, attention_shape, gpu, run_and_compare};
use wgpu_flash_attn::{
    AttentionConfig, DType, Error, Gpu, KvCache, KvCacheConfig, KvLayout, Tensor, TensorShape,
};

/// How this adapter's memory can be run out on demand.
enum Cap {
    /// Lavapipe: allocations fail cleanly, the device survives.
    Lavapipe,
    /// llvmpipe through wgpu's GL backend, which checks no allocation but
    /// fails to map a buffer that got no storage, and loses the device.
    LlvmpipeGl,
}

/// How to cap this adapter, or why it cannot be.
fn cap_of(gpu: &Gpu) -> Result<Cap, String> {
    let adapter = &gpu.info().adapter;
    let host_memory = adapter.device_type == wgpu::DeviceType::Cpu && cfg!(target_os = "linux");
    match adapter.backend {
        wgpu::Backend::Vulkan if host_memory => Ok(Cap::Lavapipe),
        wgpu::Backend::Gl if host_memory => Ok(Cap::LlvmpipeGl),
        // A hardware GPU's memory is not the process's.
        _ => Err(format!(
            "its device memory is not this process's to cap (needs a CPU adapter on Linux); \
             this is {} on {:?}",
            adapter.name, adapter.backend
        )),
    }
}

/// This process's address space in bytes.
fn address_space() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmSize:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    kib * 1024
}

/// Runs `work` with the address space capped at `bytes`, then lifts the cap.
#[cfg(unix)]
fn with_address_space_cap<T>(bytes: u64, work: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls get a valid rlimit; neither touches memory but it.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
        let capped = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &capped), 0);
    }
    let result = work();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0) };
    result
}

#[cfg(not(unix))]
fn with_address_space_cap<T>(_bytes: u64, _work: impl FnOnce() -> T) -> T {
    unreachable!("cap_of refuses every adapter off Linux")
}

/// Whether this driver refuses a buffer that a capped address space cannot
/// hold, as Mesa 22.3's lavapipe and llvmpipe do; or why not. Later Mesas
/// (25.0 and 26.1 seen) create it without taking the memory and fault at
/// its first use (a segmentation fault inside lavapipe): nothing an
/// application can catch, so nothing to test this way. The buffer is
/// dropped unused, which is safe on both.
fn reports_a_capped_allocation(gpu: &Gpu, shape: TensorShape, margin: u64) -> Result<(), String> {
    let before = address_space();
    let created = with_address_space_cap(before + margin, || {
        let created = Tensor::zeros(gpu, shape, DType::F32);
        (created, address_space())
    });
    match created {
        (Err(Error::OutOfMemory { .. }), _) => Ok(()),
        (Err(other), _) => panic!("Tensor::zeros past a capped address space: {other}"),
        (Ok(_unused), after) => Err(format!(
            "{} created a {} MiB tensor past the cap while the address space grew by {} MiB: \
             it takes device memory at first use, where it faults rather than report",
            gpu.info().adapter.driver_info,
            (4 * shape.elements()) >> 20,
            after.saturating_sub(before) >> 20,
        )),
    }
}

fn assert_out_of_memory<T>(result: Result<T, Error>, bytes: u64, what: &str) {
    match result {
        Err(Error::OutOfMemory { bytes: got, .. }) => {
            assert_eq!(got, Some(bytes), "{what}: the error's size");
        }
        Err(other) => panic!("{what}: expected OutOfMemory, got {other}"),
        Ok(_) => panic!("{what}: expected OutOfMemory, the allocation succeeded"),
    }
}

/// What wgpu's GL backend reports for an allocation past memory: the device
/// it lost over the failed mapping (or, should it learn to check, out of
/// memory).
fn assert_refused_on_gl<T>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::DeviceLost { .. } | Error::OutOfMemory { .. }) => {}
        Err(other) => panic!("{what} past memory on GL: {other}"),
        Ok(_) => panic!("{what} past memory on GL succeeded"),
    }
}

/// The device's calls still match the reference.
fn still_works(gpu: &Gpu, what: &str) {
    // GQA, causal, ragged lengths: the kernels' ordinary path.
    let shape = attention_shape(1, 37, 45, (2, 1), 64);
    let inputs = Inputs::draw(&shape, 20261204, 1.0);
    assert_close(
        run_and_compare(gpu, &shape, &inputs, &AttentionConfig::new().causal(true)),
        what,
    );
}

#[test]
fn allocations_past_the_devices_memory() {
    let Some(gpu) = gpu() else { return };
    let cap = match cap_of(gpu) {
        Ok(cap) => cap,
        Err(why) => {
            eprintln!("SKIPPED: cannot run the device out of memory here: {why}");
            return;
        }
    };
    // Compiles and runs a kernel first, so that the cap below meets only
    // the allocations under test.
    still_works(gpu, "before the cap");

    // Each request is as large as one storage binding may be, up to 256
    // MiB (the largest block wgpu's allocator shares between buffers): more
    // than any block has left over from the small buffers above, so each
    // needs new memory from lavapipe, which the cap refuses. Host data is
    // made before the cap (a host allocation past it would abort the
    // process).
    let limit = gpu
        .info()
        .limits
        .max_storage_buffer_binding_size
        .min(256 << 20);
    let vector = 128usize;
    let tokens = (limit / (4 * vector as u64)) as usize;
    let shape = TensorShape::new(1, tokens, 1, vector);
    let bytes = 4 * shape.elements() as u64;
    let host = vec![0.25f32; shape.elements()];
    let resident = Tensor::from_f32(gpu, shape, &host).unwrap();
    let cache_config = KvCacheConfig::new(1, 1, vector, KvLayout::Contiguous { capacity: tokens });

    let margin = 8 << 20;
    if let Cap::LlvmpipeGl = cap {
        // A typed error, never a panic or a buffer without storage (which
        // GL reads back as zeros whatever a kernel wrote). wgpu's GL
        // backend loses the device over each, so each runs on a device of
        // its own (the test's first), and the rest is Vulkan's.
        let fresh = || Gpu::new().expect("another device on GL");
        assert_refused_on_gl(
            with_address_space_cap(address_space() + margin, || {
                Tensor::zeros(gpu, shape, DType::F32)
            }),
            "Tensor::zeros",
        );
        let second = fresh();
        assert_refused_on_gl(
            with_address_space_cap(address_space() + margin, || {
                Tensor::from_f32(&second, shape, &host)
            }),
            "Tensor::from_f32",
        );
        let third = fresh();
        assert_refused_on_gl(
            with_address_space_cap(address_space() + margin, || {
                KvCache::new(&third, cache_config)
            }),
            "KvCache::new",
        );
        eprintln!(
            "SKIPPED: the rest (wgpu's GL backend loses the device over a failed allocation, as it does)"
        );
        return;
    }
    if let Err(why) = reports_a_capped_allocation(gpu, shape, margin) {
        eprintln!("SKIPPED: an address-space cap cannot run this adapter out of memory: {why}");
        return;
    }
    with_address_space_cap(address_space() + margin, || {
        assert_out_of_memory(
            Tensor::zeros(gpu, shape, DType::F32),
            bytes,
            "Tensor::zeros",
        );
        assert_out_of_memory(
            Tensor::from_f32(gpu, shape, &host),
            bytes,
            "Tensor::from_f32",
        );
        assert_out_of_memory(resident.to_f32_vec(gpu), bytes, "downloading a tensor");
        assert_out_of_memory(KvCache::new(gpu, cache_config), bytes, "KvCache::new");
    });

    // Without the cap the same requests succeed: the errors above were the
    // cap's, and the device is intact.
    assert_eq!(
        Tensor::zeros(gpu, shape, DType::F32).unwrap().shape(),
        shape
    );
    let back = resident.to_f32_vec(gpu).unwrap();
    assert!(back.iter().all(|&x| x == 0.25), "downloaded values");
    assert_eq!(KvCache::new(gpu, cache_config).unwrap().bytes(), 2 * bytes);
    still_works(gpu, "after running out of memory");
}
