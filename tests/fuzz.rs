//! Fuzz mode: random forward configurations through the public API, each
//! checked against the f64 reference. Ignored by default because its worth
//! is in the number of cases (each new head dim, storage type or mask kind
//! also compiles kernels, ~20 s each on a cold lavapipe): run it with
//!
//! ```sh
//! FLASH_ATTN_FUZZ_CASES=10000 cargo test --release --test fuzz -- --ignored --nocapture
//! ```
//!
//! Every case prints nothing unless it fails; the run prints its seed
//! first, and `FLASH_ATTN_FUZZ_SEED=S FLASH_ATTN_FUZZ_CASES=1` replays the
//! case a failure names (each case draws from its own seed, `base + index`).
//!
//! Drawn per case: batch, lengths (1-150, `seq_q != seq_kv` included), GQA
//! groups, head dims (multiples of 8 up to 256), storage (f32, f16, bf16),
//! layout (packed BSHD or a BHSD buffer seen through strides), causal,
//! windows, softcap, scale, ALiBi, and at most one of: a boolean mask, an
//! additive bias mask (with `-inf` entries), or valid lengths (key and
//! query padding). The bound is the crate's accuracy rule: 1e-4 plus the
//! output's rounding to its storage type, on inputs already rounded to it
//! (docs/semantics.md); a row that sees no key must be zeros.

mod common;

use common::random::{SeededRng, normal_vec, seeded};
use common::{gpu, round_to, unit_roundoff};
use rand::RngExt;
use wgpu_flash_attn::reference::{self, HostMask};
use wgpu_flash_attn::{
    Alibi, AttentionArgs, AttentionConfig, AttentionMask, AttentionShape, DType, ForwardOptions,
    Gpu, Strides, Tensor, TensorShape, ValidLengths,
};

const CASES_VAR: &str = "FLASH_ATTN_FUZZ_CASES";
const SEED_VAR: &str = "FLASH_ATTN_FUZZ_SEED";
/// Cases when the variable is unset (a short look, not the soak).
const DEFAULT_CASES: usize = 50;
const TOLERANCE: f64 = 1e-4;

/// What one case runs with, for the failure message.
#[derive(Debug)]
enum Extra {
    None,
    BoolMask,
    BiasMask,
    ValidLengths { q: Vec<usize>, kv: Vec<usize> },
}

#[derive(Debug)]
struct Case {
    shape: AttentionShape,
    dtype: DType,
    bhsd: bool,
    config: AttentionConfig,
    extra: Extra,
}

fn draw_case(rng: &mut SeededRng) -> Case {
    let heads_kv = rng.random_range(1..=3);
    let shape = AttentionShape {
        batch: rng.random_range(1..=3),
        seq_q: rng.random_range(1..=150),
        seq_kv: rng.random_range(1..=150),
        heads_q: heads_kv * rng.random_range(1..=3),
        heads_kv,
        head_dim: 8 * rng.random_range(1..=32),
    };
    let dtype = [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)];
    let mut config = AttentionConfig::new().causal(rng.random_bool(0.4));
    if rng.random_bool(0.3) {
        let side = |rng: &mut SeededRng| rng.random_bool(0.7).then(|| rng.random_range(0..=160i64));
        config = config.window(side(rng), side(rng));
    }
    if rng.random_bool(0.3) {
        config = config.softcap(rng.random_range(1.0..50.0f32));
    }
    if rng.random_bool(0.3) {
        let magnitude = rng.random_range(0.02..1.0f32);
        config = config.scale(if rng.random_bool(0.2) {
            -magnitude
        } else {
            magnitude
        });
    }
    if rng.random_bool(0.3) {
        let slopes = (0..shape.heads_q)
            .map(|_| rng.random_range(0.0..0.5f32))
            .collect();
        config = config.alibi(Alibi::PerHead(slopes));
    }
    let extra = match rng.random_range(0..4) {
        1 => Extra::BoolMask,
        2 => Extra::BiasMask,
        3 => Extra::ValidLengths {
            q: (0..shape.batch)
                .map(|_| rng.random_range(0..=shape.seq_q))
                .collect(),
            kv: (0..shape.batch)
                .map(|_| rng.random_range(0..=shape.seq_kv))
                .collect(),
        },
        _ => Extra::None,
    };
    Case {
        shape,
        dtype,
        bhsd: rng.random_bool(0.3),
        config,
        extra,
    }
}

