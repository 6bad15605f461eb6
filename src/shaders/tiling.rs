//! The tile sizes and code shapes of each kernel family: the fields of a
//! [`super::Specialization`].

use super::{DROPOUT, EMULATED_LANES, SUBGROUP_KV, storage_flags};
use crate::tensor::DType;

/// Tile sizes and code shape of the attention kernels: the flash kernel
/// and the naive baseline's matrix products share them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Keys per tile, a multiple of 4 (staged in workgroup memory unless
    /// `subgroup_kv`).
    pub block_n: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Expand the loops over head dim and rows in the WGSL text, for
    /// compilers that do not unroll them (llvmpipe).
    pub unroll: bool,
    /// K and V reach the invocations by subgroup broadcasts instead of
    /// workgroup memory; requires the SUBGROUP feature, `workgroup_size` at
    /// most the adapter's smallest subgroup size (so that the workgroup is
    /// one subgroup) and `unroll` (broadcast lanes must be constants).
    pub subgroup_kv: bool,
    /// Storage type of Q, K, V and O (arithmetic is f32 regardless).
    pub storage: DType,
    /// The forward applies attention dropout (DROPOUT; never set for the
    /// naive baseline or decoding, which refuse it).
    pub dropout: bool,
}

impl AttentionTiling {
    /// Names of the `// #if NAME` blocks this tiling keeps.
    pub(super) fn variant_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.subgroup_kv {
            flags.push(SUBGROUP_KV);
        }
        flags.extend(storage_flags(self.storage));
        if self.dropout {
            flags.push(DROPOUT);
        }
        flags
    }
}

/// Tile sizes of the register-blocked forward kernel
/// (shaders/flash_blocked.wgsl). A workgroup owns `row_lanes * rows` query
/// rows and visits keys in tiles of `4 * key_lanes`. When both lane counts
/// are even, invocation `lid` is key lane `(lid / 2) % key_lanes` and row
/// lane `lid / (2 key_lanes) * 2 + lid % 2`, so that neighbouring pairs
/// of invocations (`n`, `n ^ 1`: one key lane; `n`, `n ^ 2`: one row lane)
/// read one address of workgroup memory at a time; otherwise row lane
/// `lid / key_lanes` and key lane `lid % key_lanes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations along the query rows.
    pub row_lanes: u32,
    /// Invocations along the keys of a tile (four keys each) and along the
    /// value columns (every `key_lanes`-th vec4 each).
    pub key_lanes: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Storage type of Q, K, V and O.
    pub storage: DType,
    /// Q K^T and P V products in f16 on f16 tiles (F16_PRODUCTS; needs f16
    /// storage and SHADER_F16), else f32 arithmetic throughout.
    pub f16_products: bool,
    /// The forward applies attention dropout (DROPOUT).
    pub dropout: bool,
    /// The Q block's and the probabilities' rows lie an odd number of
    /// vec4s apart (`Q_STRIDE`, `P_STRIDE`), so that the row lanes of a
    /// subgroup read different banks of workgroup memory; the planner
    /// drops it only where the padding (a vec4 per row, each) would not
    /// fit the adapter's workgroup memory.
    pub pad_rows: bool,
    /// Passes over each key tile (`PASSES`): the scores take the head dim
    /// `passes` parts at a time and P V the keys likewise, so that only a
    /// part of K or V is staged at once: 1, or 2 for a caller's layout
    /// whose whole tile does not fit the workgroup memory (two more
    /// barriers a tile). Needs `head_dim / 4` a multiple of `passes *
    /// D_STEP` and `key_lanes` of `passes`.
    pub passes: u32,
}

