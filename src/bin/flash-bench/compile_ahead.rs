//! Kernels compiled before anything is timed, on several devices at once,
//! on adapters that compile a kernel at its first dispatch.
//!
//! Lavapipe compiles a kernel (LLVM, 5-130 s cold on a two-core machine)
//! at the first dispatch that uses it, on the device's queue thread: one
//! device compiles one kernel at a time, whatever the machine's core count,
//! and a first run of the suite is mostly compiles. Here each case's GPU
//! implementations run once on zero inputs, spread over one device per core
//! (the timing device among them), before the first case is measured; Mesa's
//! shader cache then hands the compiled kernels to the timing device.
//! Nothing is timed while other devices compile, and results are not
//! checked here: the measuring pass validates every call as before. Large
//! cases (`MOST_FLOPS`) are left to the measuring pass.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use wgpu_flash_attn::{
    AttentionArgs, AttentionShape, BackwardArgs, DType, ForwardOptions, Gpu, Lse, SinkGrads, Tensor,
};

use crate::options::DeviceSetup;

use crate::measure::{Case, linear_args_of};
use crate::options::Impl;

/// How a failed warm-up call starts its line on stderr (the CLI tests
/// look for it).
pub const COMPILE_AHEAD_FAILED: &str = "compile-ahead call failed, left to the measuring pass";

/// Devices compiling at once, at most (more than the cores only queue).
const MOST_DEVICES: usize = 8;

/// Cases of more FLOPs than this (about a second of the flash forward on
/// lavapipe; the suite's largest is 8.6 GFLOP) compile in the measuring
/// pass as before: a second run of such a call costs more than running its
/// compiles beside others saves.
const MOST_FLOPS: f64 = 2e10;

/// Whether the adapter compiles kernels at their first dispatch on one
/// thread per device (CPU adapters through Vulkan: lavapipe). wgpu's GL
/// backend shares one context between threads, so GL keeps one device.
pub fn worthwhile(gpu: &Gpu) -> bool {
    let adapter = &gpu.info().adapter;
    adapter.device_type == wgpu::DeviceType::Cpu && adapter.backend == wgpu::Backend::Vulkan
}

/// Runs every GPU implementation of `cases` once, spread over `gpu` and
/// further devices opened as `setup` says (one per core). Failures are left
/// to the measuring pass, which reports them with their case.
pub fn compile_ahead(gpu: &Gpu, setup: &DeviceSetup, cases: &[Case]) {
    let items: Vec<(&Case, Impl)> = cases
        .iter()
        .flat_map(|case| case.impls.iter().map(move |&i| (case, i)))
        .filter(|(case, i)| *i != Impl::Cpu && case.shape.flops(&case.config) <= MOST_FLOPS)
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores.min(items.len()) < 2 {
        return;
    }
    // Two devices compiling the same kernel at once would both compile it
    // (the suite's f32 d=64 cases share their forward kernel): first
    // one call per implementation, storage type and head-dim pair (which
    // is what picks most kernels), then the rest, whose kernels are mostly
    // in Mesa's cache by then.
    let mut seen = HashSet::new();
    let (first, rest): (Vec<_>, Vec<_>) = items.into_iter().partition(|(case, i)| {
        let s = &case.shape;
        seen.insert(format!(
            "{i:?} {:?} {} {}",
            case.dtype, s.head_dim, s.head_dim_v
        ))
    });
    spread(
        gpu,
        setup,
        &[first, rest],
        |device, (case, implementation)| {
            // An error here is the measuring pass's to report.
            let _ = run_once(device, case, *implementation);
        },
    );
}