/// A `[batch, seq, heads, d]` tensor holding `data` (packed BSHD values),
/// stored packed or as a BHSD buffer seen through strides.
fn upload(gpu: &Gpu, dims: TensorShape, data: &[f32], dtype: DType, bhsd: bool) -> Tensor {
    if !bhsd {
        return Tensor::from_f32_as(gpu, dims, data, dtype).unwrap();
    }
    let TensorShape {
        batch,
        seq,
        heads,
        head_dim: d,
    } = dims;
    let mut stored = vec![0.0f32; data.len()];
    for b in 0..batch {
        for t in 0..seq {
            for h in 0..heads {
                let from = ((b * seq + t) * heads + h) * d;
                let to = ((b * heads + h) * seq + t) * d;
                stored[to..to + d].copy_from_slice(&data[from..from + d]);
            }
        }
    }
    let flat = TensorShape::new(1, 1, 1, data.len());
    let buffer = Tensor::from_f32_as(gpu, flat, &stored, dtype).unwrap();
    let strides = Strides {
        batch: heads * seq * d,
        seq: d,
        head: seq * d,
    };
    buffer.view(dims, strides, 0).unwrap()
}

/// Runs one case; `Err` describes the first element outside the rule.
fn run_case(gpu: &Gpu, case: &Case, rng: &mut SeededRng) -> Result<(), String> {
    let s = &case.shape;
    let mut draw = |n: usize| -> Vec<f32> {
        normal_vec(rng, n, 1.0)
            .into_iter()
            .map(|x| round_to(case.dtype, x))
            .collect()
    };
    let (q, k, v) = (
        draw(s.q_shape().elements()),
        draw(s.kv_shape().elements()),
        draw(s.kv_shape().elements()),
    );
    let tensor = |dims, data: &[f32]| upload(gpu, dims, data, case.dtype, case.bhsd);
    let (qt, kt, vt) = (
        tensor(s.q_shape(), &q),
        tensor(s.kv_shape(), &k),
        tensor(s.kv_shape(), &v),
    );
    let out = tensor(s.q_shape(), &vec![f32::NAN; s.q_shape().elements()]);
    let args = AttentionArgs {
        q: &qt,
        k: &kt,
        v: &vt,
        out: &out,
        lse: None,
    };
    let mask_dims = [s.batch, s.heads_q, s.seq_q, s.seq_kv];
    let mask_len = mask_dims.iter().product();
    let mut mask_rng = seeded(rng.random());
    let (want, got) = match &case.extra {
        Extra::None => {
            gpu.run(|e| gpu.forward(e, &args, &case.config))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let want = reference::attention(s, &q, &k, &v, &case.config).unwrap();
            (want.out, out.to_f32_vec(gpu).unwrap())
        }
        Extra::BoolMask => {
            let values: Vec<bool> = (0..mask_len).map(|_| mask_rng.random_bool(0.7)).collect();
            let mask = AttentionMask::boolean(gpu, mask_dims, &values).unwrap();
            gpu.run(|e| gpu.forward(e, &args, ForwardOptions::new(&case.config).mask(&mask)))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let host = HostMask::Bool {
                dims: mask_dims,
                values: &values,
            };
            let want = reference::attention_masked(s, &q, &k, &v, &case.config, &host).unwrap();
            (want.out, out.to_f32_vec(gpu).unwrap())
        }
        Extra::BiasMask => {
            let values: Vec<f32> = (0..mask_len)
                .map(|_| {
                    if mask_rng.random_bool(0.2) {
                        f32::NEG_INFINITY
                    } else {
                        mask_rng.random_range(-3.0..3.0f32)
                    }
                })
                .collect();
            let mask = AttentionMask::bias(gpu, mask_dims, &values).unwrap();
            gpu.run(|e| gpu.forward(e, &args, ForwardOptions::new(&case.config).mask(&mask)))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            let host = HostMask::Bias {
                dims: mask_dims,
                values: &values,
            };
            let want = reference::attention_masked(s, &q, &k, &v, &case.config, &host).unwrap();
            (want.out, out.to_f32_vec(gpu).unwrap())
        }
        Extra::ValidLengths { q: q_lens, kv } => {
            let lengths = ValidLengths {
                q: Some(q_lens),
                kv,
            };
            let options = ForwardOptions::new(&case.config).valid_lengths(lengths);
            gpu.run(|e| gpu.forward(e, &args, options))
                .map_err(|e| format!("GPU call failed: {e}"))?;
            // Each sequence is attention over its valid rows and keys alone
            // (positions aligned to those lengths); rows past them are zeros.
            let row = s.heads_q * s.head_dim;
            let key_row = s.heads_kv * s.head_dim;
            let mut want = vec![0.0f64; s.q_shape().elements()];
            for b in 0..s.batch {
                let (nq, nk) = (q_lens[b], kv[b]);
                if nq == 0 || nk == 0 {
                    continue;
                }
                let one = AttentionShape {
                    batch: 1,
                    seq_q: nq,
                    seq_kv: nk,
                    ..*s
                };
                let rows = |data: &[f32], len: usize, width: usize, n: usize| {
                    data[b * len * width..][..n * width].to_vec()
                };
                let result = reference::attention(
                    &one,
                    &rows(&q, s.seq_q, row, nq),
                    &rows(&k, s.seq_kv, key_row, nk),
                    &rows(&v, s.seq_kv, key_row, nk),
                    &case.config,
                )
                .unwrap();
                want[b * s.seq_q * row..][..nq * row].copy_from_slice(&result.out);
            }
            (want, out.to_f32_vec(gpu).unwrap())
        }
    };
    let roundoff = unit_roundoff(case.dtype);
    for (index, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let error = (f64::from(g) - w).abs();
        if g.is_nan() || error > TOLERANCE + roundoff * w.abs() {
            return Err(format!(
                "out[{index}] = {g}, reference {w} (error {error:.3e})"
            ));
        }
    }
    Ok(())
}

