//! Shared test support: a device per test running at once, seeded inputs, and the
//! comparison against the f64 reference.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::OnceLock;

use wgpu_flash_attn::{
    AttentionArgs, AttentionConfig, AttentionShape, CacheShape, DType, DecodeLanes, DecodeOptions,
    DecodePlan, ForwardOptions, ForwardPlan, Gpu, KvDType, Lse, Tensor, Tier, reference,
};

/// Seeded inputs are drawn as flash-bench draws them (rand's ChaCha8 and
/// normal distribution), from the one file that says how.
#[path = "../../src/bin/flash-bench/random.rs"]
pub mod random;

use random::{normal_vec, seeded};

/// Set to 1 to skip GPU tests on a machine that has no adapter at all.
pub const SKIP_VAR: &str = "FLASH_ATTN_SKIP_GPU_TESTS";

/// The device of the calling test, or `None` (with a message) when the
/// user opted out. Without an adapter and without the opt-out, the test
/// fails and says how to get one.
///
/// Tests that run at the same time get different devices (up to one per
/// core), and each test keeps its device for its whole run. Why: lavapipe
/// compiles a kernel at its first dispatch, on the device's queue thread,
/// so one device shared by the whole binary compiles one kernel at a time
/// however many tests run, and a cold run (an empty Mesa shader cache) is
/// mostly compiles. Two devices compiled two cold forward kernels in 35 s
/// where one took 58 s (2 cores). On GL there is one device (wgpu's GL
/// backend shares one context between threads, and its tests run one at a
/// time anyway).
pub fn gpu() -> Option<&'static Gpu> {
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        static SAID: OnceLock<()> = OnceLock::new();
        SAID.get_or_init(|| eprintln!("SKIPPED: GPU test skipped because {SKIP_VAR}=1"));
        return None;
    }
    Some(device_pool::device_of_this_test())
}

/// A device of its own on the test adapter whose limits `lower` changes
/// (tests of calls past a smaller binding, fewer storage buffers, ...), as
/// a program's own device given to `Gpu::from_device`; `None` where the
/// GPU tests are skipped (as [`gpu`]).
pub fn gpu_with_limits(label: &str, lower: impl FnOnce(&mut wgpu::Limits)) -> Option<Gpu> {
    gpu()?;
    let adapter = pollster::block_on(wgpu_flash_attn::AdapterOptions::from_env().select())
        .expect("the adapter the test devices use");
    let mut limits = adapter.limits();
    lower(&mut limits);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some(label),
        required_features: adapter.features() & wgpu_flash_attn::WANTED_FEATURES,
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a device with lower limits than the adapter's");
    Some(Gpu::from_device(device, queue, adapter.get_info()))
}

/// How many devices [`gpu`] lends to tests running at once: one per core
/// (at most eight) on Vulkan and the other backends, one on GL.
pub fn devices_at_once() -> usize {
    device_pool::devices_at_once()
}

/// Calls `work` on every item, spread over [`devices_at_once`] threads that
/// each take the next item and run it on their own test device (so the
/// kernels of different items compile at once on lavapipe).
pub fn on_the_devices<T: Sync>(items: &[T], work: impl Fn(&Gpu, &T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..devices_at_once().min(items.len()) {
            scope.spawn(|| {
                let gpu = gpu().expect("the test adapter");
                while let Some(item) =
                    items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    work(gpu, item);
                }
            });
        }
    });
}

/// The devices of [`gpu`]: opened as tests need them, each lent to the
/// tests running at once that use it least.
mod device_pool {
    use std::cell::RefCell;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use wgpu_flash_attn::Gpu;

    /// More devices than cores would only add compiles that wait.
    const MOST_DEVICES: usize = 8;

    struct Slot {
        gpu: OnceLock<Gpu>,
        /// Test threads holding this device now.
        users: AtomicUsize,
    }

