//! Attention options and their exact semantics, shared by the GPU path and
//! the CPU reference.

use std::ops::Range;

use crate::dropout::Dropout;
use crate::error::{Error, Result};

/// The dimensions of one attention call.
///
/// Q is `[batch, seq_q, heads_q, head_dim]`, K is
/// `[batch, seq_kv, heads_kv, head_dim]`, V is
/// `[batch, seq_kv, heads_kv, head_dim_v]` and O is
/// `[batch, seq_q, heads_q, head_dim_v]`. The value head dim equals the
/// query/key one except in models that size them apart (DeepSeek's MLA:
/// 192 and 128 in prefill); the default scale follows `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query tokens per sequence.
    pub seq_q: usize,
    /// Key/value tokens per sequence.
    pub seq_kv: usize,
    /// Query heads; a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads; fewer than `heads_q` is grouped-query attention.
    pub heads_kv: usize,
    /// Elements per query and key head vector (see [`SUPPORTED_HEAD_DIMS`]).
    pub head_dim: usize,
    /// Elements per value (and output) head vector (see
    /// [`SUPPORTED_HEAD_DIMS`]); usually `head_dim`.
    pub head_dim_v: usize,
}

impl AttentionShape {
    /// Self-attention with as many KV heads as query heads.
    pub fn self_attention(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        AttentionShape {
            batch,
            seq_q: seq,
            seq_kv: seq,
            heads_q: heads,
            heads_kv: heads,
            head_dim,
            head_dim_v: head_dim,
        }
    }

    /// The same shape with values (and outputs) of `head_dim_v` elements.
    pub fn with_head_dim_v(mut self, head_dim_v: usize) -> Self {
        self.head_dim_v = head_dim_v;
        self
    }

    /// Shape of Q: `[batch, seq_q, heads_q, head_dim]`.
    pub fn q_shape(&self) -> crate::TensorShape {
        crate::TensorShape::new(self.batch, self.seq_q, self.heads_q, self.head_dim)
    }

    /// Shape of K: `[batch, seq_kv, heads_kv, head_dim]`.
    pub fn k_shape(&self) -> crate::TensorShape {
        crate::TensorShape::new(self.batch, self.seq_kv, self.heads_kv, self.head_dim)
    }

    /// Shape of V: `[batch, seq_kv, heads_kv, head_dim_v]`.
    pub fn v_shape(&self) -> crate::TensorShape {
        crate::TensorShape::new(self.batch, self.seq_kv, self.heads_kv, self.head_dim_v)
    }

    /// Shape of O: `[batch, seq_q, heads_q, head_dim_v]`.
    pub fn o_shape(&self) -> crate::TensorShape {
        crate::TensorShape::new(self.batch, self.seq_q, self.heads_q, self.head_dim_v)
    }

    /// Whether values are as wide as queries and keys.
    pub fn same_head_dims(&self) -> bool {
        self.head_dim == self.head_dim_v
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        // 0 for a shape without KV heads (which every call refuses).
        self.heads_q.checked_div(self.heads_kv).unwrap_or(0)
    }

    /// Forward FLOPs actually needed under `config`: 2 per (query, visible
    /// key, element) of QK^T (`head_dim`) and of PV (`head_dim_v`). Counts
    /// only visible keys, so causal and windowed calls get credit only for
    /// the work they must do.
    pub fn flops(&self, config: &AttentionConfig) -> f64 {
        // In f64: a shape past usize (which every call refuses) counts
        // rather than overflows.
        let f = |n: usize| n as f64;
        let visible: f64 = (0..self.seq_q)
            .map(|row| f(config.visible_keys(row, self.seq_q, self.seq_kv).len()))
            .sum();
        2.0 * f(self.batch) * f(self.heads_q) * (f(self.head_dim) + f(self.head_dim_v)) * visible
    }

