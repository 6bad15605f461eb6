//! Command-line arguments shared by several subcommands, and their
//! translation into library types.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;
use wgpu_flash_attn::{AdapterOptions, AttentionConfig, AttentionShape, SkippedChecks};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Graphics backend to use (default: all, or WGPU_BACKEND).
    #[arg(long, global = true, value_enum)]
    pub backend: Option<Backend>,
    /// Pick the adapter whose name contains this (case-insensitive).
    #[arg(long, global = true, value_name = "NAME")]
    pub adapter: Option<String>,
    /// Write every figure, with adapter info and the timer used, as JSON.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write throughput against sequence length as SVG (suite and sweep).
    #[arg(long, global = true, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Request wgpu's experimental cooperative-matrix feature where the
    /// adapter has it (as FLASH_ATTN_COOPERATIVE_MATRIX=1 does), which
    /// offers the tensor-core tier (`--tier coop`; the default where
    /// offered on CPU adapters only, since on GPUs it has not yet passed
    /// its tests: README, "Kernel tiers").
    #[arg(long, global = true)]
    pub cooperative_matrix: bool,
    /// Compile the kernels without wgpu's runtime checks (array index
    /// clamps, loop bounds, checked division), to measure what they cost;
    /// the command line in the JSON records it.
    #[arg(long, global = true)]
    pub unchecked_shaders: bool,
    /// Compile the kernels without exactly these of wgpu's runtime checks:
    /// `bounds` (index clamps), `loops` (loop bounding), `division`
    /// (checked integer division), comma-separated, or `none` (every check
    /// on), to measure each one's cost (`--unchecked-shaders` skips all
    /// three). Without it the crate's default: `loops`, in the kernels
    /// whose loops are proven finite (all of the crate's). The command line
    /// in the JSON records it.
    #[arg(long, global = true, value_name = "CHECKS", value_parser = SkippedChecks::from_names)]
    pub skip_checks: Option<SkippedChecks>,
    /// Compile the kernels with the crate's WGSL files replaced by the
    /// same-named `.wgsl` files of DIR (`flash_blocked.wgsl`, ...): kernel
    /// tuning without a rebuild. Results are still validated against the
    /// reference; the command line in the JSON records it.
    #[arg(long, global = true, value_name = "DIR")]
    pub shader_dir: Option<PathBuf>,
}

/// How flash-bench opens each device: the adapter options and what to do
/// to a device once open (the kernels' runtime checks, replaced shader
/// files), the same for every device a run opens.
pub struct DeviceSetup {
    pub options: AdapterOptions,
    skipped_checks: SkippedChecks,
    /// (file name, text) of each replacement, read once.
    shader_files: Vec<(String, String)>,
}

impl DeviceSetup {
    /// Opens a device with these options and prepares it.
    pub fn open(&self) -> anyhow::Result<wgpu_flash_attn::Gpu> {
        use anyhow::Context;
        let gpu = pollster::block_on(wgpu_flash_attn::Gpu::request(&self.options))
            .context("opening a GPU adapter")?;
        self.prepare(&gpu)?;
        Ok(gpu)
    }

    /// Applies the runtime-check and shader-file choices to `gpu`.
    pub fn prepare(&self, gpu: &wgpu_flash_attn::Gpu) -> anyhow::Result<()> {
        if self.skipped_checks != SkippedChecks::CRATE_DEFAULT {
            // SAFETY: a measurement the user asked for; every kernel passes
            // the reference tests with the checks on (Gpu's documentation
            // says what that does and does not prove).
            unsafe { gpu.skip_shader_runtime_checks_of(self.skipped_checks) };
        }
        for (name, text) in &self.shader_files {
            gpu.override_shader_file(name, text.clone())?;
        }
        Ok(())
    }

    /// The runtime checks the kernels compile without.
    pub fn skipped_checks(&self) -> SkippedChecks {
        self.skipped_checks
    }

    /// A line for stderr saying what differs from the crate's kernels.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.skipped_checks == SkippedChecks::ALL {
            parts.push("without wgpu's runtime checks".to_string());
        } else if self.skipped_checks != SkippedChecks::CRATE_DEFAULT {
            parts.push(format!(
                "without wgpu's runtime checks {} (the crate's default: loops)",
                self.skipped_checks.names()
            ));
        }
        if !self.shader_files.is_empty() {
            let names: Vec<&str> = self.shader_files.iter().map(|(n, _)| n.as_str()).collect();
            parts.push(format!("with {} replaced", names.join(", ")));
        }
        (!parts.is_empty()).then(|| format!("kernels compiled {}", parts.join(" and ")))
    }
}

