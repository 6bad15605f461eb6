//! A kernel's specialization (the compile-time constants that select one
//! pipeline) and the WGSL text it becomes: variant flags, generated
//! constants, unrolled loops.

use std::fmt::Write as _;

use super::template::{ShaderSourceError, select_variants, unroll_loops};
use super::tiling::{
    AttentionTiling, BackwardPass, BackwardTiling, BlockedBackwardTiling, BlockedTiling,
    CoopTiling, DecodeIo, DecodeMask, LinearPass, LinearTiling,
};
use super::{
    BLOCK_N_CANDIDATES, BLOCKED_BACKWARD, CAUSAL, COOP_EMULATED, COOP_F32, COOP8, DROPOUT,
    EMULATED_LANES, F16_PRODUCTS, KEY_LANES, KEY_TILES, Kernel, MASK, SUBGROUP_BROADCAST,
    SUBGROUP_KV, ShaderOverrides, TREE_MASK, cache_flags, codec_flags, io_flags, storage_flags,
};
use crate::decode::DecodeLanes;
use crate::kv_cache::KvDType;
use crate::tensor::DType;

/// Compile-time constants that select one pipeline of a kernel family. Two
/// calls with equal specializations share a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Specialization {
    FlashForward(AttentionTiling),
    /// The forward pass with an attention mask.
    FlashMasked(AttentionTiling),
    /// The register-blocked forward pass.
    FlashBlocked(BlockedTiling),
    /// The register-blocked forward pass with an attention mask.
    FlashBlockedMasked(BlockedTiling),
    /// The cooperative-matrix forward pass.
    FlashCoop(CoopTiling),
    /// The cooperative-matrix forward pass with an attention mask.
    FlashCoopMasked(CoopTiling),
    /// One pass of the naive baseline.
    Naive {
        pass: NaivePass,
        tiling: AttentionTiling,
    },
    /// Split-KV decoding over a cache of the given storage type, with
    /// queries and output of the types in [`DecodeIo`] (the tiling's own
    /// storage stays f32). With `subgroup_kv`, lanes split the head dim or
    /// take their own keys (the third field; the portable tier holds
    /// `HeadDim` there and ignores it) and `rows` counts the workgroup's
    /// rows (not each lane's). The last field says whether a token tree
    /// hides draft keys too.
    Decode(AttentionTiling, KvDType, DecodeLanes, DecodeIo, DecodeMask),
    /// One invocation per output vec4 (Combine, storing `out`), element
    /// pair (Rope) or appended head vector (KvAppend, storing the cache's
    /// type).
    Combine {
        workgroup_size: u32,
        out: DType,
    },
    Rope {
        workgroup_size: u32,
    },
    KvAppend {
        workgroup_size: u32,
        dtype: KvDType,
    },
    /// One invocation per head vector of a cache copied into dense f32
    /// K and V (reading the cache's type).
    KvGather {
        workgroup_size: u32,
        dtype: KvDType,
    },
    /// One pass of linear attention.
    Linear {
        pass: LinearPass,
        tiling: LinearTiling,
    },
    /// One pass of the backward.
    Backward {
        pass: BackwardPass,
        tiling: BackwardTiling,
    },
    /// A register-blocked gradient pass (`Keys` or `Queries`).
    BackwardBlocked {
        pass: BackwardPass,
        tiling: BlockedBackwardTiling,
    },
}

/// The three passes of the naive baseline, in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NaivePass {
    Scores,
    Softmax,
    Values,
}

impl NaivePass {
    pub const ALL: [NaivePass; 3] = [NaivePass::Scores, NaivePass::Softmax, NaivePass::Values];
}