#[test]
#[ignore = "a soak: its value is many cases, each compiling kernels on first use; \
            FLASH_ATTN_FUZZ_CASES=N runs N (see the file's doc)"]
fn random_configurations_follow_the_accuracy_rule() {
    let Some(gpu) = gpu() else { return };
    let cases: usize = std::env::var(CASES_VAR)
        .ok()
        .map(|v| v.parse().expect("FLASH_ATTN_FUZZ_CASES is a number"))
        .unwrap_or(DEFAULT_CASES);
    let base: u64 = std::env::var(SEED_VAR)
        .ok()
        .map(|v| v.parse().expect("FLASH_ATTN_FUZZ_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    eprintln!("fuzz: {cases} cases from seed {base} ({SEED_VAR}={base} replays them)");
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for index in 0..cases {
        let seed = base + index as u64;
        let mut rng = seeded(seed);
        let case = draw_case(&mut rng);
        if let Err(problem) = run_case(gpu, &case, &mut rng) {
            eprintln!("FAILED seed {seed}: {problem}\n  {case:?}");
            failures.push(seed);
        }
    }
    eprintln!(
        "fuzz: {cases} cases in {:.1} s, {} outside the rule",
        start.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "cases outside the rule (replay each with {SEED_VAR}=S {CASES_VAR}=1): {failures:?}"
    );
}
