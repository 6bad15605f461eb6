//! Rotary position embedding (RoPE): the options, the frequency table the
//! kernels read, and the standalone in-place kernel for prefill.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::RopeParams;
use crate::pipelines::{
    ELEMENTWISE_WORKGROUP, bind_buffers, elementwise_groups, encode_dispatches,
};
use crate::shaders::Specialization;
use crate::tensor::{DType, Tensor};

/// The kernels split positions as `hi * ANGLE_SPLIT + lo` (rope_common.wgsl).
const ANGLE_SPLIT: f64 = 1024.0;
/// Fixed-point units of one turn in the frequency table.
const TURN_UNITS: f64 = 4_294_967_296.0;

/// Which elements of a head vector form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// GPT-J: pairs `(2i, 2i + 1)`.
    Interleaved,
    /// GPT-NeoX, Llama: pairs `(i, i + rotary_dim / 2)`.
    HalfSplit,
}

/// Rotary embedding options: pair `i` of the first `rotary_dim` elements
/// turns by `position * base^(-2i / rotary_dim)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Which elements of a head form the rotated pairs.
    pub style: RopeStyle,
    /// The frequency base (theta); 10000 in the RoFormer paper, 500000 in
    /// Llama 3.
    pub base: f64,
    /// Rotated elements per head (even); `None` rotates the whole head.
    pub rotary_dim: Option<usize>,
}

impl Rope {
    /// Options with `style`, base 10000 and the whole head rotated.
    pub fn new(style: RopeStyle) -> Self {
        Rope {
            style,
            base: 10_000.0,
            rotary_dim: None,
        }
    }
    /// Sets the frequency base (theta); must be finite and > 1.
    pub fn base(mut self, base: f64) -> Self {
        self.base = base;
        self
    }
    /// Rotates only the first `rotary_dim` elements of each head (even, at most the head dim).
    pub fn rotary_dim(mut self, rotary_dim: usize) -> Self {
        self.rotary_dim = Some(rotary_dim);
        self
    }

    /// The rotated elements per head for `head_dim`, after checking the
    /// options.
    pub fn checked_rotary_dim(&self, head_dim: usize) -> Result<usize> {
        if !self.base.is_finite() || self.base <= 1.0 {
            return Err(Error::RopeBase(self.base));
        }
        let rotary_dim = self.rotary_dim.unwrap_or(head_dim);
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(Error::RotaryDim {
                rotary_dim,
                head_dim,
            });
        }
        Ok(rotary_dim)
    }

    /// Angle per position of pair `i`.
    pub fn theta(&self, i: usize, rotary_dim: usize) -> f64 {
        self.base.powf(-2.0 * i as f64 / rotary_dim as f64)
    }

    /// Per pair: the turns (angle / 2pi) that one position and
    /// `ANGLE_SPLIT` positions advance it, in 32-bit fixed point (units of
    /// 2^-32 turn), computed in f64. The kernels multiply them by the two
    /// parts of the position with wrapping integer arithmetic, which keeps
    /// whole turns out exactly: the angle they take the sine and cosine of
    /// (with their own polynomials, rope_common.wgsl's `turn_cos_sin`) is
    /// off by at most about position x 2^-42 turn, where f32 angles were
    /// off by 2e-4 rad at position 184,664.
    pub(crate) fn frequency_table(&self, rotary_dim: usize) -> Vec<[u32; 2]> {
        let fixed_turns = |radians: f64| {
            let turns = (radians / std::f64::consts::TAU).rem_euclid(1.0);
            // Rounding may reach a whole turn, which is 0 mod 2^32.
            ((turns * TURN_UNITS).round() as u64 & u64::from(u32::MAX)) as u32
        };
        (0..rotary_dim / 2)
            .map(|i| {
                let theta = self.theta(i, rotary_dim);
                [fixed_turns(theta), fixed_turns(ANGLE_SPLIT * theta)]
            })
            .collect()
    }

    /// The kernels' encoding of the style.
    pub(crate) fn half_split_flag(&self) -> u32 {
        u32::from(self.style == RopeStyle::HalfSplit)
    }
}