impl BlockedTiling {
    /// The most staging loads an invocation keeps in flight: 8 vec4s,
    /// 32 registers beside its accumulators.
    pub const MAX_STAGE_BATCH: u32 = 8;

    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        self.row_lanes * self.key_lanes
    }
    /// Query rows per workgroup.
    pub fn block_m(&self) -> u32 {
        self.row_lanes * self.rows
    }
    /// Keys per tile.
    pub fn block_n(&self) -> u32 {
        4 * self.key_lanes
    }
    /// Output vec4s per row an invocation accumulates: every
    /// `key_lanes`-th of the row's `head_dim_v / 4`.
    pub fn columns(&self) -> u32 {
        // (A tiling the planner made has key lanes; a hand-made one with
        // none has no columns rather than a division by zero.)
        if self.key_lanes == 0 {
            return 0;
        }
        (self.head_dim_v / 4).div_ceil(self.key_lanes)
    }
    /// Head-dim vec4s one trip of the scores' loop takes (`D_STEP`,
    /// unrolled; head dims are multiples of 8, so it divides D4). Two
    /// halves the loop counter's cost per FMA and keeps the registers:
    /// NAK's 16x8x2 f32 kernel takes 144 with two, as with one, and 168
    /// with four.
    pub const D_STEP: u32 = 2;
    /// Loads each invocation keeps in flight while staging Q, K or V
    /// (`STAGE_BATCH`): its share of a K or V tile, at most
    /// [`Self::MAX_STAGE_BATCH`].
    pub fn stage_batch(&self) -> u32 {
        let passes = self.pass_count();
        let k_part = self.block_n() * (self.head_dim / 4 / passes);
        let v_part = self.block_n() / passes * (self.head_dim_v / 4);
        k_part
            .max(v_part)
            .div_ceil(self.workgroup_size().max(1))
            .min(Self::MAX_STAGE_BATCH)
    }
    /// `passes` as the kernel runs it (`PASSES`): a hand-made tiling with
    /// none runs one.
    pub(super) fn pass_count(&self) -> u32 {
        self.passes.max(1)
    }
    /// This layout's forms, in the order the planners prefer them: in one
    /// pass, then (up to `most_passes`, where the head dim and the key
    /// lanes divide) in more; each with its rows padded, then without.
    /// Never empty; the last is the smallest.
    pub(crate) fn forms(self, most_passes: u32) -> Vec<BlockedTiling> {
        (1..=most_passes.max(1))
            .filter(|&passes| {
                passes == 1
                    || (self.head_dim / 4).is_multiple_of(passes * Self::D_STEP)
                        && self.key_lanes.is_multiple_of(passes)
            })
            .flat_map(|passes| {
                [true, false].map(|pad_rows| BlockedTiling {
                    passes,
                    pad_rows,
                    ..self
                })
            })
            .collect()
    }
    /// vec4s of the tile that holds a pass's K (rows padded by one vec4,
    /// so that the key lanes read different banks), then V of a pass's
    /// keys.
    pub(super) fn kv_tile(&self) -> u32 {
        let passes = self.pass_count();
        (self.block_n() * (self.head_dim / 4 / passes + 1))
            .max(self.block_n() / passes * (self.head_dim_v / 4))
    }
    /// vec4s between the Q block's rows (`Q_STRIDE`): the head dim's,
    /// made odd with [`Self::pad_rows`].
    pub(super) fn q_stride(&self) -> u32 {
        (self.head_dim / 4) | u32::from(self.pad_rows)
    }
    /// vec4s between the probabilities' rows (`P_STRIDE`): one per key
    /// lane, made odd with [`Self::pad_rows`].
    pub(super) fn p_stride(&self) -> u32 {
        self.key_lanes | u32::from(self.pad_rows)
    }
    /// Workgroup memory the kernel declares: the Q block, the K/V tile,
    /// the probabilities (vec4s of f32, or of f16 with f16 products) and
    /// the per-row partials (f32).
    pub fn workgroup_bytes(&self) -> u64 {
        let block_m = u64::from(self.block_m());
        let key_lanes = u64::from(self.key_lanes);
        let vec4_bytes = if self.f16_products { 8 } else { 16 };
        vec4_bytes
            * (block_m * u64::from(self.q_stride())
                + u64::from(self.kv_tile())
                + block_m * u64::from(self.p_stride()))
            + 4 * block_m * key_lanes
    }
}