impl GlobalArgs {
    /// The device setup these flags ask for; reads the `--shader-dir` files.
    pub fn device_setup(&self) -> anyhow::Result<DeviceSetup> {
        use anyhow::Context;
        let shader_files = match &self.shader_dir {
            Some(dir) => crate::shader_files::read_shader_dir(dir)
                .with_context(|| format!("--shader-dir {}", dir.display()))?,
            None => Vec::new(),
        };
        Ok(DeviceSetup {
            options: self.adapter_options(),
            skipped_checks: if self.unchecked_shaders {
                SkippedChecks::ALL
            } else {
                self.skip_checks.unwrap_or(SkippedChecks::CRATE_DEFAULT)
            },
            shader_files,
        })
    }

    pub fn adapter_options(&self) -> AdapterOptions {
        let mut options = AdapterOptions::from_env();
        if let Some(backend) = self.backend {
            options.backends = match backend {
                Backend::Vulkan => wgpu::Backends::VULKAN,
                Backend::Metal => wgpu::Backends::METAL,
                Backend::Dx12 => wgpu::Backends::DX12,
                Backend::Gl => wgpu::Backends::GL,
            };
        }
        if let Some(name) = &self.adapter {
            options.adapter_name = Some(name.clone());
        }
        options.cooperative_matrix |= self.cooperative_matrix;
        options
    }
}

/// The attention options, as `run`, `sweep` and `check` take them.
#[derive(Debug, Clone, Args)]
pub struct AttentionFlags {
    /// Causal mask, aligned to the bottom-right corner (docs/semantics.md).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window "LEFT,RIGHT" in keys; -1 leaves that side unbounded.
    #[arg(long, value_name = "L,R", allow_hyphen_values = true, value_parser = parse_window)]
    pub window: Option<Window>,
    /// Softmax scale (default 1/sqrt(head_dim), the query/key head dim).
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Soft-capping of the scores: c * tanh(s / c). Negative values are
    /// read as values (and refused as invalid), not as flags.
    #[arg(long, value_name = "C", allow_hyphen_values = true)]
    pub softcap: Option<f32>,
    /// Attention dropout (training): each probability dropped with
    /// probability P in [0, 1), the mask drawn from --dropout-seed (the
    /// reference draws the same one, so results are still validated).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub dropout: Option<f32>,
    /// Seed of the dropout mask.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub dropout_seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub left: Option<i64>,
    pub right: Option<i64>,
}

/// The most timed runs a case takes (a median of more says nothing new,
/// and a typo of a huge count would run for ever).
pub const MOST_ITERS: usize = 100_000;

