//! Attention masks over (query, key), `[batch|1, heads|1, seq_q, seq_kv]`
//! and broadcast over batch and heads: an additive float bias, a boolean
//! mask (`true` = may attend, as PyTorch), and block-sparse masks whose
//! empty tiles the kernel skips (with constructors for the Sparse
//! Transformer and Longformer patterns). Combined with causal and windows,
//! the result is their intersection.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::AttentionShape;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::MaskParams;

/// Keys per word of a boolean mask row.
const BITS_PER_WORD: usize = 32;

/// What a mask's words hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// f32, added to the scores (natural units); `-inf` hides a key.
    Bias,
    /// One bit per key; set = may attend.
    Bool,
}

/// A mask on the device. Block-sparse masks keep their bits on the host
/// too, to derive per-tile states for each tiling a call uses.
#[derive(Debug)]
pub struct AttentionMask {
    kind: MaskKind,
    dims: [usize; 4],
    row_words: usize,
    buffer: wgpu::Buffer,
    /// The device the mask lives on.
    device: wgpu::Device,
    /// Block-sparse only: the bits, row-major like `buffer`.
    host_bits: Option<Vec<u32>>,
    /// Tile states per (rows per tile, keys per tile), built on first use.
    tiles: Mutex<HashMap<(u32, u32), wgpu::Buffer>>,
}

/// Which user blocks attend which: `[batch|1, heads|1, q_blocks,
/// k_blocks]`, blocks of `block_q` queries by `block_k` keys (FlexAttention's
/// block mask). The last block of an axis may be partial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Queries per block.
    pub block_q: usize,
    /// Keys per block.
    pub block_k: usize,
    /// `[batch|1, heads|1, ceil(seq_q / block_q), ceil(seq_kv / block_k)]`.
    pub dims: [usize; 4],
    /// Whether each block may attend, row-major over `dims`.
    pub attend: Vec<bool>,
}

