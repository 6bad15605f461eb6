//! The logsumexp of each query row: the forward writes it, the backward
//! and the merge of key chunks read it.

use crate::allocation::create_buffer_with;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{TensorShape, block_on_readback, check_binding_size, read_buffer_async};

/// Logsumexp of each query row, `[batch, heads_q, seq_q]` f32, natural log,
/// packed from the start of its buffer.
#[derive(Debug, Clone)]
pub struct Lse {
    buffer: wgpu::Buffer,
    device: wgpu::Device,
    batch: usize,
    heads: usize,
    seq: usize,
}

impl Lse {
    /// A new logsumexp buffer, filled with NaN so that a row a call did not
    /// write stands out.
    pub fn new(gpu: &Gpu, batch: usize, heads: usize, seq: usize) -> Result<Self> {
        let n = lse_elements(batch, heads, seq)?;
        crate::tensor::check_buffer_size(gpu, "lse", 4 * n as u64)?;
        let buffer = create_buffer_with(
            gpu,
            "wgpu-flash-attn lse",
            bytemuck::cast_slice(&vec![f32::NAN; n]),
            // COPY_DST: a program may overwrite it (queue writes).
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(Lse {
            buffer,
            device: gpu.device.clone(),
            batch,
            heads,
            seq,
        })
    }

    /// Wraps a buffer the caller owns (no copy): `[batch, heads, seq]` f32
    /// from byte 0. Checked: this device's, `STORAGE` usage, large enough.
    /// Downloads need `COPY_SRC`.
    pub fn from_buffer(
        gpu: &Gpu,
        buffer: wgpu::Buffer,
        batch: usize,
        heads: usize,
        seq: usize,
    ) -> Result<Self> {
        let n = lse_elements(batch, heads, seq)?;
        crate::tensor::check_caller_buffer(gpu, "lse", &buffer)?;
        check_binding_size(gpu, "lse", buffer.size())?;
        let available = buffer.size() as usize / 4;
        if n > available {
            return Err(Error::OutOfBounds {
                tensor: "lse",
                needed: n,
                available,
            });
        }
        Ok(Lse {
            buffer,
            device: gpu.device.clone(),
            batch,
            heads,
            seq,
        })
    }

    /// The buffer the values live in.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// Batch entries.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }
    /// Query rows per head.
    pub fn seq(&self) -> usize {
        self.seq
    }
    /// `[batch, heads, seq]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.batch, self.heads, self.seq]
    }

    /// Downloads the values, `[batch, heads, seq]` (needs `COPY_SRC`),
    /// blocking until the GPU is done (in a browser: use
    /// [`Lse::to_vec_async`]).
    pub fn to_vec(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        block_on_readback(self.to_vec_async(gpu))
    }

    /// [`Lse::to_vec`] as a future, as [`crate::Tensor::to_f32_vec_async`].
    pub async fn to_vec_async(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.check_device(gpu)?;
        let mut values: Vec<f32> = read_buffer_async(gpu, "lse", &self.buffer).await?;
        values.truncate(self.batch * self.heads * self.seq);
        Ok(values)
    }

    pub(crate) fn check_device(&self, gpu: &Gpu) -> Result<()> {
        gpu.check_owner(&self.device, "lse")
    }

    pub(crate) fn device(&self) -> &wgpu::Device {
        &self.device
    }
}

/// Elements of a `[batch, heads, seq]` logsumexp, checked for zero and
/// overflow like a tensor's.
fn lse_elements(batch: usize, heads: usize, seq: usize) -> Result<usize> {
    let shape = TensorShape::new(batch, heads, seq, 1);
    crate::tensor::check_shape("lse", shape)?;
    Ok(shape.elements())
}

/// The logsumexp output a call was given, if any: on this device and
/// shaped `expected` = `[batch, heads_q, seq_q]`.
pub(crate) fn check_lse_output(gpu: &Gpu, lse: Option<&Lse>, expected: [usize; 3]) -> Result<()> {
    let Some(lse) = lse else {
        return Ok(());
    };
    lse.check_device(gpu)?;
    if lse.dims() != expected {
        return Err(Error::LseShape {
            expected,
            got: lse.dims(),
        });
    }
    Ok(())
}