    /// Bytes of the whole score matrix, `[batch, heads_q, seq_q, seq_kv]`
    /// f32 with rows padded to vec4s, as standard attention (the naive
    /// baseline) holds it.
    pub fn score_matrix_bytes(&self) -> u64 {
        // Saturating: a count past u64 is "too large" wherever it is used.
        let row_bytes = (self.seq_kv.div_ceil(4) as u64).saturating_mul(16);
        [self.batch, self.heads_q, self.seq_q]
            .into_iter()
            .fold(row_bytes, |bytes, n| bytes.saturating_mul(n as u64))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("seq_q", self.seq_q),
            ("seq_kv", self.seq_kv),
            ("heads_q", self.heads_q),
            ("heads_kv", self.heads_kv),
            ("head_dim", self.head_dim),
            ("head_dim_v", self.head_dim_v),
        ];
        if dims.iter().any(|(_, n)| *n == 0) {
            return Err(Error::ZeroDimension {
                tensor: "attention shape",
                shape: [
                    self.batch,
                    self.seq_q.min(self.seq_kv),
                    self.heads_q.min(self.heads_kv),
                    self.head_dim.min(self.head_dim_v),
                ],
            });
        }
        // Byte counts must not wrap around (the reference and the GPU path
        // size buffers from them).
        crate::tensor::check_shape("q", self.q_shape())?;
        crate::tensor::check_shape("k", self.k_shape())?;
        crate::tensor::check_shape("v", self.v_shape())?;
        crate::tensor::check_shape("out", self.o_shape())?;
        // The kernels place rows and keys (causal diagonal, windows, a
        // loop's last step past them) in i32: see MAX_SEQUENCE_LEN.
        if self.seq_q.max(self.seq_kv) > MAX_SEQUENCE_LEN {
            return Err(Error::ShapeOverflow {
                tensor: "sequence (at most MAX_SEQUENCE_LEN = 2^29 positions)",
                shape: [self.batch, self.seq_q, self.seq_kv, self.heads_q],
            });
        }
        if !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::HeadsNotDivisible {
                heads_q: self.heads_q,
                heads_kv: self.heads_kv,
            });
        }
        for got in [self.head_dim, self.head_dim_v] {
            if !is_supported_head_dim(got) {
                return Err(Error::HeadDimUnsupported {
                    got,
                    supported: SUPPORTED_HEAD_DIMS,
                });
            }
        }
        Ok(())
    }
}

/// Human-readable list of supported head dims (query/key and value alike;
/// the widest need workgroup memory the adapter may lack, a typed
/// [`Error::WorkgroupMemory`] then).
pub const SUPPORTED_HEAD_DIMS: &str = "multiples of 8 from 8 to 576";

/// The longest sequence (query rows, keys, cached tokens) the kernels
/// take: 2^29 positions. They hold positions in i32, and a position plus
/// a window (at most two sequence lengths) or a loop's last step past its
/// bound (at most 2^16) must not wrap around: below 2^31 with this limit,
/// which is what lets the kernels' loops be proven finite (README,
/// "How the kernel adapts to the adapter": the loop counters).
pub const MAX_SEQUENCE_LEN: usize = 1 << 29;

/// The widest head dim the kernels take (Gemma's 512, DeepSeek MLA's 576).
pub const MAX_HEAD_DIM: usize = 576;

/// Whether the kernels handle `head_dim`: a multiple of 8 from 8 to 576.
pub fn is_supported_head_dim(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (8..=MAX_HEAD_DIM).contains(&head_dim)
}

/// ALiBi slopes: the bias added to score `(i, j)` is `-slope * |pos_i - j|`,
/// `pos_i` being query row `i`'s position on the key axis.
#[derive(Debug, Clone, PartialEq)]
pub enum Alibi {
    /// One slope per query head, `[heads_q]`.
    PerHead(Vec<f32>),
    /// One slope per batch entry and query head, `[batch, heads_q]`.
    PerBatchHead(Vec<f32>),
}

impl Alibi {
    /// The slopes of the ALiBi paper for `heads` heads: the geometric
    /// sequence starting at `2^(-8/n)` for the nearest power of two `n`,
    /// interleaved with the next power's odd terms when `heads` is not one.
    pub fn standard_slopes(heads: usize) -> Vec<f32> {
        fn powers(n: usize) -> Vec<f32> {
            let start = 2f64.powf(-8.0 / n as f64);
            (1..=n).map(|i| start.powi(i as i32) as f32).collect()
        }
        let lower = heads.next_power_of_two() / if heads.is_power_of_two() { 1 } else { 2 };
        let mut slopes = powers(lower);
        if lower < heads {
            slopes.extend(powers(2 * lower).into_iter().step_by(2).take(heads - lower));
        }
        slopes
    }

    /// The slopes, in their layout's order.
    pub fn slopes(&self) -> &[f32] {
        match self {
            Alibi::PerHead(s) | Alibi::PerBatchHead(s) => s,
        }
    }