    fn slots() -> &'static [Slot] {
        static SLOTS: OnceLock<Vec<Slot>> = OnceLock::new();
        SLOTS.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..cores.clamp(1, MOST_DEVICES))
                .map(|_| Slot {
                    gpu: OnceLock::new(),
                    users: AtomicUsize::new(0),
                })
                .collect()
        })
    }

    /// The slots tests may use: all of them, or the first alone on GL.
    fn usable_slots() -> &'static [Slot] {
        let all = slots();
        if open(&all[0]).info().adapter.backend == wgpu::Backend::Gl {
            &all[..1]
        } else {
            all
        }
    }

    pub(super) fn devices_at_once() -> usize {
        usable_slots().len()
    }

    fn open(slot: &'static Slot) -> &'static Gpu {
        slot.gpu.get_or_init(|| match Gpu::new() {
            Ok(gpu) => {
                eprintln!("adapter: {}", gpu.info().summary());
                // A run meant for one backend must not pass on another.
                if let Some(wanted) = wgpu::Backends::from_env() {
                    let got = gpu.info().adapter.backend;
                    assert!(
                        wanted.contains(got.into()),
                        "WGPU_BACKEND asks for {wanted:?} but the adapter is {got:?}"
                    );
                }
                gpu
            }
            Err(err) => panic!(
                "GPU tests need a wgpu adapter and none could be opened: {err}\n\
                 On Debian/Ubuntu without a GPU: apt-get install mesa-vulkan-drivers libvulkan1 \
                 (lavapipe), or set {}=1 to skip GPU tests explicitly.",
                super::SKIP_VAR
            ),
        })
    }

    /// A test thread's hold on one slot, given back when the thread ends
    /// (libtest runs each test on a thread of its own).
    struct Lease(usize);

    impl Drop for Lease {
        fn drop(&mut self) {
            slots()[self.0].users.fetch_sub(1, Ordering::Relaxed);
        }
    }

    thread_local! {
        static LEASE: RefCell<Option<Lease>> = const { RefCell::new(None) };
    }

    pub(super) fn device_of_this_test() -> &'static Gpu {
        let index = LEASE.with(|lease| {
            if let Some(Lease(index)) = *lease.borrow() {
                return index;
            }
            let usable = usable_slots();
            let (index, slot) = usable
                .iter()
                .enumerate()
                .min_by_key(|(_, slot)| slot.users.load(Ordering::Relaxed))
                .expect("at least one slot");
            slot.users.fetch_add(1, Ordering::Relaxed);
            *lease.borrow_mut() = Some(Lease(index));
            index
        });
        open(&slots()[index])
    }
}

/// A second device on the test adapter whose cooperative-matrix tier runs:
/// on the adapter's matrix units where it has them and they were asked for
/// (`FLASH_ATTN_COOPERATIVE_MATRIX=1`), else with its products emulated in
/// scalar code (`AdapterOptions::emulate_cooperative_matrices`).
pub fn cooperative_gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    gpu()?;
    GPU.get_or_init(|| {
        let options = wgpu_flash_attn::AdapterOptions {
            emulate_cooperative_matrices: true,
            ..wgpu_flash_attn::AdapterOptions::from_env()
        };
        let gpu = pollster::block_on(Gpu::request(&options)).expect("the test adapter");
        let how = if gpu.info().cooperative_matrix_emulation {
            "emulated"
        } else {
            "on the adapter's matrix units"
        };
        eprintln!(
            "cooperative matrices {how}: {:?}",
            gpu.info().cooperative_matrices
        );
        Some(gpu)
    })
    .as_ref()
}

/// The forward tiers a test runs each case on for `dtype` storage: the
/// adapter's default, and the other kernel family forced: the
/// register-blocked kernel where the default is a per-row tier (CPU
/// adapters: lavapipe, llvmpipe; f32 on NVIDIA GPUs), the portable per-row
/// tier where the default is register-blocked (other hardware GPUs; f16 on
/// NVIDIA). So both forward kernels pass the whole forward matrix on every
/// adapter that runs it.
pub fn forward_tiers(gpu: &Gpu, dtype: DType) -> [Option<Tier>; 2] {
    let shape = AttentionShape::self_attention(1, 64, 1, 64);
    let default = ForwardPlan::for_call(gpu.info(), &shape, dtype, None)
        .expect("a 64-wide head plans on every adapter")
        .tier();
    if default == Tier::RegisterBlocked {
        [None, Some(Tier::Portable)]
    } else {
        [None, Some(Tier::RegisterBlocked)]
    }
}

