//! `flash-bench masks`' kernels compiled before anything is timed, on one
//! device per core, as the suite's are (`compile_ahead.rs` says why).
//!
//! The command's calls run two kernel sets: the masked kernels (a dense
//! mask and a block-sparse one differ only in their tile states, computed
//! on the host) and the unmasked ones that read a sequence table (valid
//! lengths, and packed sequences with cumulative offsets); causality is a
//! parameter of both. The kernels depend on the head dims, the heads'
//! grouping and the storage type, not on the lengths, so one small call
//! of each set on zeros compiles it. On lavapipe a cold run of the command
//! spent about 58 of its 65 s compiling, one kernel after another.

use wgpu_flash_attn::{
    AttentionConfig, AttentionMask, AttentionShape, DType, ForwardOptions, Gpu, ValidLengths,
};

use crate::compile_ahead::{self, COMPILE_AHEAD_FAILED};
use crate::options::DeviceSetup;

/// A kernel set the measuring pass will use.
#[derive(Clone, Copy)]
enum Warmup {
    /// Keys hidden by a mask (dense or block-sparse).
    Masked,
    /// Padded sequences skipped by their valid lengths.
    ValidLengths,
}

/// Compiles the kernels of `flash-bench masks` (with the backward's when
/// `backward`), where the adapter compiles at first dispatch
/// ([`compile_ahead::worthwhile`]). Failures are said on stderr and left to
/// the measuring pass, which runs and reports the same calls.
pub fn compile_ahead(gpu: &Gpu, setup: &DeviceSetup, backward: bool) {
    if !compile_ahead::worthwhile(gpu) {
        return;
    }
    eprintln!("compiling kernels, one device per core...");
    let work = vec![Warmup::Masked, Warmup::ValidLengths];
    compile_ahead::spread(gpu, setup, &[work], |device, &warmup| {
        if let Err(err) = run_once(device, warmup, backward) {
            eprintln!("{COMPILE_AHEAD_FAILED}: {err}");
        }
    });
}

/// One call of the kernel set on zeros: the forward, then the backward
/// when asked.
fn run_once(gpu: &Gpu, warmup: Warmup, backward: bool) -> wgpu_flash_attn::Result<()> {
    // The command's heads (12, d=64), two short sequences.
    let shape = AttentionShape::self_attention(2, 64, 12, 64);
    let dims = [shape.batch, 1, shape.seq_q, shape.seq_kv];
    let mask = AttentionMask::boolean(gpu, dims, &vec![true; dims.iter().product()])?;
    let lens = [shape.seq_kv, shape.seq_kv / 2];
    let config = AttentionConfig::new();
    let options = match warmup {
        Warmup::Masked => ForwardOptions::new(&config).mask(&mask),
        Warmup::ValidLengths => {
            ForwardOptions::new(&config).valid_lengths(ValidLengths { q: None, kv: &lens })
        }
    };
    compile_ahead::training_step_on_zeros(gpu, &shape, DType::F32, options, backward)
}