/// Checks that every sequence's positions `first .. first + tokens` fit
/// the kernels' u32 positions (`RopePosition` otherwise).
pub(crate) fn check_positions(firsts: impl Iterator<Item = u64>, tokens: usize) -> Result<()> {
    check_position_ranges(firsts.map(|first| (first, tokens)))
}

/// [`check_positions`] with each sequence's own token count.
pub(crate) fn check_position_ranges(ranges: impl Iterator<Item = (u64, usize)>) -> Result<()> {
    for (sequence, (first, tokens)) in ranges.enumerate() {
        if tokens > 0 && first + tokens as u64 - 1 > u64::from(u32::MAX) {
            return Err(Error::RopePosition {
                sequence,
                first,
                tokens,
            });
        }
    }
    Ok(())
}

impl Gpu {
    /// Records the rotation of `tensor` (`[batch, tokens, heads,
    /// head_dim]`, f32, head dim contiguous) in place into `encoder`: token
    /// `t` of sequence `b` is at position `first_positions[b] + t`.
    pub fn rope(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        tensor: &Tensor,
        rope: &Rope,
        first_positions: &[u32],
    ) -> Result<()> {
        let shape = tensor.shape();
        let rotary_dim = rope.checked_rotary_dim(shape.head_dim)?;
        if tensor.dtype() != DType::F32 {
            return Err(Error::DTypeUnsupported {
                tensor: "rope tensor",
                got: tensor.dtype(),
                needed: DType::F32,
            });
        }
        if first_positions.len() != shape.batch {
            return Err(Error::DataLength {
                tensor: "first_positions",
                expected: shape.batch,
                got: first_positions.len(),
            });
        }
        check_positions(first_positions.iter().map(|&p| u64::from(p)), shape.seq)?;
        tensor.check_in_bounds("rope tensor")?;
        // Rotated in place: every element once.
        tensor.check_distinct("rope tensor")?;
        // Bound whole, and indexed in elements with u32 strides and offset.
        crate::tensor::check_binding_size(self, "rope tensor", tensor.buffer().size())?;
        crate::operands::check_index_range("rope tensor", tensor, 1)?;
        tensor.check_device(self, "rope tensor")?;
        let strides = tensor.strides();
        let params = RopeParams {
            batch: shape.batch as u32,
            tokens: shape.seq as u32,
            heads: shape.heads as u32,
            head_dim: shape.head_dim as u32,
            rotary_dim: rotary_dim as u32,
            half_split: rope.half_split_flag(),
            src_batch: strides.batch as u32,
            src_seq: strides.seq as u32,
            src_head: strides.head as u32,
            src_offset: tensor.offset() as u32,
            ..RopeParams::default()
        };
        let starts: Vec<[u32; 2]> = first_positions.iter().map(|&p| [0, p]).collect();
        let invocations = (shape.elements() / 2) as u64;
        let groups = elementwise_groups(self, "rope", invocations)?;
        let spec = Specialization::Rope {
            workgroup_size: ELEMENTWISE_WORKGROUP,
        };
        let pipeline = self.pipelines.get(self, &spec)?;
        let uniform = self.uniform_buffer("rope params", bytemuck::bytes_of(&params))?;
        let starts = self.storage_buffer("rope starts", bytemuck::cast_slice(&starts))?;
        let freqs = self.storage_buffer(
            "rope frequencies",
            bytemuck::cast_slice(&rope.frequency_table(rotary_dim)),
        )?;
        let bind_group = bind_buffers(
            self,
            &pipeline.bind_group_layout,
            &[&uniform, &starts, &freqs, tensor.buffer()],
        )?;
        encode_dispatches(encoder, "rope", &pipeline, &[bind_group], groups);
        Ok(())
    }
}