/// Tile sizes of the cooperative-matrix forward kernel
/// (shaders/flash_coop.wgsl): `row_tiles` x `key_tiles` matrices of
/// `size` x `size` per block, `workgroup_size` invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoopTiling {
    /// Query/key head dimension, a multiple of `size`.
    pub head_dim: u32,
    /// Value (and output) head dimension, a multiple of `size`.
    pub head_dim_v: u32,
    /// Rows and columns of every matrix (8 or 16; K = M = N).
    pub size: u32,
    /// Row tiles per block (`block_m = row_tiles * size`).
    pub row_tiles: u32,
    /// Key tiles per block (`block_n = key_tiles * size`).
    pub key_tiles: u32,
    /// Invocations per workgroup: `row_tiles` subgroups of the adapter's
    /// largest size (so that however the driver sizes its subgroups, each
    /// row tile has one), a multiple of `block_m`.
    pub workgroup_size: u32,
    /// Storage type of Q, K, V and O: f16 multiplies f16 matrices, f32
    /// f32 ones (both exact conversions of the stored values).
    pub storage: DType,
    /// The products run as scalar code on emulated 32-lane subgroups
    /// (`AdapterOptions::emulate_cooperative_matrices`, for testing the
    /// kernel on adapters without matrix units).
    pub emulated: bool,
    /// The forward applies attention dropout (DROPOUT) to the
    /// probabilities it stages for P V.
    pub dropout: bool,
}

impl CoopTiling {
    /// Invocations of one (real or emulated) subgroup the layout assumes.
    pub const EMULATED_LANES: u32 = EMULATED_LANES;

    /// Query rows per workgroup.
    pub fn block_m(&self) -> u32 {
        self.row_tiles * self.size
    }
    /// Keys per tile.
    pub fn block_n(&self) -> u32 {
        self.key_tiles * self.size
    }
    /// Invocations sharing one row in the softmax: `workgroup_size / block_m`.
    pub fn lanes_per_row(&self) -> u32 {
        self.workgroup_size / self.block_m()
    }
    /// Bytes of one matrix operand (Q, K, V, P) element.
    fn operand_bytes(&self) -> u64 {
        match self.storage {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Matrix columns of Q (and K): `head_dim / size`.
    pub fn q_tiles(&self) -> u32 {
        self.head_dim / self.size
    }
    /// Matrix columns of V and the output: `head_dim_v / size`.
    pub fn v_tiles(&self) -> u32 {
        self.head_dim_v / self.size
    }
    /// Q's matrix columns staged per pass through the K/V tile before the
    /// key loop: the most that divide [`Self::q_tiles`] and fit the tile
    /// (0 when not even one does, a layout the planner refuses).
    pub fn q_pass(&self) -> u32 {
        let room = self.block_n() * self.head_dim.max(self.head_dim_v);
        largest_divisor_at_most(self.q_tiles(), room / (self.block_m() * self.size))
    }
    /// Passes that stage Q: `q_tiles / q_pass` (1 for a layout without
    /// room, which the planner refuses).
    pub fn q_passes(&self) -> u32 {
        self.q_tiles() / self.q_pass().max(1)
    }
    /// The accumulators' matrix columns moved per pass through the score
    /// tile (to rescale them, to load a carried chunk, to write the
    /// output): the most that divide [`Self::v_tiles`] and fit its
    /// `key_tiles` columns.
    pub fn o_pass(&self) -> u32 {
        largest_divisor_at_most(self.v_tiles(), self.key_tiles)
    }
    /// Passes that move the accumulators: `v_tiles / o_pass` (at least 1).
    pub fn o_passes(&self) -> u32 {
        self.v_tiles() / self.o_pass().max(1)
    }
    /// Workgroup memory the kernel declares: the K/V tile and the
    /// probabilities as operands; the scores (with a spare row tile for
    /// subgroups past the block's rows), the row partials and four shared
    /// words (two used: every variable a multiple of 16 bytes, see
    /// shaders/flash_coop.wgsl) as 32-bit words. The emulation holds Q as operands instead of the
    /// spare tile (real subgroups hold Q in matrix registers).
    pub fn workgroup_bytes(&self) -> u64 {
        let (m, n) = (u64::from(self.block_m()), u64::from(self.block_n()));
        let (d, dv) = (u64::from(self.head_dim), u64::from(self.head_dim_v));
        let (q, spare) = if self.emulated {
            (m * d, 0)
        } else {
            (0, u64::from(self.size) * n)
        };
        self.operand_bytes() * (q + n * d.max(dv) + m * n)
            + 4 * (m * n + spare + m * u64::from(self.lanes_per_row()) + 4)
    }
}

/// The largest divisor of `n` that is at most `limit` (0 when `limit` is 0).
fn largest_divisor_at_most(n: u32, limit: u32) -> u32 {
    (1..=limit.min(n))
        .rev()
        .find(|k| n.is_multiple_of(*k))
        .unwrap_or(0)
}

/// Storage types of decoding's queries and output. `out` is the output
/// binding's type: the caller's when the kernel writes the output itself,
/// f32 when it writes partial results that the combine pass merges (and
/// stores in the caller's type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeIo {
    pub q: DType,
    pub out: DType,
}

impl DecodeIo {
    /// f32 queries and output.
    pub const F32: DecodeIo = DecodeIo {
        q: DType::F32,
        out: DType::F32,
    };
}

/// Which cache positions decoding's query tokens see: by position alone
/// (causal, windows, the split's keys), or, with [`DecodeMask::TokenTree`],
/// also by their sequence's speculative token tree (TREE_MASK;
/// `DecodeOptions::token_trees`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeMask {
    Positions,
    TokenTree,
}

