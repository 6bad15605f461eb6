//! The recurrent state of causal linear attention, kept on the device.

use crate::allocation::create_buffer_with;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{TensorShape, check_binding_size, read_buffer};

/// The state after a prefix of tokens, one per (batch, KV head): `S =
/// sum_j phi(k_j) v_j^T` (`[head_dim, head_dim_v]`, row-major) and the
/// normaliser `z = sum_j phi(k_j)` (`[head_dim]`), f32.
///
/// A causal [`crate::Gpu::linear_attention`] call given a state starts
/// from it and leaves the state after its last token in it, so a prompt
/// processed in pieces, or one token at a time (recurrent decoding), gives
/// the same outputs as one causal call over the whole sequence. Layout in
/// the buffer: per (batch, KV head), `S` then `z`.
#[derive(Debug, Clone)]
pub struct LinearState {
    buffer: wgpu::Buffer,
    device: wgpu::Device,
    batch: usize,
    heads: usize,
    head_dim: usize,
    head_dim_v: usize,
}

impl LinearState {
    /// The empty state (no tokens seen): zeros.
    pub fn zeros(
        gpu: &Gpu,
        batch: usize,
        heads: usize,
        head_dim: usize,
        head_dim_v: usize,
    ) -> Result<Self> {
        slot_floats(batch, heads, head_dim, head_dim_v)?;
        // Checked before the host zeros are allocated.
        let s_shape = TensorShape::new(batch, heads, head_dim, head_dim_v);
        let s_bytes = crate::tensor::shape_bytes("linear state", s_shape, crate::DType::F32)?;
        crate::tensor::check_binding_size(gpu, "linear state", s_bytes)?;
        Self::from_f32(
            gpu,
            [batch, heads, head_dim, head_dim_v],
            &vec![0.0; batch * heads * head_dim * head_dim_v],
            &vec![0.0; batch * heads * head_dim],
        )
    }

    /// A state from host values: `s` is `[batch, heads, head_dim,
    /// head_dim_v]`, `z` is `[batch, heads, head_dim]`; `dims` is `[batch,
    /// heads, head_dim, head_dim_v]`.
    pub fn from_f32(gpu: &Gpu, dims: [usize; 4], s: &[f32], z: &[f32]) -> Result<Self> {
        let [batch, heads, head_dim, head_dim_v] = dims;
        let slot = slot_floats(batch, heads, head_dim, head_dim_v)?;
        let (s_len, z_len) = (head_dim * head_dim_v, head_dim);
        let slots = batch * heads;
        for (tensor, expected, got) in [
            ("state S", slots * s_len, s.len()),
            ("state z", slots * z_len, z.len()),
        ] {
            if expected != got {
                return Err(Error::DataLength {
                    tensor,
                    expected,
                    got,
                });
            }
        }
        let mut packed = Vec::with_capacity(slots * slot);
        for index in 0..slots {
            packed.extend_from_slice(&s[index * s_len..(index + 1) * s_len]);
            packed.extend_from_slice(&z[index * z_len..(index + 1) * z_len]);
        }
        check_binding_size(gpu, "linear state", 4 * packed.len() as u64)?;
        let buffer = create_buffer_with(
            gpu,
            "wgpu-flash-attn linear state",
            bytemuck::cast_slice(&packed),
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(LinearState {
            buffer,
            device: gpu.device.clone(),
            batch,
            heads,
            head_dim,
            head_dim_v,
        })
    }

    /// Downloads `(S, z)`: `[batch, heads, head_dim, head_dim_v]` and
    /// `[batch, heads, head_dim]`.
    pub fn to_f32_vecs(&self, gpu: &Gpu) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_device(gpu)?;
        let packed: Vec<f32> = read_buffer(gpu, "linear state", &self.buffer)?;
        let (s_len, z_len) = (self.head_dim * self.head_dim_v, self.head_dim);
        let mut s = Vec::with_capacity(self.batch * self.heads * s_len);
        let mut z = Vec::with_capacity(self.batch * self.heads * z_len);
        for slot in packed.chunks_exact(s_len + z_len) {
            s.extend_from_slice(&slot[..s_len]);
            z.extend_from_slice(&slot[s_len..]);
        }
        Ok((s, z))
    }

    /// `[batch, heads, head_dim, head_dim_v]`.
    pub fn dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.head_dim, self.head_dim_v]
    }

    /// The buffer the state lives in (per slot: `S` then `z`).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub(crate) fn check_device(&self, gpu: &Gpu) -> Result<()> {
        gpu.check_owner(&self.device, "linear state")
    }
}

/// Floats of one (batch, head) slot, after checking the dims like a
/// tensor's (non-zero, no overflow).
fn slot_floats(batch: usize, heads: usize, head_dim: usize, head_dim_v: usize) -> Result<usize> {
    crate::tensor::check_shape(
        "linear state",
        TensorShape::new(batch, heads, head_dim, head_dim_v + 1),
    )?;
    Ok(head_dim * (head_dim_v + 1))
}