    /// Slope for batch entry `b`, query head `h`.
    pub fn slope(&self, b: usize, h: usize, heads_q: usize) -> f32 {
        match self {
            Alibi::PerHead(s) => s[h],
            Alibi::PerBatchHead(s) => s[b * heads_q + h],
        }
    }

    fn validate(&self, shape: &AttentionShape) -> Result<()> {
        let (expected, layout) = match self {
            Alibi::PerHead(_) => (shape.heads_q, "[heads_q]"),
            Alibi::PerBatchHead(_) => (shape.batch * shape.heads_q, "[batch, heads_q]"),
        };
        if self.slopes().len() != expected {
            return Err(Error::AlibiSlopes {
                expected: expected.to_string(),
                layout,
                got: self.slopes().len(),
            });
        }
        if let Some((index, &value)) = self
            .slopes()
            .iter()
            .enumerate()
            .find(|(_, s)| !s.is_finite())
        {
            return Err(Error::AlibiSlopeNotFinite { index, value });
        }
        Ok(())
    }
}

/// Options of an attention call. Build with the methods:
///
/// ```
/// use wgpu_flash_attn::AttentionConfig;
/// let config = AttentionConfig::new().causal(true).window(Some(256), None);
/// ```
///
/// Semantics (the CPU reference implements exactly these):
/// - Query row `i` sits at key position `pos_i = i + seq_kv - seq_q`
///   (bottom-right alignment, as FlashAttention; PyTorch's `is_causal`
///   aligns top-left instead, which differs when `seq_q != seq_kv`).
/// - Row `i` sees key `j` iff `pos_i - left <= j <= pos_i + right`, with
///   `None` meaning unbounded on that side. `causal` is `right = 0`
///   (intersected with any window).
/// - Scores are `scale * q.k`; with a softcap `c`, `c * tanh(score / c)`;
///   then the ALiBi bias `-slope * |pos_i - j|` is added.
/// - With attention sinks, head `h`'s sink logit `sinks[h]` (in the units
///   of the final scores, not scaled, capped or biased itself) joins each
///   row's softmax denominator as a key with no value: weights are
///   `exp(s_j) / (exp(sink) + sum_k exp(s_k))` and the logsumexp includes it.
/// - A row that sees no key outputs zeros and logsumexp `+inf` (with a sink:
///   zeros and logsumexp `sinks[h]`).
/// - Every finite score is handled exactly, however large its magnitude
///   (an additive bias of `f32::MIN` on every key of a row gives the average
///   of V, as the definition says); scores are f32, so one past f32's range
///   is infinite: `-inf` hides the key, `+inf` gives NaN, as in PyTorch.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct AttentionConfig {
    /// Each query sees only keys at or before its position (right window side 0).
    pub causal: bool,
    /// Keys before the query's position it may see; `None` = unbounded. Must be >= 0.
    pub window_left: Option<i64>,
    /// Keys after the query's position it may see; `None` = unbounded. Must be >= 0.
    pub window_right: Option<i64>,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Softcap `c`: scores become `c * tanh(score / c)`; `None` = no cap. Must be finite and > 0.
    pub softcap: Option<f32>,
    /// ALiBi bias slopes; `None` = no bias.
    pub alibi: Option<Alibi>,
    /// Attention sinks: one logit per query head, `[heads_q]`, finite;
    /// `None` = no sinks.
    pub sinks: Option<Vec<f32>>,
    /// Force a kernel tier; `None` picks the best the adapter offers.
    pub tier: Option<Tier>,
    /// The forward's Q K^T and P V products from f16 operands (f16
    /// storage, the register-blocked tier, adapters with `SHADER_F16`): Q,
    /// K, V and the probabilities stay f16 in workgroup memory (half the
    /// tiles' bytes), each product of two f16 values is exact in f32 and
    /// the products are summed in f32 (f16 operands, f32 accumulation, as
    /// on matrix units); softmax statistics stay f32. What rounds is the
    /// probabilities, to f16 before `P V`: the cooperative-matrix tier's
    /// bound (docs/semantics.md). `Some(true)` forces it (and the
    /// register-blocked tier), `Some(false)` turns it off, `None` (the
    /// default) leaves it to the planner, which uses it on NVIDIA GPUs,
    /// where it measured 1.2-1.5x faster (an H200, BENCHMARKS.md), and
    /// nowhere else yet ([`ForwardPlan::f16_products`] says what a plan
    /// does).
    ///
    /// [`ForwardPlan::f16_products`]: crate::ForwardPlan::f16_products
    pub f16_products: Option<bool>,
    /// The register-blocked kernels' workgroup layout, instead of the
    /// planner's (a tuning knob: `flash-bench run --blocked-layout` times
    /// several in one run); forces that tier, in the forward and in the
    /// backward (whose key blocks are `4 * key_lanes` keys and query blocks
    /// `row_lanes * rows` rows). In the forward, a layout whose whole key
    /// tile does not fit the workgroup memory runs each tile in two passes
    /// (half of K's head dim, then half of V's keys, at a time;
    /// `BlockedTiling::passes`) where the head dim and the key lanes allow.
    /// `None`: the planner's.
    pub blocked_layout: Option<BlockedLayout>,
    /// The cooperative-matrix forward's block, instead of the planner's (a
    /// tuning knob: `flash-bench run --coop-layout` times several in one
    /// run); forces that tier in the forward. The backward, which has no
    /// matrix tier, plans as without it. `None`: the planner's.
    pub coop_layout: Option<CoopLayout>,
    /// Dropout of the attention probabilities (training): `None`, or a
    /// rate of 0, drops nothing. See [`Dropout`]; the backward regenerates
    /// the forward's mask from the same seed.
    pub dropout: Option<Dropout>,
}