impl Specialization {
    /// An upper bound on the loop iterations one invocation runs when the
    /// kernel visits `keys` keys (each loop's exit test counted as one), for
    /// adapters that stop shaders after a fixed number of them (llvmpipe,
    /// see `Gpu::loop_budget`). Loops that `source` unrolls do not count.
    /// `None` for kernels without a key loop.
    pub fn loop_trips(&self, keys: u64) -> Option<u64> {
        if let Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) =
            self
        {
            return Some(blocked_loop_trips(tiling, keys));
        }
        if let Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) = self {
            return Some(coop_loop_trips(tiling, keys));
        }
        let tiling = self.attention_tiling()?;
        let block_n = u64::from(tiling.block_n);
        let d4 = u64::from(tiling.head_dim / 4);
        let dv4 = u64::from(tiling.head_dim_v / 4);
        let lanes = u64::from(tiling.workgroup_size);
        let rows = u64::from(tiling.rows);
        let tiles = keys.div_ceil(block_n) + 1;
        // One trip of the loop over four-key steps, plus its own inner
        // loops when they are not unrolled.
        let step = if tiling.unroll {
            0
        } else {
            (d4 + 1) + (dv4 + 1) + (d4 + dv4) * (rows + 1) + 3 * (rows + 1)
        };
        // K and V are staged by one loop when they are as wide, else by one
        // loop each.
        let staging = if tiling.subgroup_kv {
            0
        } else if d4 == dv4 {
            (block_n * d4).div_ceil(lanes) + 1
        } else {
            (block_n * d4).div_ceil(lanes) + (block_n * dv4).div_ceil(lanes) + 2
        };
        let mut per_tile = 1 + staging + (block_n / 4 + 1) + (block_n / 4) * step;
        let mut fixed = if tiling.unroll {
            0
        } else {
            2 * rows * (d4 + dv4 + 4)
        };
        match self {
            Specialization::Naive {
                pass: NaivePass::Softmax,
                ..
            } => {
                // Three passes over the row's vec4 score slots.
                return Some(3 * (keys.div_ceil(4) + 1));
            }
            Specialization::Decode(tiling, _, DecodeLanes::Keys, ..) if tiling.subgroup_kv => {
                // One trip per four keys of each lane; the rest is unrolled.
                return Some(keys.div_ceil(4 * lanes) + 2);
            }
            Specialization::Decode(tiling, _, DecodeLanes::KeyTiles, ..) if tiling.subgroup_kv => {
                // Per tile of one key per lane: the tile loop and the loop
                // over the tile's keys for P V; the queries' staging once;
                // the rest is unrolled.
                return Some(keys.div_ceil(lanes) * (1 + lanes) + 2 + (rows * d4).div_ceil(lanes));
            }
            Specialization::Decode(tiling, ..) if tiling.subgroup_kv => {
                // One trip per four keys; the rest is unrolled.
                return Some(keys.div_ceil(4) + 2);
            }
            Specialization::Decode(..) => {
                // Per-key segment flags, and lane 0's range reduction.
                per_tile += block_n.div_ceil(lanes) + 1;
                fixed += lanes;
            }
            _ => {}
        }
        Some(fixed + tiles * per_tile)
    }

    /// The attention tiling, for the attention kernels.
    pub fn attention_tiling(&self) -> Option<&AttentionTiling> {
        match self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => Some(tiling),
            _ => None,
        }
    }

    pub fn kernel(&self) -> Kernel {
        match self {
            Specialization::FlashForward(_) => Kernel::FlashForward,
            Specialization::FlashMasked(_) => Kernel::FlashMasked,
            Specialization::FlashBlocked(_) => Kernel::FlashBlocked,
            Specialization::FlashBlockedMasked(_) => Kernel::FlashBlockedMasked,
            Specialization::FlashCoop(_) => Kernel::FlashCoop,
            Specialization::FlashCoopMasked(_) => Kernel::FlashCoopMasked,
            Specialization::Naive { pass, .. } => match pass {
                NaivePass::Scores => Kernel::NaiveScores,
                NaivePass::Softmax => Kernel::NaiveSoftmax,
                NaivePass::Values => Kernel::NaiveValues,
            },
            Specialization::Decode(..) => Kernel::Decode,
            Specialization::Combine { .. } => Kernel::Combine,
            Specialization::Rope { .. } => Kernel::Rope,
            Specialization::KvAppend { .. } => Kernel::KvAppend,
            Specialization::KvGather { .. } => Kernel::KvGather,
            Specialization::Linear { pass, .. } => match pass {
                LinearPass::States => Kernel::LinearStates,
                LinearPass::Scan => Kernel::LinearScan,
                LinearPass::Outputs => Kernel::LinearOutputs,
                LinearPass::Update => Kernel::LinearUpdate,
            },
            Specialization::Backward { pass, .. }
            | Specialization::BackwardBlocked { pass, .. } => match pass {
                BackwardPass::Deltas => Kernel::BackwardDeltas,
                BackwardPass::Keys => Kernel::BackwardKeys,
                BackwardPass::Queries => Kernel::BackwardQueries,
                BackwardPass::Sinks => Kernel::BackwardSinks,
            },
        }
    }

    /// The generated constants, by WGSL name.
    pub fn constants(&self) -> Vec<(&'static str, u32)> {
        match *self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => {
                let mut constants = vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("BLOCK_N", tiling.block_n),
                    ("WG_SIZE", tiling.workgroup_size),
                    ("ROWS", tiling.rows),
                ];
                if tiling.subgroup_kv {
                    let spread = |head_dim: u32| match self {
                        // Decoding spreads one head vector (D4 vec4s) over the lanes.
                        Specialization::Decode(..) => head_dim / 4,
                        // Four keys of K or V are head_dim vec4s, spread over the lanes.
                        _ => head_dim,
                    };
                    let lanes = tiling.workgroup_size;
                    constants.push(("SLOTS", spread(tiling.head_dim).div_ceil(lanes)));
                    constants.push(("SLOTS_V", spread(tiling.head_dim_v).div_ceil(lanes)));
                    if let Specialization::Decode(_, cache, DecodeLanes::Keys, ..) = self {
                        // Each lane reads its keys' vectors eight values at a time.
                        constants.push(("D8", tiling.head_dim / 8));
                        constants.push(("DV8", tiling.head_dim_v / 8));
                        if cache.has_scales() {
                            // 16-byte blocks covering a vector of D4 (DV4)
                            // words that starts anywhere in its first block.
                            let blocks = |width: u32| (width / 4 + 2) / 4 + 1;
                            constants.push(("W4", blocks(tiling.head_dim)));
                            constants.push(("VW4", blocks(tiling.head_dim_v)));
                        }
                    }
                }
                constants
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("ROW_LANES", tiling.row_lanes),
                    ("KEY_LANES", tiling.key_lanes),
                    ("ROWS", tiling.rows),
                    ("COLS", tiling.columns()),
                    ("WG_SIZE", tiling.workgroup_size()),
                    ("BLOCK_N", tiling.block_n()),
                    ("PASSES", tiling.pass_count()),
                    ("KV_TILE", tiling.kv_tile()),
                    ("Q_STRIDE", tiling.q_stride()),
                    ("P_STRIDE", tiling.p_stride()),
                    ("STAGE_BATCH", tiling.stage_batch()),
                    ("D_STEP", BlockedTiling::D_STEP),
                ]
            }
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                vec![
                    ("D4", tiling.head_dim / 4),
                    ("DV4", tiling.head_dim_v / 4),
                    ("D", tiling.head_dim),
                    ("DV", tiling.head_dim_v),
                    ("KV_WIDTH", tiling.head_dim.max(tiling.head_dim_v)),
                    ("T", tiling.size),
                    ("ROW_TILES", tiling.row_tiles),
                    ("KEY_TILES", tiling.key_tiles),
                    ("WG_SIZE", tiling.workgroup_size),
                    ("LANES_PER_ROW", tiling.lanes_per_row()),
                    ("QUADS", tiling.block_n() / 4 / tiling.lanes_per_row()),
                    ("EMULATED_LANES", EMULATED_LANES),
                    ("DT", tiling.q_tiles()),
                    ("DVT", tiling.v_tiles()),
                    ("Q_PASS", tiling.q_pass()),
                    ("Q_PASSES", tiling.q_passes()),
                    ("O_PASS", tiling.o_pass()),
                    ("O_PASSES", tiling.o_passes()),
                    (
                        "EMU_ELEMENTS",
                        (tiling.size * tiling.size).div_ceil(EMULATED_LANES),
                    ),
                ]
            }
            Specialization::Combine { workgroup_size, .. }
            | Specialization::Rope { workgroup_size }
            | Specialization::KvAppend { workgroup_size, .. }
            | Specialization::KvGather { workgroup_size, .. } => vec![("WG_SIZE", workgroup_size)],
            Specialization::Linear { tiling, .. } => vec![
                ("DK4", tiling.head_dim / 4),
                ("DV4", tiling.head_dim_v / 4),
                ("WG_SIZE", tiling.workgroup_size),
                ("BLOCK_N", tiling.block_n),
                ("RQ", tiling.row_quads),
                ("CB4", tiling.columns4),
                ("ROWS", tiling.rows),
                ("S_ROWS", tiling.state_rows),
                ("SLOTS_C", tiling.columns4.div_ceil(tiling.workgroup_size)),
                ("SLOTS_S", tiling.head_dim_v.div_ceil(tiling.workgroup_size)),
                (
                    "SLOTS_K",
                    (tiling.head_dim / 4).div_ceil(tiling.workgroup_size),
                ),
                (
                    "SLOTS_V",
                    (tiling.head_dim_v / 4).div_ceil(tiling.workgroup_size),
                ),
            ],
            Specialization::Backward { tiling, .. } => {
                let d4 = tiling.head_dim_capacity / 4;
                let dv4 = tiling.head_dim_v_capacity / 4;
                let wg = tiling.workgroup_size;
                vec![
                    ("D4", d4),
                    ("DV4", dv4),
                    ("WG_SIZE", wg),
                    ("ROWS", tiling.rows),
                    ("BLOCK", tiling.block),
                    ("STAGE", (tiling.block * d4).div_ceil(wg)),
                    ("STAGE_V", (tiling.block * dv4).div_ceil(wg)),
                    ("SLOTS", (d4 + dv4).div_ceil(wg)),
                ]
            }
            Specialization::BackwardBlocked { tiling, .. } => {
                let (d4, dv4) = (tiling.head_dim / 4, tiling.head_dim_v / 4);
                vec![
                    ("D4", d4),
                    ("DV4", dv4),
                    ("KEY_LANES", tiling.key_lanes),
                    ("ROW_LANES", tiling.row_lanes),
                    ("ROWS", tiling.rows),
                    ("WG_SIZE", tiling.workgroup_size()),
                    ("BLOCK_N", tiling.block_n()),
                    ("BLOCK_M", tiling.block_m()),
                    ("COLS_K", d4.div_ceil(tiling.row_lanes)),
                    ("COLS_V", dv4.div_ceil(tiling.row_lanes)),
                    ("COLS_Q", d4.div_ceil(tiling.key_lanes)),
                    ("QUAD", 4),
                ]
            }
        }
    }

    /// [`Specialization::source_with`] the built-in `shaders/` files.
    #[cfg(test)]
    pub fn source(&self) -> Result<String, ShaderSourceError> {
        self.source_with(&ShaderOverrides::default())
    }

    /// [`Specialization::browser_source_with`] the built-in `shaders/`
    /// files.
    #[cfg(test)]
    pub fn browser_source(&self) -> Result<String, ShaderSourceError> {
        self.browser_source_with(&ShaderOverrides::default())
    }

    /// Full WGSL text for this specialization, from the `shaders/` files
    /// or their replacements, or the template mistake that prevents it
    /// (its line counted in [`Kernel::template_with`]).
    pub fn source_with(&self, overrides: &ShaderOverrides) -> Result<String, ShaderSourceError> {
        // Enable directives come before any declaration.
        let mut text = self.enable_directives();
        let _ = writeln!(text, "// Generated by wgpu_flash_attn::shaders: {self:?}");
        for (name, value) in self.constants() {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "const {name}: u32 = {value}u;");
        }
        let unrolled = self.unrolled_bounds();
        let bounds: Vec<(&str, u32)> = self
            .constants()
            .into_iter()
            .filter(|(name, _)| unrolled.contains(name))
            .collect();
        let template = self.kernel().template_with(overrides);
        let variant = select_variants(&template, &self.variant_flags())?;
        let unrolled = unroll_loops(&variant, &bounds).map_err(|err| err.in_template(&template))?;
        text.push_str(&unrolled);
        Ok(text)
    }

    /// [`Specialization::source_with`] as browsers' WebGPU takes it.
    /// WGSL requires `enable subgroups;` before subgroup built-ins, which
    /// browsers' compilers (Chromium's Tint, WebKit's) enforce and naga 30
    /// refuses as not yet implemented (it takes the built-ins without it):
    /// the directive is added here, for browsers only.
    pub fn browser_source_with(
        &self,
        overrides: &ShaderOverrides,
    ) -> Result<String, ShaderSourceError> {
        let source = self.source_with(overrides)?;
        Ok(if self.needs_subgroups() {
            format!("enable subgroups;\n{source}")
        } else {
            source
        })
    }

    /// The WGSL `enable` directives the kernel needs.
    fn enable_directives(&self) -> String {
        match self {
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                let mut directives = String::new();
                if tiling.storage != DType::F32 {
                    directives.push_str("enable f16;\n");
                }
                if !tiling.emulated {
                    directives.push_str("enable wgpu_cooperative_matrix;\n");
                }
                directives
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling)
                if tiling.f16_products =>
            {
                "enable f16;\n".to_string()
            }
            _ => String::new(),
        }
    }

    /// Whether the pipeline needs cooperative matrices (and f16 shader
    /// arithmetic when it multiplies f16 matrices).
    pub fn needs_cooperative_matrices(&self) -> bool {
        matches!(
            self,
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling)
                if !tiling.emulated
        )
    }

    #[cfg(test)]
    /// Whether the pipeline does f16 arithmetic (f16 matrices, real or
    /// emulated).
    pub fn needs_f16(&self) -> bool {
        match self {
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                tiling.storage != DType::F32
            }
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                tiling.f16_products
            }
            _ => false,
        }
    }

    /// Names of the `// #if NAME` blocks this specialization keeps.
    pub fn variant_flags(&self) -> Vec<&'static str> {
        let mut flags = self
            .attention_tiling()
            .map_or_else(Vec::new, AttentionTiling::variant_flags);
        match self {
            Specialization::FlashMasked(_) => flags.push(MASK),
            Specialization::FlashBlocked(tiling) | Specialization::FlashBlockedMasked(tiling) => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.f16_products {
                    flags.push(F16_PRODUCTS);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
                if matches!(self, Specialization::FlashBlockedMasked(_)) {
                    flags.push(MASK);
                }
            }
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.size == 8 {
                    flags.push(COOP8);
                }
                if tiling.storage == DType::F32 {
                    flags.push(COOP_F32);
                }
                if tiling.emulated {
                    flags.push(COOP_EMULATED);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
                if matches!(self, Specialization::FlashCoopMasked(_)) {
                    flags.push(MASK);
                }
            }
            Specialization::Decode(tiling, cache, lanes, io, mask) => {
                if *mask == DecodeMask::TokenTree {
                    flags.push(TREE_MASK);
                }
                if tiling.subgroup_kv && *lanes == DecodeLanes::Keys {
                    flags.retain(|flag| *flag != SUBGROUP_KV);
                    flags.push(KEY_LANES);
                }
                if tiling.subgroup_kv && *lanes == DecodeLanes::KeyTiles {
                    flags.push(KEY_TILES);
                }
                flags.extend(cache_flags(*cache));
                flags.extend(io_flags(*io));
            }
            Specialization::Combine { out, .. } => flags.extend(io_flags(DecodeIo {
                q: DType::F32,
                out: *out,
            })),
            Specialization::KvAppend { dtype: cache, .. }
            | Specialization::KvGather { dtype: cache, .. } => flags.extend(cache_flags(*cache)),
            Specialization::Linear { pass, tiling } => {
                flags.extend(storage_flags(tiling.storage));
                if *pass == LinearPass::Outputs && tiling.causal {
                    flags.push(CAUSAL);
                }
                if matches!(pass, LinearPass::States | LinearPass::Outputs) && tiling.subgroup {
                    flags.push(SUBGROUP_BROADCAST);
                }
            }
            Specialization::Backward { tiling, .. } => {
                flags.extend(storage_flags(tiling.storage));
                if tiling.subgroup {
                    flags.push(SUBGROUP_BROADCAST);
                }
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
            }
            Specialization::BackwardBlocked { tiling, .. } => {
                flags.extend(storage_flags(tiling.storage));
                flags.push(BLOCKED_BACKWARD);
                if tiling.dropout {
                    flags.push(DROPOUT);
                }
            }
            _ => {}
        }
        let codecs = codec_flags(&flags);
        flags.extend(codecs);
        flags
    }

    #[cfg(test)]
    /// Whether the pipeline converts f16 with `unpack2x16float` /
    /// `pack2x16float`, which wgpu grants where the adapter has
    /// `DownlevelFlags::SHADER_F16_IN_F32` (every Vulkan, Metal and DX12
    /// adapter, and GL from GLSL 4.2 / ES 3.0): the f16 codec, and fp8
    /// caches, whose bytes widen as f16.
    pub fn needs_f16_in_f32(&self) -> bool {
        let flags = self.variant_flags();
        flags.contains(&super::F16_CODEC) || flags.contains(&super::KV_FP8)
    }

    /// Whether the pipeline needs the adapter's SUBGROUP feature.
    pub fn needs_subgroups(&self) -> bool {
        let flags = self.variant_flags();
        flags.contains(&SUBGROUP_KV)
            || flags.contains(&KEY_LANES)
            || flags.contains(&SUBGROUP_BROADCAST)
            || self.needs_cooperative_matrices()
    }

    /// Constants whose loops `source` unrolls.
    fn unrolled_bounds(&self) -> &'static [&'static str] {
        match self {
            Specialization::FlashForward(tiling)
            | Specialization::FlashMasked(tiling)
            | Specialization::Naive { tiling, .. }
            | Specialization::Decode(tiling, ..) => {
                if tiling.unroll {
                    &[
                        "D4", "DV4", "ROWS", "SLOTS", "SLOTS_V", "D8", "DV8", "W4", "VW4",
                    ]
                } else {
                    &[]
                }
            }
            // Rows and output columns index private arrays: unrolled
            // everywhere, so they stay in registers. The loops over key
            // lanes (P V, the row maxima) and D_STEP head-dim vec4s of the
            // scores' loop too: wgpu's loop bounds keep the drivers from
            // unrolling them (NAK and ACO unroll them in the build without
            // the checks, which ran the forward 30 % faster on an H100;
            // 2026-12-05, BENCHMARKS.md).
            Specialization::FlashBlocked(_) | Specialization::FlashBlockedMasked(_) => {
                &["ROWS", "COLS", "STAGE_BATCH", "KEY_LANES", "D_STEP"]
            }
            // Each lane's score quads index private arrays; matrices are
            // indexed by constants only. The emulation's stand-ins are plain
            // arrays: its loops stay loops (smaller code, quicker compiles
            // on the CPU adapters that run it).
            Specialization::FlashCoop(tiling) | Specialization::FlashCoopMasked(tiling) => {
                if tiling.emulated {
                    &["QUADS"]
                } else {
                    &[
                        "QUADS",
                        "DT",
                        "DVT",
                        "KEY_TILES",
                        "Q_PASS",
                        "Q_PASSES",
                        "O_PASS",
                        "O_PASSES",
                    ]
                }
            }
            Specialization::Linear { .. } => &[
                "DK4", "DV4", "RQ", "CB4", "ROWS", "SLOTS_C", "SLOTS_S", "SLOTS_K", "SLOTS_V",
            ],
            Specialization::Backward { tiling, .. } => {
                if tiling.unroll {
                    &["D4", "DV4", "ROWS", "STAGE", "STAGE_V", "SLOTS"]
                } else {
                    &[]
                }
            }
            // Micro-tiles index private arrays: unrolled everywhere, so
            // they stay in registers.
            Specialization::BackwardBlocked { .. } => {
                &["ROWS", "COLS_K", "COLS_V", "COLS_Q", "QUAD"]
            }
            Specialization::Combine { .. }
            | Specialization::Rope { .. }
            | Specialization::KvAppend { .. }
            | Specialization::KvGather { .. } => &[],
        }
    }

    /// A readable label for pipelines and error messages.
    pub fn label(&self) -> String {
        let constants: Vec<String> = self
            .constants()
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let unrolled = if self.unrolled_bounds().is_empty() {
            ""
        } else {
            " unrolled"
        };
        let flags: String = self
            .variant_flags()
            .iter()
            .map(|flag| format!(" {flag}"))
            .collect();
        format!(
            "{}:{} {}{unrolled}{flags}",
            self.kernel().file_name(),
            self.kernel().entry_point(),
            constants.join(" ")
        )
    }
}