/// Whether the adapter is a CPU outside GL (lavapipe on Vulkan): where the
/// planners take their CPU choices (lanes over keys, the CPU bounds of the
/// routes between the forward and decoding), stated here independently of
/// the library's own test of it.
pub fn cpu_outside_gl(gpu: &Gpu) -> bool {
    let adapter = &gpu.info().adapter;
    adapter.device_type == wgpu::DeviceType::Cpu && adapter.backend != wgpu::Backend::Gl
}

/// The decode subgroup tier's lane layouts that the adapter does not pick
/// by default (on CPU adapters those other than lanes over keys, on GPUs
/// those other than lanes over the head dim), none where it has no
/// subgroup decode tier. So every layout runs wherever one does.
pub fn other_decode_lanes(gpu: &Gpu) -> Vec<DecodeLanes> {
    let cache = CacheShape {
        batch: 1,
        heads_kv: 1,
        head_dim: 64,
        head_dim_v: 64,
        longest: 64,
        segments: 1,
        dtype: KvDType::F32,
    };
    let default = DecodePlan::for_call(gpu.info(), &cache, 1, 1, &DecodeOptions::default())
        .expect("a 64-wide head decodes on every adapter")
        .lanes();
    match default {
        Some(default) => [
            DecodeLanes::Keys,
            DecodeLanes::HeadDim,
            DecodeLanes::KeyTiles,
        ]
        .into_iter()
        .filter(|&lanes| lanes != default)
        .collect(),
        None => Vec::new(),
    }
}

/// Dropout at low, even and high rates, each with options that move which
/// keys a row sees (causal, a window), sinks, softcap and ALiBi, for calls
/// with `heads_q` query heads.
pub fn dropout_configs(heads_q: usize) -> [AttentionConfig; 3] {
    [
        AttentionConfig::new().dropout(0.1, 1),
        AttentionConfig::new()
            .dropout(0.5, 0xfeed_0000_0000_0001)
            .causal(true)
            .sinks((0..heads_q).map(|h| h as f32 - 1.0).collect()),
        AttentionConfig::new()
            .dropout(0.85, 77)
            .window(Some(20), Some(3))
            .softcap(3.0)
            .alibi(wgpu_flash_attn::Alibi::PerHead(
                wgpu_flash_attn::Alibi::standard_slopes(heads_q),
            )),
    ]
}

/// `config` with `tier` forced, if one is given.
pub fn with_tier(config: &AttentionConfig, tier: Option<Tier>) -> AttentionConfig {
    let mut config = config.clone();
    config.tier = tier;
    config
}

/// An attention shape: `heads` is (query heads, KV heads).
pub fn attention_shape(
    batch: usize,
    seq_q: usize,
    seq_kv: usize,
    heads: (usize, usize),
    head_dim: usize,
) -> AttentionShape {
    AttentionShape {
        batch,
        seq_q,
        seq_kv,
        heads_q: heads.0,
        heads_kv: heads.1,
        head_dim,
        head_dim_v: head_dim,
    }
}

/// Set to 1 to run the sweeps over every supported head dim (32 kernel
/// specializations per storage type, each 10-25 s to compile on a cold
/// lavapipe); `.ci/run` always does.
pub const EXHAUSTIVE_VAR: &str = "FLASH_ATTN_EXHAUSTIVE";

/// The cases a test runs: `full` in the exhaustive mode, otherwise
/// `quick` (which should cover each tiling class: rows per invocation,
/// keys per tile, head dims that do not fill a subgroup's lanes evenly).
/// Says what it left out.
pub fn cases<T: Clone + std::fmt::Debug>(what: &str, quick: &[T], full: &[T]) -> Vec<T> {
    if std::env::var(EXHAUSTIVE_VAR).is_ok_and(|v| v == "1") {
        return full.to_vec();
    }
    eprintln!(
        "SKIPPED: {what} runs {quick:?} of {} cases; {EXHAUSTIVE_VAR}=1 runs all {full:?} \
         (as .ci/run does)",
        full.len()
    );
    quick.to_vec()
}