/// Checks a mask's values against its dims (no zero dimension, one value
/// per element), a device mask's and the reference's host masks alike.
pub(crate) fn check_dims(dims: [usize; 4], got: usize) -> Result<()> {
    if dims.contains(&0) {
        return Err(Error::ZeroDimension {
            tensor: "mask",
            shape: dims,
        });
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or(Error::ShapeOverflow {
            tensor: "mask",
            shape: dims,
        })?;
    if got != expected {
        return Err(Error::DataLength {
            tensor: "mask",
            expected,
            got,
        });
    }
    Ok(())
}

/// Checks that mask dims `[batch|1, heads|1, seq_q, seq_kv]` broadcast to
/// `shape` (a device mask's and the reference's host masks alike).
pub(crate) fn check_broadcast(dims: [usize; 4], shape: &AttentionShape) -> Result<()> {
    let [b, h, q, k] = dims;
    let fits = (b == 1 || b == shape.batch)
        && (h == 1 || h == shape.heads_q)
        && q == shape.seq_q
        && k == shape.seq_kv;
    if !fits {
        return Err(Error::MaskShape {
            dims,
            shape: [shape.batch, shape.heads_q, shape.seq_q, shape.seq_kv],
        });
    }
    Ok(())
}

/// Packs `[.., seq_kv]` rows of booleans into rows of words.
fn pack_bits(dims: [usize; 4], values: &[bool]) -> (Vec<u32>, usize) {
    let seq_kv = dims[3];
    let row_words = seq_kv.div_ceil(BITS_PER_WORD);
    let rows = values.len() / seq_kv;
    let mut words = vec![0u32; rows * row_words];
    for (row, chunk) in values.chunks(seq_kv).enumerate() {
        for (key, _) in chunk.iter().enumerate().filter(|(_, on)| **on) {
            words[row * row_words + key / BITS_PER_WORD] |= 1 << (key % BITS_PER_WORD);
        }
    }
    (words, row_words)
}

impl AttentionMask {
    /// An additive bias, `values` row-major over `dims`. Values must not
    /// be NaN or +inf; `-inf` hides a key.
    pub fn bias(gpu: &Gpu, dims: [usize; 4], values: &[f32]) -> Result<Self> {
        check_dims(dims, values.len())?;
        if let Some(index) = values
            .iter()
            .position(|x| x.is_nan() || *x == f32::INFINITY)
        {
            return Err(Error::MaskValue {
                index,
                value: values[index],
            });
        }
        Self::upload(
            gpu,
            MaskKind::Bias,
            dims,
            dims[3],
            bytemuck::cast_slice(values),
            None,
        )
    }

    /// An additive bias given in f16 (widened exactly to f32 on upload).
    pub fn bias_f16(gpu: &Gpu, dims: [usize; 4], values: &[half::f16]) -> Result<Self> {
        let widened: Vec<f32> = values.iter().map(|x| x.to_f32()).collect();
        Self::bias(gpu, dims, &widened)
    }

    /// A boolean mask (`true` = may attend), `values` row-major over
    /// `dims`. Every tile is computed and masked, as a dense mask is.
    pub fn boolean(gpu: &Gpu, dims: [usize; 4], values: &[bool]) -> Result<Self> {
        Self::from_bools(gpu, dims, values, false)
    }

    /// The same boolean mask, block-sparse: tiles with no attended key are
    /// skipped and tiles where every key is attended skip the mask.
    pub fn block_sparse(gpu: &Gpu, dims: [usize; 4], values: &[bool]) -> Result<Self> {
        Self::from_bools(gpu, dims, values, true)
    }

    /// Packs the bits; block-sparse masks keep a host copy for tile states.
    fn from_bools(
        gpu: &Gpu,
        dims: [usize; 4],
        values: &[bool],
        block_sparse: bool,
    ) -> Result<Self> {
        check_dims(dims, values.len())?;
        let (words, row_words) = pack_bits(dims, values);
        Self::from_words(gpu, dims, words, row_words, block_sparse)
    }

    /// A boolean mask from its packed rows (`row_words` words per row).
    fn from_words(
        gpu: &Gpu,
        dims: [usize; 4],
        words: Vec<u32>,
        row_words: usize,
        block_sparse: bool,
    ) -> Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let host_bits = block_sparse.then(|| words.clone());
        Self::upload(gpu, MaskKind::Bool, dims, row_words, bytes, host_bits)
    }

    /// A block-sparse mask from a block layout over `seq_q` x `seq_kv`,
    /// optionally refined by an element mask (`[batch|1, heads|1, seq_q,
    /// seq_kv]`, like the layout's leading dims) inside attended blocks.
    pub fn from_blocks(
        gpu: &Gpu,
        seq_q: usize,
        seq_kv: usize,
        layout: &BlockLayout,
        element: Option<&[bool]>,
    ) -> Result<Self> {
        let [batch, heads, q_blocks, k_blocks] = layout.dims;
        let expected = [
            batch,
            heads,
            seq_q.div_ceil(layout.block_q.max(1)),
            seq_kv.div_ceil(layout.block_k.max(1)),
        ];
        if layout.block_q == 0 || layout.block_k == 0 || layout.dims != expected {
            return Err(Error::BlockLayout {
                dims: layout.dims,
                expected,
                block_q: layout.block_q,
                block_k: layout.block_k,
            });
        }
        let blocks = layout
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or(Error::ShapeOverflow {
                tensor: "block layout",
                shape: layout.dims,
            })?;
        if layout.attend.len() != blocks {
            return Err(Error::DataLength {
                tensor: "block layout",
                expected: blocks,
                got: layout.attend.len(),
            });
        }
        let dims = [batch, heads, seq_q, seq_kv];
        if dims.contains(&0) {
            return Err(Error::ZeroDimension {
                tensor: "mask",
                shape: dims,
            });
        }
        if let Some(element) = element {
            check_dims(dims, element.len())?;
        }
        // The packed bits are what the device holds: checked against the
        // binding before anything of the mask's size is allocated.
        let row_words = seq_kv.div_ceil(BITS_PER_WORD);
        let rows = batch.checked_mul(heads).and_then(|n| n.checked_mul(seq_q));
        let words = rows.and_then(|rows| rows.checked_mul(row_words));
        let Some((rows, words)) = rows.zip(words) else {
            return Err(Error::ShapeOverflow {
                tensor: "mask",
                shape: dims,
            });
        };
        crate::tensor::check_binding_size(gpu, "mask", words as u64 * 4)?;
        let mut packed = vec![0u32; words];
        for (row_index, row) in packed.chunks_mut(row_words).enumerate().take(rows) {
            let (plane, q) = (row_index / seq_q, row_index % seq_q);
            let blocks = (plane * q_blocks + q / layout.block_q) * k_blocks;
            for key in 0..seq_kv {
                let index = row_index * seq_kv + key;
                if layout.attend[blocks + key / layout.block_k] && element.is_none_or(|e| e[index])
                {
                    row[key / BITS_PER_WORD] |= 1 << (key % BITS_PER_WORD);
                }
            }
        }
        Self::from_words(gpu, dims, packed, row_words, true)
    }

    fn upload(
        gpu: &Gpu,
        kind: MaskKind,
        dims: [usize; 4],
        row_words: usize,
        bytes: &[u8],
        host_bits: Option<Vec<u32>>,
    ) -> Result<Self> {
        crate::tensor::check_binding_size(gpu, "mask", bytes.len() as u64)?;
        Ok(AttentionMask {
            kind,
            dims,
            row_words,
            buffer: gpu.storage_buffer("wgpu-flash-attn mask", bytes)?,
            device: gpu.device.clone(),
            host_bits,
            tiles: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the mask is a float bias or one bit per key.
    pub fn kind(&self) -> MaskKind {
        self.kind
    }
    /// `[batch|1, heads|1, seq_q, seq_kv]`, as given.
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }
    /// Whether the kernel skips this mask's empty tiles.
    pub fn is_block_sparse(&self) -> bool {
        self.host_bits.is_some()
    }
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Whether the mask lives on `gpu`'s device.
    pub(crate) fn check_device(&self, gpu: &Gpu) -> Result<()> {
        gpu.check_owner(&self.device, "mask")
    }

    /// Checks that the mask broadcasts to `shape`.
    pub(crate) fn check_shape(&self, shape: &AttentionShape) -> Result<()> {
        check_broadcast(self.dims, shape)
    }

    /// How the words lie (kind and strides), without tile states: what a
    /// kernel that applies the mask key by key needs.
    pub(crate) fn word_layout(&self) -> MaskParams {
        let [b, h, q, _] = self.dims;
        let plane = q * self.row_words;
        MaskParams {
            kind: match self.kind {
                MaskKind::Bias => 0,
                MaskKind::Bool => 1,
            },
            batch_stride: if b == 1 { 0 } else { (h * plane) as u32 },
            head_stride: if h == 1 { 0 } else { plane as u32 },
            row_words: self.row_words as u32,
            ..MaskParams::default()
        }
    }

    /// The kernel's view of the mask for tiles of `block_m` rows by
    /// `block_n` keys, and the tile-state buffer to bind (None: dense).
    pub(crate) fn params(
        &self,
        gpu: &Gpu,
        block_m: u32,
        block_n: u32,
    ) -> Result<(MaskParams, Option<wgpu::Buffer>)> {
        let [b, h, q, k] = self.dims;
        let row_tiles = q.div_ceil(block_m as usize);
        let key_tiles = k.div_ceil(block_n as usize);
        let mut params = MaskParams {
            key_tiles: key_tiles as u32,
            ..self.word_layout()
        };
        let Some(bits) = &self.host_bits else {
            return Ok((params, None));
        };
        let tiles_per_plane = row_tiles * key_tiles;
        // One u32 per tile of every plane, bound whole: small tiles (a
        // caller's register-blocked layout) can make it several times the
        // mask's own bytes.
        let tiles = (b * h).saturating_mul(tiles_per_plane);
        crate::tensor::check_binding_size(
            gpu,
            "mask tile states",
            (tiles as u64).saturating_mul(4),
        )?;
        let stride = |tiles: usize| {
            u32::try_from(tiles).map_err(|_| Error::ShapeOverflow {
                tensor: "mask tile states",
                shape: [b, h, row_tiles, key_tiles],
            })
        };
        params.use_tiles = 1;
        params.tile_batch_stride = if b == 1 {
            0
        } else {
            stride(h * tiles_per_plane)?
        };
        params.tile_head_stride = if h == 1 { 0 } else { stride(tiles_per_plane)? };
        let mut cache = self.tiles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(buffer) = cache.get(&(block_m, block_n)) {
            return Ok((params, Some(buffer.clone())));
        }
        let states = tile_states(
            bits,
            self.dims,
            self.row_words,
            block_m as usize,
            block_n as usize,
        );
        let buffer =
            gpu.storage_buffer("wgpu-flash-attn mask tiles", bytemuck::cast_slice(&states))?;
        cache.insert((block_m, block_n), buffer.clone());
        Ok((params, Some(buffer)))
    }
}

/// Per (plane, row tile, key tile): 0 no key attended, 1 some, 2 all.
fn tile_states(
    bits: &[u32],
    dims: [usize; 4],
    row_words: usize,
    block_m: usize,
    block_n: usize,
) -> Vec<u32> {
    let [b, h, q, k] = dims;
    let row_tiles = q.div_ceil(block_m);
    let key_tiles = k.div_ceil(block_n);
    let mut states = Vec::with_capacity(b * h * row_tiles * key_tiles);
    for plane in 0..b * h {
        for rt in 0..row_tiles {
            for kt in 0..key_tiles {
                let (keys_lo, keys_hi) = (kt * block_n, ((kt + 1) * block_n).min(k));
                let (mut any, mut all) = (false, true);
                for row in rt * block_m..((rt + 1) * block_m).min(q) {
                    let base = (plane * q + row) * row_words;
                    for key in keys_lo..keys_hi {
                        let on = bits[base + key / BITS_PER_WORD] >> (key % BITS_PER_WORD) & 1 == 1;
                        any |= on;
                        all &= on;
                    }
                }
                states.push(match (any, all) {
                    (false, _) => 0,
                    (true, true) => 2,
                    (true, false) => 1,
                });
            }
        }
    }
    states
}

/// Element masks of the classic sparse-attention patterns, `[seq, seq]`
/// row-major (`true` = may attend), for [`AttentionMask::block_sparse`]
/// (or [`AttentionMask::boolean`], the dense equivalent).
/// Each returns `Error::ShapeOverflow` where `seq * seq` elements do not
/// fit in host memory, rather than aborting.
pub mod patterns {
    use crate::error::{Error, Result};

    /// `seq * seq` falses, or `ShapeOverflow` where the host cannot hold them.
    fn square(seq: usize) -> Result<Vec<bool>> {
        let overflow = || Error::ShapeOverflow {
            tensor: "mask pattern",
            shape: [1, 1, seq, seq],
        };
        let elements = seq.checked_mul(seq).ok_or_else(overflow)?;
        let mut mask = Vec::new();
        mask.try_reserve_exact(elements).map_err(|_| overflow())?;
        mask.resize(elements, false);
        Ok(mask)
    }

    /// Longformer: each token sees the tokens within `window / 2` on either
    /// side; the `global` tokens see, and are seen by, every token.
    pub fn longformer(seq: usize, window: usize, global: &[usize]) -> Result<Vec<bool>> {
        let half = window / 2;
        let mut mask = square(seq)?;
        for i in 0..seq {
            for j in i.saturating_sub(half)..(i + half + 1).min(seq) {
                mask[i * seq + j] = true;
            }
        }
        for &g in global.iter().filter(|&&g| g < seq) {
            for t in 0..seq {
                mask[g * seq + t] = true;
                mask[t * seq + g] = true;
            }
        }
        Ok(mask)
    }

    /// Sparse Transformer, strided (Child et al. 2019), causal: query `i`
    /// sees key `j <= i` when `i - j < stride` (the previous `stride`
    /// positions) or `(i - j) % stride == 0` (every stride-th before).
    pub fn strided(seq: usize, stride: usize) -> Result<Vec<bool>> {
        let stride = stride.max(1);
        let mut mask = square(seq)?;
        for i in 0..seq {
            for j in 0..=i {
                mask[i * seq + j] = i - j < stride || (i - j) % stride == 0;
            }
        }
        Ok(mask)
    }

    /// Sparse Transformer, fixed, causal: query `i` sees key `j <= i` in
    /// its own block of `stride` positions, and the last `summary`
    /// positions of every block (the summary cells).
    pub fn fixed(seq: usize, stride: usize, summary: usize) -> Result<Vec<bool>> {
        let stride = stride.max(1);
        let mut mask = square(seq)?;
        for i in 0..seq {
            for j in 0..=i {
                mask[i * seq + j] =
                    i / stride == j / stride || j % stride >= stride - summary.min(stride);
            }
        }
        Ok(mask)
    }
}