/// [`Specialization::loop_trips`] of the register-blocked kernel: its
/// loops over rows and output columns are unrolled; the rest are counted.
fn blocked_loop_trips(tiling: &BlockedTiling, keys: u64) -> u64 {
    let lanes = u64::from(tiling.workgroup_size());
    let d4 = u64::from(tiling.head_dim / 4);
    let dv4 = u64::from(tiling.head_dim_v / 4);
    let block_m = u64::from(tiling.block_m());
    let block_n = u64::from(tiling.block_n());
    let tiles = keys.div_ceil(block_n) + 1;
    // Staging runs in batches of STAGE_BATCH loads per invocation.
    let staged = lanes * u64::from(tiling.stage_batch());
    // Staging K, the scores' head-dim loop (D_STEP vec4s a trip), staging
    // V (the loops over key lanes are unrolled).
    // In `passes` passes (each a part of K's head dim, then of V's keys;
    // the pass loop's own trips counted too).
    let passes = u64::from(tiling.pass_count());
    let per_tile = 1
        + (passes + 1)
        + passes * ((block_n * d4 / passes).div_ceil(staged) + 1)
        + passes * (d4 / passes / u64::from(BlockedTiling::D_STEP) + 1)
        + passes * ((block_n / passes * dv4).div_ceil(staged) + 1);
    // Staging Q.
    let fixed = (block_m * d4).div_ceil(staged) + 1;
    fixed + tiles * per_tile
}