/// [`cases`] over head dims: every supported one in the exhaustive mode.
pub fn head_dims(what: &str, representative: &[usize]) -> Vec<usize> {
    let every: Vec<usize> = (8..=256).step_by(8).collect();
    cases(what, representative, &every)
}

/// `x` rounded to `dtype` (what a tensor of that storage type holds).
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
    }
}

/// Largest relative error of rounding an f32 to `dtype` (half an ulp).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    }
}

/// What a forward call's kernel adds to its bound on |out - reference|:
/// with f16 storage the cooperative-matrix tier multiplies f16 matrices,
/// and the register-blocked tier with f16 products multiplies f16
/// operands, so both round the weights to f16 before `P V`, up to 2^-11
/// of the largest |v| times the largest sum of a row's weights (1, or
/// 1 / (1 - p) with dropout; docs/semantics.md). The kernel is the one the
/// call runs: forced in `config`, or the device's default (matrix units
/// where the device has them, f16 products where the planner picks them).
/// Every other kernel adds nothing.
pub fn weight_rounding(
    gpu: &Gpu,
    shape: &AttentionShape,
    dtype: DType,
    config: &AttentionConfig,
    v: &[f32],
) -> Result<f64, wgpu_flash_attn::Error> {
    let plan = ForwardPlan::for_config(gpu.info(), shape, dtype, config)?;
    if !plan.rounds_weights_to_f16() {
        return Ok(0.0);
    }
    let v_max = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    let weights = config
        .active_dropout()
        .map_or(1.0, |dropout| 1.0 / dropout.keep_probability());
    Ok(unit_roundoff(DType::F16) * v_max * weights)
}

/// Largest |stored - appended| a KV cache of `dtype` allows for element
/// `x` of a head vector whose largest magnitude is `amax`: half an ulp for
/// f16 and bf16 (round to nearest), half a quantization step for int8,
/// half an ulp of E4M3 for fp8 (3 mantissa bits: |x| / 16; below 2^-6 of
/// the scale `amax / 448`, half of the subnormals' step 2^-9).
pub fn storage_bound(dtype: wgpu_flash_attn::KvDType, x: f64, amax: f64) -> f64 {
    use wgpu_flash_attn::KvDType;
    match dtype {
        KvDType::F16 => x.abs() * 2f64.powi(-11) + 2f64.powi(-25),
        KvDType::BF16 => x.abs() * 2f64.powi(-8),
        KvDType::Int8 => amax / 254.0 * (1.0 + 1e-5),
        KvDType::Fp8 => (x.abs() / 16.0 + amax / 448.0 * 2f64.powi(-10)) * (1.0 + 1e-5),
        _ => 0.0,
    }
}

/// Every KV cache storage type where `what` compiles its kernels for each;
/// a newcomer's run leaves out fp8 (int8's layout and kernels but for how
/// a byte widens, which `fp8_caches_hold_every_byte_and_round_ties_to_even`
/// checks in every run).
pub fn kv_dtypes(what: &str) -> Vec<KvDType> {
    cases(
        what,
        &[KvDType::F32, KvDType::F16, KvDType::BF16, KvDType::Int8],
        &KvDType::ALL,
    )
}

/// RoPE of N(0, 1) values against RoPE in f64: the kernels' angles are
/// exact fixed-point turns, their cos and sin the kernels' own
/// (src/rope.rs); measured at most 1e-5 up to position 4,000,000 on
/// lavapipe, where f32 angles were 1.2e-4 off at 70,000 and 6e-3 at
/// 4,000,000.
pub const ROPE_BOUND: f64 = 2e-5;

