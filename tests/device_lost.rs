//! On a lost device (a driver reset, a watchdog timeout, the device
//! destroyed) every operation returns `Error::DeviceLost`: never a panic
//! from wgpu's default error handler, never a tensor that only fails when
//! used.

mod common;

use common::{Inputs, assert_close, attention_shape, run_and_compare};
use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, DType, Error, Gpu, KvCache, KvCacheConfig, KvLayout, Lse,
    Tensor, TensorShape,
};

fn assert_lost<T>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::DeviceLost { reason }) => {
            assert!(reason.contains("Destroyed"), "{what}: reason {reason:?}");
        }
        Err(other) => panic!("{what}: expected DeviceLost, got {other}"),
        Ok(_) => panic!("{what}: expected DeviceLost, the call succeeded"),
    }
}

#[test]
fn every_operation_on_a_destroyed_device() {
    // (Honours the opt-out; the device under test is this test's own.)
    if common::gpu().is_none() {
        return;
    }
    // A device of its own: destroying it leaves the other tests' alone.
    let gpu = Gpu::new().expect("the test adapter");
    let shape = attention_shape(1, 21, 33, (2, 1), 32);
    let inputs = Inputs::draw(&shape, 20261204, 1.0);
    assert_close(
        run_and_compare(&gpu, &shape, &inputs, &AttentionConfig::new().causal(true)),
        "before the device is lost",
    );
    let q = Tensor::from_f32(&gpu, shape.q_shape(), &inputs.q).unwrap();
    let k = Tensor::from_f32(&gpu, shape.k_shape(), &inputs.k).unwrap();
    let v = Tensor::from_f32(&gpu, shape.v_shape(), &inputs.v).unwrap();
    let out = Tensor::zeros(&gpu, shape.o_shape(), DType::F32).unwrap();
    let small = TensorShape::new(1, 4, 1, 8);

    gpu.device().destroy();
    // wgpu reports a destroyed device lost at its next poll (a loss the
    // driver reports, at the failing call itself).
    assert_lost(gpu.wait(), "waiting for the device");

    assert_lost(Tensor::zeros(&gpu, small, DType::F32), "Tensor::zeros");
    assert_lost(
        Tensor::from_f32(&gpu, small, &[0.5; 32]),
        "Tensor::from_f32",
    );
    assert_lost(out.to_f32_vec(&gpu), "downloading a tensor");
    assert_lost(Lse::new(&gpu, 1, 2, 21), "Lse::new");
    let cache = KvCacheConfig::new(1, 1, 32, KvLayout::Contiguous { capacity: 64 });
    assert_lost(KvCache::new(&gpu, cache), "KvCache::new");
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    assert_lost(
        gpu.run(|encoder| gpu.forward(encoder, &args, AttentionConfig::new())),
        "a forward call",
    );
    assert_lost(
        gpu.attention_host(
            &shape,
            &inputs.q,
            &inputs.k,
            &inputs.v,
            &AttentionConfig::new(),
        ),
        "attention on host slices",
    );
    assert_lost(gpu.wait(), "waiting again");
}

/// A caller's own device (`Gpu::from_device`) reports the loss too when
/// the caller's lost callback passes it on through the notifier.
#[test]
fn a_callers_device_whose_callback_passes_the_loss_on() {
    if common::gpu().is_none() {
        return;
    }
    let adapter = pollster::block_on(wgpu_flash_attn::AdapterOptions::from_env().select())
        .expect("the test adapter");
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("the caller's device"),
        required_features: adapter.features() & wgpu_flash_attn::WANTED_FEATURES,
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .expect("a device of the test's own");
    let gpu = Gpu::from_device(device.clone(), queue, adapter.get_info());
    let (said, heard) = std::sync::mpsc::channel();
    let notify = gpu.device_lost_notifier();
    device.set_device_lost_callback(move |reason, message| {
        // The caller's own handling, then the crate's.
        let _ = said.send(format!("{reason:?}"));
        notify(reason, message);
    });
    let shape = attention_shape(1, 9, 17, (2, 2), 16);
    let inputs = Inputs::draw(&shape, 20261205, 1.0);
    assert_close(
        run_and_compare(&gpu, &shape, &inputs, &AttentionConfig::new()),
        "the caller's device, before",
    );

    device.destroy();
    assert_lost(gpu.wait(), "waiting for the caller's device");
    assert_eq!(
        heard.try_recv().as_deref(),
        Ok("Destroyed"),
        "the caller's callback ran"
    );
    assert_lost(
        Tensor::zeros(&gpu, TensorShape::new(1, 4, 1, 8), DType::F32),
        "Tensor::zeros on the caller's device",
    );
}