/// [`Specialization::loop_trips`] of the cooperative-matrix kernel, whose
/// emulation (the only form llvmpipe, which caps loops, can run) loops
/// over every element of every product.
fn coop_loop_trips(tiling: &CoopTiling, keys: u64) -> u64 {
    let lanes = u64::from(tiling.workgroup_size);
    let (d, dv) = (u64::from(tiling.head_dim), u64::from(tiling.head_dim_v));
    let (m, n, t) = (
        u64::from(tiling.block_m()),
        u64::from(tiling.block_n()),
        u64::from(tiling.size),
    );
    let per_row = u64::from(tiling.lanes_per_row());
    let key_tiles = u64::from(tiling.key_tiles);
    let v_tiles = u64::from(tiling.v_tiles());
    let o_pass = u64::from(tiling.o_pass());
    let o_passes = u64::from(tiling.o_passes());
    let o_cols = o_pass * t;
    // Real matrices: the loops over them and over passes are unrolled.
    // The emulation keeps them as loops (each with its exit), and its
    // products loop over a lane's elements and each element's terms.
    let elements = (t * t).div_ceil(u64::from(EMULATED_LANES));
    let emulated = u64::from(tiling.emulated);
    let looped = |trips: u64| emulated * (trips + 1);
    let (scores, values, move_pass) = if tiling.emulated {
        (
            looped(key_tiles) + key_tiles * (elements + 1) * (d + 1),
            looped(key_tiles) + key_tiles * (looped(v_tiles) + v_tiles * (elements + 1) * (t + 1)),
            2 * (looped(o_pass) + o_pass * (elements + 1)),
        )
    } else {
        (0, 0, 0)
    };
    // A pass of the accumulators through s_tile: the lanes' columns of a
    // row plus (emulated) the matrices' stores and loads.
    let o_moves =
        |cols: u64| looped(o_passes) + o_passes * (cols.div_ceil(per_row) + 1 + move_pass);
    // Staging K and V, the scores, the row's max over its lanes, a
    // rescale of the accumulators (at most once per tile), P V.
    let per_tile = 1
        + ((n * d / 4).div_ceil(lanes) + 1)
        + scores
        + ((n * dv / 4).div_ceil(lanes) + 1)
        + (per_row + 1)
        + o_moves(o_cols)
        + values;
    // Staging Q; a carried chunk's accumulators; the row's sum over its
    // lanes; the output.
    let q_staging = if tiling.emulated {
        (m * d / 4).div_ceil(lanes) + 1
    } else {
        let q_cols = u64::from(tiling.q_pass() * tiling.size);
        u64::from(tiling.q_passes()) * ((m * q_cols / 4).div_ceil(lanes) + 1)
    };
    let fixed = q_staging + 2 * o_moves(o_cols / 4) + per_row + 1;
    fixed + (keys.div_ceil(n) + 1) * per_tile
}