/// Packed BSHD inputs drawn from N(0, scale^2).
pub struct Inputs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Inputs {
    pub fn draw(shape: &AttentionShape, seed: u64, scale: f32) -> Self {
        let mut rng = seeded(seed);
        let nq = shape.q_shape().elements();
        let nk = shape.k_shape().elements();
        let nv = shape.v_shape().elements();
        Inputs {
            q: normal_vec(&mut rng, nq, scale),
            k: normal_vec(&mut rng, nk, scale),
            v: normal_vec(&mut rng, nv, 1.0),
        }
    }
}

/// Largest errors of a GPU result against the reference.
#[derive(Debug, Clone, Copy)]
pub struct Errors {
    pub out: f64,
    pub lse: f64,
}

/// Runs packed inputs on the GPU with NaN-poisoned outputs (out and lse),
/// and compares every element with the reference.
pub fn run_and_compare(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
) -> Errors {
    run_with(gpu, Implementation::Flash, shape, inputs, config)
}

/// Which kernel a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    Flash,
    /// The baseline that materialises the score matrix.
    Naive,
}

/// Runs device views of `inputs` (q, k, v) into `out`, which the caller has
/// poisoned with NaN, with a NaN-poisoned logsumexp, and compares both
/// with the reference.
pub fn run_views_and_compare(
    gpu: &Gpu,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
    views: [&Tensor; 4],
) -> Errors {
    run_views_with(gpu, Implementation::Flash, shape, inputs, config, views)
}

/// [`run_and_compare`] with a chosen kernel.
pub fn run_with(
    gpu: &Gpu,
    implementation: Implementation,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
) -> Errors {
    let [q, k, v, out] = upload(gpu, shape, inputs);
    run_views_with(
        gpu,
        implementation,
        shape,
        inputs,
        config,
        [&q, &k, &v, &out],
    )
}

/// `inputs` as packed f32 tensors q, k, v, and a NaN-poisoned output.
pub fn upload(gpu: &Gpu, shape: &AttentionShape, inputs: &Inputs) -> [Tensor; 4] {
    [
        Tensor::from_f32(gpu, shape.q_shape(), &inputs.q).unwrap(),
        Tensor::from_f32(gpu, shape.k_shape(), &inputs.k).unwrap(),
        Tensor::from_f32(gpu, shape.v_shape(), &inputs.v).unwrap(),
        Tensor::filled(gpu, shape.o_shape(), f32::NAN).unwrap(),
    ]
}

/// One call on device views into `out` with a NaN-poisoned logsumexp;
/// the output and logsumexp read back. The naive baseline takes
/// `options.config` (it has no masks or sequences).
pub fn run_views(
    gpu: &Gpu,
    implementation: Implementation,
    shape: &AttentionShape,
    options: ForwardOptions<'_>,
    [q, k, v, out]: [&Tensor; 4],
) -> (Vec<f32>, Vec<f32>) {
    let lse = Lse::new(gpu, shape.batch, shape.heads_q, shape.seq_q).unwrap();
    let args = AttentionArgs {
        q,
        k,
        v,
        out,
        lse: Some(&lse),
    };
    match implementation {
        Implementation::Flash => gpu.run(|e| gpu.forward(e, &args, options)).unwrap(),
        Implementation::Naive => {
            gpu.run(|e| gpu.naive_attention(e, &args, &options.config))
                .unwrap();
        }
    }
    (out.to_f32_vec(gpu).unwrap(), lse.to_vec(gpu).unwrap())
}

/// [`run_views_and_compare`] with a chosen kernel.
pub fn run_views_with(
    gpu: &Gpu,
    implementation: Implementation,
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
    views: [&Tensor; 4],
) -> Errors {
    let options = ForwardOptions::new(config);
    let (got, got_lse) = run_views(gpu, implementation, shape, options, views);
    compare(shape, inputs, config, &got, &got_lse)
}

/// Compares GPU outputs with the reference; panics on NaN or unwritten
/// elements and on a wrong empty-row logsumexp.
pub fn compare(
    shape: &AttentionShape,
    inputs: &Inputs,
    config: &AttentionConfig,
    got: &[f32],
    got_lse: &[f32],
) -> Errors {
    let want = reference::attention(shape, &inputs.q, &inputs.k, &inputs.v, config).unwrap();
    compare_with(&want, got, got_lse, &format!("{shape:?} {config:?}"))
}