/// A workgroup layout of the register-blocked forward (`Tier::RegisterBlocked`):
/// `row_lanes x key_lanes` invocations own `row_lanes * rows` query rows
/// and walk the keys in tiles of `4 * key_lanes`; each invocation computes
/// a `rows x 4` block of scores and a `rows x ceil(head_dim_v / 4 /
/// key_lanes)` block of output vec4s. Lanes 1 to 256 each, rows 1 to 8
/// (`Error::InvalidBlockedLayout` otherwise); the workgroup must fit the
/// adapter's invocations and workgroup memory (`WorkgroupInvocations`,
/// `WorkgroupMemory` with the numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedLayout {
    /// Invocations along the query rows.
    pub row_lanes: u32,
    /// Invocations along a tile's keys (four each) and the value columns.
    pub key_lanes: u32,
    /// Query rows per invocation.
    pub rows: u32,
}

impl BlockedLayout {
    /// The widest lane count along either axis.
    pub const MAX_LANES: u32 = 256;
    /// The most query rows per invocation (the kernel expands its row
    /// loops, so each row's scores and outputs stay in registers).
    pub const MAX_ROWS: u32 = 8;
}

impl std::fmt::Display for BlockedLayout {
    /// `ROW_LANESxKEY_LANESxROWS`, as `flash-bench --blocked-layout` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.row_lanes, self.key_lanes, self.rows)
    }
}

/// A block of the cooperative-matrix forward (`Tier::CooperativeMatrix`):
/// `row_tiles` matrix-sized row tiles (one subgroup each, which keeps the
/// tile's queries and output in its matrix registers) walk the keys in
/// tiles of `key_tiles` matrices. Row tiles 1 to 8, and at most 64 keys a
/// tile; the block must fit the adapter's workgroup memory and
/// invocations (`Error::TierUnavailable` with the numbers otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoopLayout {
    /// Matrix-sized tiles of query rows per block.
    pub row_tiles: u32,
    /// Matrix-sized tiles of keys per key tile.
    pub key_tiles: u32,
}

impl std::fmt::Display for CoopLayout {
    /// `ROW_TILESxKEY_TILES`, as `flash-bench --coop-layout` takes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.row_tiles, self.key_tiles)
    }
}