/// Workgroup memory of the forward kernel: f32 K and V tiles of `block_n`
/// keys, `head_dim` and `head_dim_v` wide.
pub fn forward_tile_bytes(head_dim: u32, head_dim_v: u32, block_n: u32) -> u64 {
    u64::from(block_n) * u64::from(head_dim + head_dim_v) * 4
}

/// The largest tile whose K and V fit `workgroup_bytes` of workgroup memory
/// at these head dims, or `None` when even the smallest does not.
pub fn largest_block_n(head_dim: u32, head_dim_v: u32, workgroup_bytes: u64) -> Option<u32> {
    BLOCK_N_CANDIDATES
        .into_iter()
        .find(|&n| forward_tile_bytes(head_dim, head_dim_v, n) <= workgroup_bytes)
}

/// The smallest tile the planner would use.
pub const MIN_BLOCK_N: u32 = BLOCK_N_CANDIDATES[BLOCK_N_CANDIDATES.len() - 1];

impl Specialization {
    /// A decode specialization with queries and output of `io`'s types;
    /// any other specialization unchanged.
    pub fn with_decode_io(self, io: DecodeIo) -> Specialization {
        match self {
            Specialization::Decode(tiling, cache, lanes, _, mask) => {
                Specialization::Decode(tiling, cache, lanes, io, mask)
            }
            other => other,
        }
    }
}