/// Tile sizes of one linear attention pass (shaders/linear_attention.wgsl).
/// Fields a pass does not read hold fixed valid values (see
/// `LinearPlan::specialization`), so that calls differing only in them
/// share its pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearTiling {
    /// Query/key head dim, a multiple of 8.
    pub head_dim: u32,
    /// Value head dim, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations per workgroup of this pass.
    pub workgroup_size: u32,
    /// Keys staged per tile (the state pass; the causal output pass).
    pub block_n: u32,
    /// State pass: row quads of S per invocation (`row_quads *
    /// workgroup_size = head_dim / 4`).
    pub row_quads: u32,
    /// State pass: value vec4 columns per workgroup (divides
    /// `head_dim_v / 4`).
    pub columns4: u32,
    /// Output pass: query rows per invocation.
    pub rows: u32,
    /// Output pass: state rows staged per tile (a multiple of 4 dividing
    /// `head_dim`).
    pub state_rows: u32,
    /// The output pass adds each chunk's own keys (causal calls).
    pub causal: bool,
    /// Shared values reach the lanes by subgroup broadcasts; the workgroup
    /// is one subgroup of the adapter's smallest size, and loops are
    /// unrolled (broadcast lanes must be constants).
    pub subgroup: bool,
    /// Storage type of Q, K, V and O (states are f32).
    pub storage: DType,
}

/// The passes of linear attention: the three of a call in dispatch order,
/// then the one-token state update of recurrent decoding (which precedes a
/// non-causal output pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearPass {
    States,
    Scan,
    Outputs,
    Update,
}

impl LinearPass {
    #[cfg(test)]
    pub const ALL: [LinearPass; 4] = [
        LinearPass::States,
        LinearPass::Scan,
        LinearPass::Outputs,
        LinearPass::Update,
    ];
}