/// How a kernel spreads its work over the invocations of a workgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Tiles staged in workgroup memory, with barriers. Runs everywhere.
    Portable,
    /// The workgroup is one subgroup: its size is the adapter's smallest
    /// subgroup size, so it fits whatever size the driver picks. Each lane
    /// loads a share of the keys and subgroup broadcasts hand every element
    /// to all lanes; no workgroup memory, no barriers. Offered with the
    /// SUBGROUP feature and a smallest subgroup size that is a power of two
    /// from 4 to 128, on Vulkan, Metal and DX12 (wgpu's GL backend has no
    /// subgroups). The forward's default on CPU adapters with subgroups
    /// (and where no register-blocked block fits). Decoding has a subgroup tier under the same conditions,
    /// with three lane layouts ([`crate::DecodeLanes`]): lanes split the
    /// head dim and `subgroupAdd` completes the dot products (GPUs), each
    /// lane takes its own keys (CPU adapters), or each lane scores its own
    /// key of a tile staged in workgroup memory (forced only, so far).
    SubgroupBroadcast,
    /// The forward kernel for hardware GPUs (`shaders/flash_blocked.wgsl`):
    /// 32-128 invocations share a block of 16-64 query rows staged in
    /// workgroup memory, and each computes a micro-tile of scores (4 rows
    /// by 4 keys) and of the output (4 rows by a slice of the value
    /// columns), so every value read from workgroup memory feeds several
    /// FMAs and no invocation holds a whole head vector. The default for
    /// the forward (masked or not) on discrete and integrated GPUs where its
    /// tiles fit the workgroup memory; runs everywhere when forced (no
    /// feature needed). The backward has register-blocked gradient passes
    /// too (`shaders/flash_backward_blocked.wgsl`: blocks of keys and query
    /// rows, each invocation owning a micro-tile of scores and of dK, dV or
    /// dQ): the default on hardware GPUs where they fit (3.8x faster than
    /// the per-key passes on an H200), and run anywhere when forced (with
    /// this tier or a [`AttentionConfig::blocked_layout`]). Decoding and
    /// linear attention have no such kernel: forcing it there is
    /// `TierUnavailable`; the naive baseline's products then use the best
    /// per-row tier.
    RegisterBlocked,
    /// The forward kernel on the adapter's matrix units
    /// (`shaders/flash_coop.wgsl`: tensor cores through
    /// `VK_KHR_cooperative_matrix`, Apple's simdgroup matrices): S = Q K^T
    /// and O += P V as 16x16 (or 8x8) matrix products with f32 results,
    /// softmax in f32. Offered for f16 storage (f16 matrices) and f32
    /// storage (where the adapter multiplies f32 matrices, e.g. Metal's
    /// 8x8) on a device with wgpu's `EXPERIMENTAL_COOPERATIVE_MATRIX`,
    /// `SUBGROUP` and (for f16) `SHADER_F16` features, which the crate
    /// requests only when asked ([`crate::AdapterOptions::cooperative_matrix`]).
    /// Where it is offered it is the forward's default on CPU adapters
    /// (lavapipe from Mesa 26.1); on hardware GPUs it runs only when
    /// forced, until its tests pass on one (README, "Kernel tiers": on an
    /// H100 it computed wrong outputs before a fix not yet run there).
    /// Forcing it where it is not offered is `TierUnavailable` with the
    /// reason.
    CooperativeMatrix,
}