/// A count of timed runs: a median needs at least one.
pub fn parse_iters(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("at least 1 timed run is needed for a median".to_string()),
        Ok(n) if n > MOST_ITERS => Err(format!("{n} timed runs: at most {MOST_ITERS}")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// Longest sequence `masks --packed-lens` takes: each sequence's f64
/// reference backward runs on one CPU core (about 10 s at 2048 tokens, 16x
/// that at 8192).
pub const MOST_PACKED_LEN: usize = 8192;

/// One sequence length of `masks --packed-lens`.
pub fn parse_packed_len(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("a packed sequence needs at least 1 token".to_string()),
        Ok(n) if n > MOST_PACKED_LEN => Err(format!(
            "{n} tokens: at most {MOST_PACKED_LEN} (the f64 reference backward runs on the CPU)"
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// A KV-cache page size: a power of two in `wgpu_flash_attn::PAGE_SIZES`.
pub fn parse_page_size(text: &str) -> Result<usize, String> {
    let sizes = wgpu_flash_attn::PAGE_SIZES;
    match text.parse::<usize>() {
        Ok(n) if n.is_power_of_two() && sizes.contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "page size {n}: a power of two from {} to {}",
            sizes.start(),
            sizes.end()
        )),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// Cached tokens of a decode case: at least 1, and at most
/// `MAX_SEQUENCE_LEN` (positions the kernels hold).
pub fn parse_cache_tokens(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("a cache of 0 tokens has nothing to attend".to_string()),
        Ok(n) if n > wgpu_flash_attn::MAX_SEQUENCE_LEN => Err(format!(
            "{n} cached tokens: at most {} (MAX_SEQUENCE_LEN)",
            wgpu_flash_attn::MAX_SEQUENCE_LEN
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// A count of at least 1 (keys per dispatch).
pub fn parse_positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// A register-blocked layout, `ROW_LANESxKEY_LANESxROWS` (`16x8x2`): lanes
/// 1 to 256, rows 1 to 8.
pub fn parse_layout(text: &str) -> Result<wgpu_flash_attn::BlockedLayout, String> {
    use wgpu_flash_attn::BlockedLayout;
    let parts: Vec<&str> = text.split('x').collect();
    let [row_lanes, key_lanes, rows] = parts[..] else {
        return Err(format!("expected ROW_LANESxKEY_LANESxROWS, got {text:?}"));
    };
    let number = |s: &str, max: u32, what: &str| -> Result<u32, String> {
        match s.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("{what} must be 1 to {max}, got {s:?} in {text:?}")),
        }
    };
    Ok(BlockedLayout {
        row_lanes: number(row_lanes, BlockedLayout::MAX_LANES, "row lanes")?,
        key_lanes: number(key_lanes, BlockedLayout::MAX_LANES, "key lanes")?,
        rows: number(rows, BlockedLayout::MAX_ROWS, "rows")?,
    })
}

/// A cooperative-matrix block, `ROW_TILESxKEY_TILES` (`4x2`): counts of
/// matrix-sized tiles (the planner checks the ranges and what fits).
pub fn parse_coop_layout(text: &str) -> Result<wgpu_flash_attn::CoopLayout, String> {
    let tiles = text
        .split_once('x')
        .and_then(|(rows, keys)| Some((rows.parse::<u32>().ok()?, keys.parse::<u32>().ok()?)));
    match tiles {
        Some((row_tiles, key_tiles)) => Ok(wgpu_flash_attn::CoopLayout {
            row_tiles,
            key_tiles,
        }),
        None => Err(format!("expected ROW_TILESxKEY_TILES, got {text:?}")),
    }
}

fn parse_window(text: &str) -> Result<Window, String> {
    let (left, right) = text
        .split_once(',')
        .ok_or_else(|| format!("expected LEFT,RIGHT, got {text:?}"))?;
    let side = |s: &str| -> Result<Option<i64>, String> {
        let value: i64 = s
            .trim()
            .parse()
            .map_err(|e| format!("window side {s:?}: {e}"))?;
        match value {
            -1 => Ok(None),
            v if v < -1 => Err(format!("window side {v}: use -1 for unbounded")),
            v => Ok(Some(v)),
        }
    };
    Ok(Window {
        left: side(left)?,
        right: side(right)?,
    })
}

impl AttentionFlags {
    pub fn config(&self) -> AttentionConfig {
        let mut config = AttentionConfig::new().causal(self.causal);
        if let Some(window) = self.window {
            config = config.window(window.left, window.right);
        }
        if let Some(scale) = self.scale {
            config = config.scale(scale);
        }
        if let Some(cap) = self.softcap {
            config = config.softcap(cap);
        }
        if let Some(p) = self.dropout {
            config = config.dropout(p, self.dropout_seed);
        }
        config
    }

    /// Short text for case names, e.g. " causal window=128,0".
    pub fn describe(&self) -> String {
        let mut text = String::new();
        if self.causal {
            text.push_str(" causal");
        }
        if let Some(w) = self.window {
            let side = |s: Option<i64>| s.map_or("-1".to_string(), |v| v.to_string());
            text.push_str(&format!(" window={},{}", side(w.left), side(w.right)));
        }
        if let Some(s) = self.scale {
            text.push_str(&format!(" scale={s}"));
        }
        if let Some(c) = self.softcap {
            text.push_str(&format!(" softcap={c}"));
        }
        if let Some(p) = self.dropout {
            text.push_str(&format!(" dropout={p}"));
        }
        text
    }
}

/// Storage type of Q, K, V and O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> wgpu_flash_attn::DType {
        match self {
            DTypeArg::F32 => wgpu_flash_attn::DType::F32,
            DTypeArg::F16 => wgpu_flash_attn::DType::F16,
            DTypeArg::Bf16 => wgpu_flash_attn::DType::BF16,
        }
    }
}

/// Kernel tier to force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TierArg {
    /// Workgroup-memory tiles: runs everywhere.
    Portable,
    /// Subgroup broadcasts, one query row per lane (adapters with
    /// subgroups: the default on CPU adapters; hardware GPUs run it only
    /// when forced).
    Subgroup,
    /// Register-blocked micro-tiles (the forward's default on most GPUs),
    /// with f32 products (what f16 storage gets by default on NVIDIA is
    /// blocked-f16).
    Blocked,
    /// The register-blocked tier with its products in f16 (f16 storage,
    /// SHADER_F16; AttentionConfig::f16_products).
    BlockedF16,
    /// Cooperative matrices (tensor cores; needs --cooperative-matrix).
    Coop,
}

impl TierArg {
    pub fn tier(self) -> wgpu_flash_attn::Tier {
        match self {
            TierArg::Portable => wgpu_flash_attn::Tier::Portable,
            TierArg::Subgroup => wgpu_flash_attn::Tier::SubgroupBroadcast,
            TierArg::Blocked | TierArg::BlockedF16 => wgpu_flash_attn::Tier::RegisterBlocked,
            TierArg::Coop => wgpu_flash_attn::Tier::CooperativeMatrix,
        }
    }

    /// Whether the tier computes its products in f16.
    pub fn f16_products(self) -> bool {
        self == TierArg::BlockedF16
    }

    /// `config` with this tier forced: f16 products for `blocked-f16`,
    /// none for the others (set either way, whatever the planner's default).
    pub fn apply(
        self,
        config: wgpu_flash_attn::AttentionConfig,
    ) -> wgpu_flash_attn::AttentionConfig {
        config.tier(self.tier()).f16_products(self.f16_products())
    }

    /// The forward plan of this tier for one call (`run`'s cases,
    /// `shader-stats`' kernels), as [`TierArg::apply`] configures it.
    pub fn plan(
        self,
        info: &wgpu_flash_attn::GpuInfo,
        shape: &AttentionShape,
        dtype: wgpu_flash_attn::DType,
    ) -> wgpu_flash_attn::Result<wgpu_flash_attn::ForwardPlan> {
        let config = self.apply(wgpu_flash_attn::AttentionConfig::new());
        wgpu_flash_attn::ForwardPlan::for_config(info, shape, dtype, &config)
    }

    /// How reports name this tier (`RegisterBlocked f16-products`).
    pub fn label(self) -> String {
        let products = products_suffix(self.f16_products());
        format!("{}{products}", crate::options_json::tier_name(self.tier()))
    }
}

/// How a kernel's name in reports says it runs f16 products.
pub fn products_suffix(f16_products: bool) -> &'static str {
    if f16_products { " f16-products" } else { "" }
}

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Impl {
    /// The tiled online-softmax kernel.
    Flash,
    /// Standard attention with the score matrix in device memory.
    Naive,
    /// The f64 CPU reference (rayon).
    Cpu,
    /// Linear attention (elu(x) + 1 features; causal with --causal): a
    /// different function from softmax attention, checked against its own
    /// f64 reference. Takes no window, scale or softcap.
    Linear,
    /// The backward pass (dQ, dK, dV) of the flash kernel after a forward,
    /// checked against the f64 reference backward; FLOPs counted as
    /// FlashAttention does (2.5 x the forward's). `run --backward` adds it.
    Backward,
}

impl std::fmt::Display for Impl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Impl::Flash => "flash",
            Impl::Naive => "naive",
            Impl::Cpu => "cpu",
            Impl::Linear => "linear",
            Impl::Backward => "backward",
        })
    }
}