/// Compares GPU outputs with a reference result; panics on NaN or
/// unwritten elements and on a wrong empty-row logsumexp.
pub fn compare_with(
    want: &reference::ReferenceOutput,
    got: &[f32],
    got_lse: &[f32],
    what: &str,
) -> Errors {
    Errors {
        out: max_abs_error(got, &want.out, &format!("{what}: out")),
        lse: max_abs_error(got_lse, &want.lse, &format!("{what}: lse")),
    }
}

/// f32 storage bound on |out - ref| (docs/semantics.md) and on |lse - ref|.
pub const F32_TOLERANCE: f64 = 1e-4;

pub fn assert_close(errors: Errors, what: &str) {
    assert!(
        errors.out <= F32_TOLERANCE,
        "{what}: max |out - ref| = {:.3e} > {F32_TOLERANCE:e}",
        errors.out
    );
    assert!(
        errors.lse <= F32_TOLERANCE,
        "{what}: max |lse - ref| = {:.3e} > {F32_TOLERANCE:e}",
        errors.lse
    );
}

/// The reference of sequence `sequence` of a padded or packed batch (its
/// index: what dropout's mask depends on) from packed `[len, heads, d]`
/// slices; a sequence without keys gives zeros and the sink (or +inf).
pub fn sequence_reference(
    config: &AttentionConfig,
    sequence: usize,
    (hq, hkv, d): (usize, usize, usize),
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let (seq_q, seq_kv) = (q.len() / (hq * d), k.len() / (hkv * d));
    if seq_kv == 0 {
        let lse = (0..hq)
            .flat_map(|h| {
                let sink = config
                    .sinks
                    .as_ref()
                    .map_or(f64::INFINITY, |s| f64::from(s[h]));
                std::iter::repeat_n(sink, seq_q)
            })
            .collect();
        return (vec![0.0; q.len()], lse);
    }
    if seq_q == 0 {
        return (Vec::new(), Vec::new());
    }
    let shape = AttentionShape {
        batch: 1,
        seq_q,
        seq_kv,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        head_dim_v: d,
    };
    let want = reference::attention_of_sequences(&shape, q, k, v, config, sequence).unwrap();
    (want.out, want.lse)
}

/// The largest |got - want| over the elements the reference computed (a
/// NaN in `want` marks one it skipped, `reference::attention_rows`).
/// Panics where `got` is NaN (unwritten or invalid: a plain `f64::max`
/// fold would drop it and pass) and where an infinite reference (the
/// logsumexp of a row without keys) is not matched exactly.
pub fn max_abs_error(got: &[f32], want: &[f64], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut err = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            continue;
        }
        assert!(
            !g.is_nan(),
            "{what}: element {i} is NaN (unwritten or invalid)"
        );
        if w.is_infinite() {
            assert_eq!(f64::from(g), w, "{what}: element {i}");
        } else {
            err = err.max((f64::from(g) - w).abs());
        }
    }
    err
}

/// The largest |a - b| of two f32 results (equal infinities count as 0);
/// panics on a NaN in either, which a plain `f32::max` fold would drop.
pub fn max_abs_diff(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            !x.is_nan() && !y.is_nan(),
            "{what}: element {i} is NaN ({x} vs {y})"
        );
        if x != y {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// Packed rows against their reference within [`F32_TOLERANCE`]; an
/// infinite reference (a row without keys) must match exactly.
pub fn assert_rows_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: element {i} not written");
        if w.is_infinite() {
            assert_eq!(f64::from(g), w, "{what}: element {i}");
        } else {
            assert!(
                (f64::from(g) - w).abs() <= F32_TOLERANCE,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }
}

/// Reads a buffer's bytes back the way a caller would, without the crate.
pub fn read_bytes(gpu: &Gpu, buffer: &wgpu::Buffer) -> Vec<u8> {
    let staging = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("caller readback"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    gpu.queue().submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    gpu.wait().unwrap();
    staging.slice(..).get_mapped_range().unwrap().to_vec()
}