impl AttentionConfig {
    /// Default options: no causal mask or window, scale `1 / sqrt(head_dim)`, no softcap or ALiBi,
    /// tier chosen by the planner.
    pub fn new() -> Self {
        Self::default()
    }
    /// Forces a kernel tier (tests, benchmarks); a tier the adapter lacks
    /// is a typed error at call time.
    pub fn tier(mut self, tier: Tier) -> Self {
        self.tier = Some(tier);
        self
    }
    /// Computes the forward's products from f16 operands, or not, instead
    /// of as the planner chooses (see [`AttentionConfig::f16_products`]);
    /// `true` forces the register-blocked tier.
    pub fn f16_products(mut self, f16_products: bool) -> Self {
        self.f16_products = Some(f16_products);
        self
    }
    /// Runs the register-blocked kernel with this workgroup layout (see
    /// [`AttentionConfig::blocked_layout`]); forces that tier.
    pub fn blocked_layout(mut self, layout: BlockedLayout) -> Self {
        self.blocked_layout = Some(layout);
        self
    }
    /// Runs the cooperative-matrix forward with this block (see
    /// [`AttentionConfig::coop_layout`]); forces that tier in the forward.
    pub fn coop_layout(mut self, layout: CoopLayout) -> Self {
        self.coop_layout = Some(layout);
        self
    }
    /// Sets causal masking (bottom-right aligned, see above).
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sliding window `(left, right)` in keys; `None` = unbounded side.
    pub fn window(mut self, left: Option<i64>, right: Option<i64>) -> Self {
        self.window_left = left;
        self.window_right = right;
        self
    }
    /// Sets the softmax scale (default `1 / sqrt(head_dim)`); must be finite and non-zero.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Sets the softcap `cap`: scores become `cap * tanh(score / cap)`.
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    /// Drops each attention probability with probability `p` (and scales
    /// the kept ones by `1 / (1 - p)`), with the mask drawn from `seed`
    /// (see [`Dropout`]).
    pub fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = Some(Dropout::new(p, seed));
        self
    }
    /// The dropout in effect: `None` when the config drops nothing.
    pub fn active_dropout(&self) -> Option<Dropout> {
        self.dropout.filter(Dropout::is_active)
    }
    /// Adds ALiBi biases with these slopes.
    pub fn alibi(mut self, alibi: Alibi) -> Self {
        self.alibi = Some(alibi);
        self
    }

    /// Adds attention sinks (gpt-oss, StreamingLLM): one logit per query
    /// head, `[heads_q]`, that joins every row's softmax denominator and
    /// contributes no value (see above).
    pub fn sinks(mut self, sinks: Vec<f32>) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// The per-head values the kernels read from one table: the ALiBi
    /// slopes (in their layout) followed by the sinks (from
    /// [`AttentionConfig::sink_offset`]). `None` when the call has neither.
    pub(crate) fn head_table(&self) -> Option<Vec<f32>> {
        if self.alibi.is_none() && self.sinks.is_none() {
            return None;
        }
        let slopes = self.alibi.as_ref().map_or(&[][..], Alibi::slopes);
        Some(
            slopes
                .iter()
                .chain(self.sinks.iter().flatten())
                .copied()
                .collect(),
        )
    }

    /// Where the sinks start in [`AttentionConfig::head_table`]: after the
    /// ALiBi slopes.
    pub(crate) fn sink_offset(&self) -> usize {
        self.alibi.as_ref().map_or(0, |alibi| alibi.slopes().len())
    }

    /// The scale in effect for `head_dim`.
    pub fn effective_scale(&self, head_dim: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (head_dim as f32).sqrt())
    }

    /// Window sides in effect, causal folded in. Only meaningful after
    /// [`AttentionConfig::validate`] (sides are then non-negative).
    pub fn effective_window(&self) -> (Option<u64>, Option<u64>) {
        let left = self.window_left.map(|l| l.max(0) as u64);
        let mut right = self.window_right.map(|r| r.max(0) as u64);
        if self.causal {
            right = Some(0);
        }
        (left, right)
    }

    /// Keys visible to query row `row`, as a (possibly empty) range.
    /// Saturating: a window side as wide as `i64::MAX` is the same as an
    /// unbounded one.
    pub fn visible_keys(&self, row: usize, seq_q: usize, seq_kv: usize) -> Range<usize> {
        let pos = (row as i128) + (seq_kv as i128) - (seq_q as i128);
        let (left, right) = self.effective_window();
        let lo = left.map_or(0, |l| (pos - l as i128).max(0));
        let hi = right.map_or(seq_kv as i128, |r| {
            (pos + r as i128 + 1).clamp(0, seq_kv as i128)
        });
        let lo = lo.min(seq_kv as i128);
        lo as usize..(hi.max(lo)) as usize
    }

    /// Checks the options against a shape.
    pub fn validate(&self, shape: &AttentionShape) -> Result<()> {
        shape.validate()?;
        if let Some(scale) = self.scale
            && (!scale.is_finite() || scale == 0.0)
        {
            return Err(Error::InvalidScale(scale));
        }
        if let Some(cap) = self.softcap
            && (!cap.is_finite() || cap <= 0.0)
        {
            return Err(Error::InvalidSoftcap(cap));
        }
        if self.window_left.is_some_and(|l| l < 0) || self.window_right.is_some_and(|r| r < 0) {
            return Err(Error::InvalidWindow {
                left: self.window_left,
                right: self.window_right,
            });
        }
        if let Some(alibi) = &self.alibi {
            alibi.validate(shape)?;
        }
        if let Some(dropout) = &self.dropout {
            dropout.validate()?;
        }
        if let Some(sinks) = &self.sinks {
            if sinks.len() != shape.heads_q {
                return Err(Error::SinksLength {
                    heads_q: shape.heads_q,
                    got: sinks.len(),
                });
            }
            if let Some((head, &value)) = sinks.iter().enumerate().find(|(_, s)| !s.is_finite()) {
                return Err(Error::SinkNotFinite { head, value });
            }
        }
        Ok(())
    }
}