/// One shape from flags.
#[derive(Debug, Clone, Args)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 1024)]
    pub seq_q: usize,
    /// Defaults to --seq-q.
    #[arg(long)]
    pub seq_kv: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub heads_q: usize,
    /// Defaults to --heads-q.
    #[arg(long)]
    pub heads_kv: Option<usize>,
    /// Elements per query and key head vector (multiples of 8 from 8 to
    /// 576).
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Elements per value (and output) head vector, e.g. 128 beside
    /// --head-dim 192 (DeepSeek MLA prefill). Defaults to --head-dim.
    #[arg(long, value_name = "N")]
    pub head_dim_v: Option<usize>,
}

impl ShapeArgs {
    pub fn shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            seq_q: self.seq_q,
            seq_kv: self.seq_kv.unwrap_or(self.seq_q),
            heads_q: self.heads_q,
            heads_kv: self.heads_kv.unwrap_or(self.heads_q),
            head_dim: self.head_dim,
            head_dim_v: self.head_dim_v.unwrap_or(self.head_dim),
        }
    }
}

/// Case name for a shape and options, e.g. "B1 H8/8 N2048x2048 d64 causal";
/// a value head dim of its own follows the query/key one: "d192/128".
pub fn case_name(shape: &AttentionShape, flags: &str) -> String {
    let heads = if shape.heads_kv == shape.heads_q {
        format!("H{}", shape.heads_q)
    } else {
        format!("H{}/{}", shape.heads_q, shape.heads_kv)
    };
    let seq = if shape.seq_q == shape.seq_kv {
        format!("N{}", shape.seq_q)
    } else {
        format!("N{}x{}", shape.seq_q, shape.seq_kv)
    };
    let dims = if shape.same_head_dims() {
        format!("d{}", shape.head_dim)
    } else {
        format!("d{}/{}", shape.head_dim, shape.head_dim_v)
    };
    format!("B{} {heads} {seq} {dims}{flags}", shape.batch)
}