/// Runs `work` on every item of each round (the rounds in turn), spread
/// over `gpu` and further devices opened as `setup` says, one per core
/// (`MOST_DEVICES` at most); with one core, or one item in all, `gpu`
/// runs them alone. Devices that fail to open are left out.
pub fn spread<T: Sync>(
    gpu: &Gpu,
    setup: &DeviceSetup,
    rounds: &[Vec<T>],
    work: impl Fn(&Gpu, &T) + Sync,
) {
    let items = rounds.iter().map(Vec::len).max().unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let devices = cores.min(MOST_DEVICES).min(items).max(1);
    let others: Vec<Gpu> = (1..devices).filter_map(|_| setup.open().ok()).collect();
    for round in rounds {
        let next = AtomicUsize::new(0);
        let drain = |device: &Gpu| {
            while let Some(item) = round.get(next.fetch_add(1, Ordering::Relaxed)) {
                work(device, item);
            }
        };
        std::thread::scope(|scope| {
            for device in &others {
                scope.spawn(|| drain(device));
            }
            drain(gpu);
        });
    }
}

/// One call of `implementation` on `case`'s shape and options, on zeros.
fn run_once(gpu: &Gpu, case: &Case, implementation: Impl) -> wgpu_flash_attn::Result<()> {
    let shape = &case.shape;
    let dtype = case.dtype;
    let zeros = |dims| Tensor::zeros(gpu, dims, dtype);
    let (q, k, v, out) = zero_operands(gpu, shape, dtype)?;
    let args = AttentionArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: None,
    };
    match implementation {
        Impl::Flash => gpu.run(|e| gpu.forward(e, &args, case.forward_options())),
        Impl::Naive => gpu
            .run(|e| gpu.naive_attention(e, &args, &case.config))
            .map(|_| ()),
        Impl::Linear => match linear_args_of(case) {
            Some((linear_shape, config)) => {
                let linear_out = zeros(linear_shape.out_shape())?;
                let linear = wgpu_flash_attn::LinearArgs {
                    q: &q,
                    k: &k,
                    v: &v,
                    out: &linear_out,
                    state: None,
                };
                gpu.run(|e| gpu.linear_attention(e, &linear, &config))
            }
            None => Ok(()),
        },
        Impl::Backward => {
            training_step_on_zeros(gpu, shape, dtype, ForwardOptions::new(&case.config), true)
        }
        Impl::Cpu => Ok(()),
    }
}

/// Zeros shaped as `shape`'s q, k, v and out, stored as `dtype`.
fn zero_operands(
    gpu: &Gpu,
    shape: &AttentionShape,
    dtype: DType,
) -> wgpu_flash_attn::Result<(Tensor, Tensor, Tensor, Tensor)> {
    let zeros = |dims| Tensor::zeros(gpu, dims, dtype);
    Ok((
        zeros(shape.q_shape())?,
        zeros(shape.k_shape())?,
        zeros(shape.v_shape())?,
        zeros(shape.o_shape())?,
    ))
}

/// A forward call with `options` on zeros of `shape` stored as `dtype`
/// (writing the logsumexp, as training does), then with `backward` its
/// backward: the kernels a training step of those options runs.
pub fn training_step_on_zeros(
    gpu: &Gpu,
    shape: &AttentionShape,
    dtype: DType,
    options: ForwardOptions<'_>,
    backward: bool,
) -> wgpu_flash_attn::Result<()> {
    let (q, k, v, out) = zero_operands(gpu, shape, dtype)?;
    // The gradients are shaped as the operands: dq as q, ..., d_out as out.
    let (dq, dk, dv, d_out) = zero_operands(gpu, shape, dtype)?;
    let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q)?;
    let dsinks = SinkGrads::for_config(gpu, &options.config, shape.heads_q)?;
    let args = BackwardArgs {
        q: &q,
        k: &k,
        v: &v,
        out: &out,
        lse: &lse,
        d_out: &d_out,
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dsinks: dsinks.as_ref(),
    };
    gpu.run(|e| {
        gpu.forward(e, &args.forward_args(), options.clone())?;
        if backward {
            gpu.backward(e, &args, options.clone())?;
        }
        Ok(())
    })
}