/// Tile sizes of the backward kernels (shaders/flash_backward.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackwardTiling {
    /// Query/key head dims the pipeline holds: a power of two from 8 to
    /// 256, at least the call's head dim (the rest loads as zero), so that
    /// one pipeline serves every head dim of its range.
    pub head_dim_capacity: u32,
    /// The same for the value head dim (V, O, dO, dV).
    pub head_dim_v_capacity: u32,
    /// Invocations per workgroup.
    pub workgroup_size: u32,
    /// Keys (key pass) or query rows (query pass) per invocation.
    pub rows: u32,
    /// Query rows (key pass) or keys (query pass) per staged tile.
    pub block: u32,
    /// Expand the loops over head dim, rows and staging in the WGSL text.
    pub unroll: bool,
    /// Staged rows reach the lanes by subgroup broadcasts: the workgroup is
    /// one subgroup of the adapter's smallest size, and `unroll` holds.
    pub subgroup: bool,
    /// Storage type of every tensor (arithmetic is f32).
    pub storage: DType,
    /// The gradient passes regenerate the forward's dropout mask
    /// (DROPOUT; the row-delta and sink passes never do).
    pub dropout: bool,
}

/// Tile sizes of the register-blocked gradient passes
/// (shaders/flash_backward_blocked.wgsl). Invocation `lid` is key lane
/// `lid / row_lanes` and row lane `lid % row_lanes`; a block holds `4 *
/// key_lanes` keys and `row_lanes * rows` query rows, the key pass owning
/// its keys' gradients and the query pass its rows'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockedBackwardTiling {
    /// Query/key head dimension, a multiple of 8.
    pub head_dim: u32,
    /// Value head dimension, a multiple of 8.
    pub head_dim_v: u32,
    /// Invocations along the keys of a block (four keys each), and along
    /// dQ's columns.
    pub key_lanes: u32,
    /// Invocations along the query rows of a block, and along dK's and
    /// dV's columns.
    pub row_lanes: u32,
    /// Query rows per invocation.
    pub rows: u32,
    /// Storage type of every tensor (arithmetic is f32).
    pub storage: DType,
    /// The passes regenerate the forward's dropout mask (DROPOUT).
    pub dropout: bool,
}

impl BlockedBackwardTiling {
    /// Invocations per workgroup.
    pub fn workgroup_size(&self) -> u32 {
        self.key_lanes * self.row_lanes
    }
    /// Keys per block (the key pass's workgroup, the query pass's step).
    pub fn block_n(&self) -> u32 {
        4 * self.key_lanes
    }
    /// Query rows per block (the query pass's workgroup, the key pass's
    /// step).
    pub fn block_m(&self) -> u32 {
        self.row_lanes * self.rows
    }
    /// Workgroup memory the passes declare: K and V of a key block and Q
    /// and dO of a query block (each row one vec4 longer), per row its two
    /// statistics (and with dropout its hash state), and two vec4s of P
    /// and dX per (row, key lane).
    pub fn workgroup_bytes(&self) -> u64 {
        let (d4, dv4) = (u64::from(self.head_dim / 4), u64::from(self.head_dim_v / 4));
        let (block_n, block_m) = (u64::from(self.block_n()), u64::from(self.block_m()));
        let vec4s =
            (block_n + block_m) * (d4 + 1 + dv4 + 1) + 2 * block_m * u64::from(self.key_lanes);
        let row_words = if self.dropout { 3 } else { 2 };
        16 * vec4s + 4 * row_words * block_m
    }
}

/// The passes of the backward, in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackwardPass {
    /// D = rowsum(dO * O).
    Deltas,
    /// dK and dV.
    Keys,
    /// dQ.
    Queries,
    /// The sinks' gradients (calls with sinks only).
    Sinks,
}

impl BackwardPass {
    pub const ALL: [BackwardPass; 4] = [
        BackwardPass::Deltas,
        BackwardPass::Keys,
        BackwardPass::Queries,
        BackwardPass::Sinks,
    ];
}
