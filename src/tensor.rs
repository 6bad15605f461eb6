//! Device-resident tensors: a buffer plus a `[batch, seq, heads, head_dim]`
//! view of it (shape, element strides, offset, dtype).

use crate::allocation::create_buffer_with;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Storage type of a tensor's elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE 16-bit float (half).
    F16,
    /// bfloat16: f32's 8-bit exponent with a 7-bit mantissa.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Logical shape of an attention operand, in the crate's BSHD order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorShape {
    /// Batch entries.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
}

impl TensorShape {
    /// The shape `[batch, seq, heads, head_dim]`.
    pub fn new(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        TensorShape {
            batch,
            seq,
            heads,
            head_dim,
        }
    }

    /// `[batch, seq, heads, head_dim]` as an array.
    pub fn as_array(&self) -> [usize; 4] {
        [self.batch, self.seq, self.heads, self.head_dim]
    }

    /// Elements in the tensor (product of the four dims).
    pub fn elements(&self) -> usize {
        // Saturating: a count that overflows matches no data length (and
        // the shape checks report it as ShapeOverflow).
        [self.seq, self.heads, self.head_dim]
            .into_iter()
            .fold(self.batch, usize::saturating_mul)
    }

    /// Strides of the packed `[batch, seq, heads, head_dim]` layout.
    pub fn contiguous_strides(&self) -> Strides {
        Strides {
            batch: self.seq * self.heads * self.head_dim,
            seq: self.heads * self.head_dim,
            head: self.head_dim,
        }
    }
}

/// Element strides of the batch, seq and head axes; head_dim is contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements between consecutive batch entries.
    pub batch: usize,
    /// Elements between consecutive tokens.
    pub seq: usize,
    /// Elements between consecutive heads.
    pub head: usize,
}

/// A buffer on the device and a view of it as `[batch, seq, heads, head_dim]`.
/// Cloning shares the buffer.
///
/// Made by uploading ([`Tensor::from_f32`] and friends), by allocating
/// ([`Tensor::zeros`]), or by wrapping a buffer the caller already owns
/// ([`Tensor::from_buffer`], no copy). Every call checks that its tensors
/// belong to the device it runs on.
#[derive(Debug, Clone)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    /// The device the buffer belongs to (operations compare it with theirs).
    device: wgpu::Device,
    shape: TensorShape,
    strides: Strides,
    /// Element offset of `[0, 0, 0, 0]`.
    offset: usize,
    dtype: DType,
}

const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Tensor {
    /// Uploads packed BSHD f32 data.
    pub fn from_f32(gpu: &Gpu, shape: TensorShape, data: &[f32]) -> Result<Self> {
        Self::upload(
            gpu,
            shape,
            data.len(),
            bytemuck::cast_slice(data),
            DType::F32,
        )
    }

    /// Uploads packed BSHD f16 data, stored as 16-bit values.
    pub fn from_f16(gpu: &Gpu, shape: TensorShape, data: &[half::f16]) -> Result<Self> {
        let bits: Vec<u16> = data.iter().map(|x| x.to_bits()).collect();
        Self::upload(
            gpu,
            shape,
            data.len(),
            bytemuck::cast_slice(&bits),
            DType::F16,
        )
    }

    /// Uploads packed BSHD bf16 data, stored as 16-bit values.
    pub fn from_bf16(gpu: &Gpu, shape: TensorShape, data: &[half::bf16]) -> Result<Self> {
        let bits: Vec<u16> = data.iter().map(|x| x.to_bits()).collect();
        Self::upload(
            gpu,
            shape,
            data.len(),
            bytemuck::cast_slice(&bits),
            DType::BF16,
        )
    }

    /// Uploads f32 data stored as `dtype`, rounding to nearest.
    pub fn from_f32_as(gpu: &Gpu, shape: TensorShape, data: &[f32], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_f32(gpu, shape, data),
            DType::F16 => {
                let values: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                Self::from_f16(gpu, shape, &values)
            }
            DType::BF16 => {
                let values: Vec<half::bf16> =
                    data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                Self::from_bf16(gpu, shape, &values)
            }
        }
    }

    fn upload(
        gpu: &Gpu,
        shape: TensorShape,
        len: usize,
        bytes: &[u8],
        dtype: DType,
    ) -> Result<Self> {
        check_shape("tensor", shape)?;
        if len != shape.elements() {
            return Err(Error::DataLength {
                tensor: "tensor",
                expected: shape.elements(),
                got: len,
            });
        }
        check_buffer_size(gpu, "tensor", bytes.len() as u64)?;
        // (Padded to whole 4-byte words there.)
        let buffer = create_buffer_with(gpu, "wgpu-flash-attn tensor", bytes, TENSOR_USAGE)?;
        Ok(Self::contiguous(gpu, buffer, shape, dtype))
    }

    /// A packed BSHD f32 tensor with every element set to `value` (tests
    /// poison outputs with NaN this way).
    pub fn filled(gpu: &Gpu, shape: TensorShape, value: f32) -> Result<Self> {
        Self::filled_as(gpu, shape, value, DType::F32)
    }

    /// [`Tensor::filled`] stored as `dtype`.
    pub fn filled_as(gpu: &Gpu, shape: TensorShape, value: f32, dtype: DType) -> Result<Self> {
        // Checked before the host values are allocated.
        check_shape("tensor", shape)?;
        check_buffer_size(gpu, "tensor", shape_bytes("tensor", shape, dtype)?)?;
        Self::from_f32_as(gpu, shape, &vec![value; shape.elements()], dtype)
    }

    /// A packed BSHD tensor of zeros (cleared on the device, no upload).
    pub fn zeros(gpu: &Gpu, shape: TensorShape, dtype: DType) -> Result<Self> {
        check_shape("tensor", shape)?;
        let bytes = shape_bytes("tensor", shape, dtype)?;
        check_buffer_size(gpu, "tensor", bytes)?;
        // wgpu zero-initialises new buffers.
        let buffer = gpu.create_buffer(
            "wgpu-flash-attn tensor",
            bytes.next_multiple_of(4),
            TENSOR_USAGE,
        )?;
        Ok(Self::contiguous(gpu, buffer, shape, dtype))
    }

    fn contiguous(gpu: &Gpu, buffer: wgpu::Buffer, shape: TensorShape, dtype: DType) -> Self {
        Tensor {
            buffer,
            device: gpu.device.clone(),
            strides: shape.contiguous_strides(),
            shape,
            offset: 0,
            dtype,
        }
    }

    /// Wraps a buffer the caller owns, without a copy: the tensor reads and
    /// writes `buffer` itself. `offset` and `strides` are in elements;
    /// the head dim is contiguous. Checked here: the buffer belongs to
    /// `gpu`'s device, has `STORAGE` usage, is a whole number of 4-byte
    /// words, and holds every element of the view. Each call then checks
    /// vec4 alignment (strides and offset multiples of 4 elements) and the
    /// binding limits. Downloading ([`Tensor::to_f32_vec`]) also needs
    /// `COPY_SRC`.
    ///
    /// ```
    /// # use wgpu::util::DeviceExt;
    /// # use wgpu_flash_attn::{DType, Gpu, Strides, Tensor, TensorShape};
    /// # fn main() -> Result<(), wgpu_flash_attn::Error> {
    /// # if std::env::var("FLASH_ATTN_SKIP_GPU_TESTS").as_deref() == Ok("1") { eprintln!("SKIPPED: FLASH_ATTN_SKIP_GPU_TESTS=1"); return Ok(()); }
    /// # let gpu = Gpu::new()?;
    /// // The caller's BHSD activations, [batch 2, heads 8, seq 128, head_dim 64].
    /// let values: Vec<f32> = (0..2 * 8 * 128 * 64).map(|i| i as f32).collect();
    /// let activations = gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
    ///     label: Some("my activations"),
    ///     contents: bytemuck::cast_slice(&values),
    ///     usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    /// });
    /// // Seen as BSHD [batch 2, seq 128, heads 8, head_dim 64], no copy.
    /// let shape = TensorShape::new(2, 128, 8, 64);
    /// let bhsd = Strides { batch: 8 * 128 * 64, seq: 64, head: 128 * 64 };
    /// let q = Tensor::from_buffer(&gpu, activations.clone(), shape, bhsd, 0, DType::F32)?;
    /// assert!(q.buffer() == &activations);
    /// // Element [b=0, s=1, h=2, d=3] is BHSD element (2 * 128 + 1) * 64 + 3.
    /// assert_eq!(q.to_f32_vec(&gpu)?[(1 * 8 + 2) * 64 + 3], ((2 * 128 + 1) * 64 + 3) as f32);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_buffer(
        gpu: &Gpu,
        buffer: wgpu::Buffer,
        shape: TensorShape,
        strides: Strides,
        offset: usize,
        dtype: DType,
    ) -> Result<Self> {
        check_shape("tensor", shape)?;
        check_caller_buffer(gpu, "tensor", &buffer)?;
        let tensor = Tensor {
            buffer,
            device: gpu.device.clone(),
            shape,
            strides,
            offset,
            dtype,
        };
        tensor.check_in_bounds("tensor")?;
        Ok(tensor)
    }

    /// Another view of the same buffer: e.g. one head-interleaved QKV
    /// projection seen as Q, K and V, or a BHSD tensor seen as BSHD.
    pub fn view(&self, shape: TensorShape, strides: Strides, offset: usize) -> Result<Self> {
        check_shape("view", shape)?;
        let view = Tensor {
            buffer: self.buffer.clone(),
            device: self.device.clone(),
            shape,
            strides,
            offset,
            dtype: self.dtype,
        };
        view.check_in_bounds("view")?;
        Ok(view)
    }

    /// Logical `[batch, seq, heads, head_dim]` of the view.
    pub fn shape(&self) -> TensorShape {
        self.shape
    }
    /// Element strides of the batch, seq and head axes.
    pub fn strides(&self) -> Strides {
        self.strides
    }
    /// Element offset of `[0, 0, 0, 0]` in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Storage type of the elements.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The underlying buffer (shared with clones and views).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Elements the buffer holds.
    pub fn buffer_elements(&self) -> usize {
        self.buffer.size() as usize / self.dtype.size_bytes()
    }

    /// Checks that no two elements of the view share a location (what an
    /// output needs: a broadcast stride of 0, or axes that interleave,
    /// would have the kernels race): the axes longer than 1, taken by
    /// stride, each step past everything the inner ones span.
    pub(crate) fn check_distinct(&self, tensor: &'static str) -> Result<()> {
        let (s, st) = (self.shape, self.strides);
        let mut axes = [
            (st.batch, s.batch),
            (st.seq, s.seq),
            (st.head, s.heads),
            (1, s.head_dim),
        ];
        axes.sort_by_key(|&(stride, _)| stride);
        let mut span = 1usize;
        for (stride, len) in axes.into_iter().filter(|&(_, len)| len > 1) {
            if stride < span {
                return Err(Error::OverlappingOutput {
                    tensor,
                    shape: s.as_array(),
                    batch_stride: st.batch,
                    seq_stride: st.seq,
                    head_stride: st.head,
                });
            }
            span = stride.saturating_mul(len - 1).saturating_add(span);
        }
        Ok(())
    }

    /// One past the largest element index the view touches.
    /// Saturates instead of wrapping, so an absurd view fails the bounds
    /// check rather than passing it.
    pub fn extent(&self) -> usize {
        let s = self.shape;
        [
            (s.batch - 1, self.strides.batch),
            (s.seq - 1, self.strides.seq),
            (s.heads - 1, self.strides.head),
            (1, s.head_dim),
        ]
        .into_iter()
        .fold(self.offset, |sum, (n, stride)| {
            sum.saturating_add(n.saturating_mul(stride))
        })
    }

    /// Whether the tensor lives on `gpu`'s device.
    pub(crate) fn check_device(&self, gpu: &Gpu, tensor: &'static str) -> Result<()> {
        gpu.check_owner(&self.device, tensor)
    }

    pub(crate) fn check_in_bounds(&self, tensor: &'static str) -> Result<()> {
        let needed = self.extent();
        let available = self.buffer_elements();
        if needed > available {
            return Err(Error::OutOfBounds {
                tensor,
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Downloads the view as packed BSHD f32 values (f16 and bf16 widen
    /// exactly), blocking until the GPU is done. In a browser, which
    /// cannot block, [`Error::BlockingInBrowser`]: use
    /// [`Tensor::to_f32_vec_async`] there.
    pub fn to_f32_vec(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        block_on_readback(self.to_f32_vec_async(gpu))
    }

    /// [`Tensor::to_f32_vec`] as a future: in a browser it resolves once
    /// the GPU's work is done and the browser's event loop has mapped the
    /// copy (it also reports the errors of earlier calls on `gpu` that the
    /// browser answered late); natively it has finished when first polled.
    pub async fn to_f32_vec_async(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.check_device(gpu, "tensor")?;
        let bytes: Vec<u8> = read_buffer_async(gpu, "tensor", &self.buffer).await?;
        let raw: Vec<f32> = match self.dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        let s = self.shape;
        let mut out = Vec::with_capacity(s.elements());
        for b in 0..s.batch {
            for i in 0..s.seq {
                for h in 0..s.heads {
                    let start = self.offset
                        + b * self.strides.batch
                        + i * self.strides.seq
                        + h * self.strides.head;
                    out.extend_from_slice(&raw[start..start + s.head_dim]);
                }
            }
        }
        Ok(out)
    }
}

impl Tensor {
    /// Downloads as f16: exact for f16 tensors, rounded to nearest otherwise.
    pub fn to_f16_vec(&self, gpu: &Gpu) -> Result<Vec<half::f16>> {
        Ok(self
            .to_f32_vec(gpu)?
            .into_iter()
            .map(half::f16::from_f32)
            .collect())
    }

    /// Downloads as bf16: exact for bf16 tensors, rounded to nearest
    /// otherwise.
    pub fn to_bf16_vec(&self, gpu: &Gpu) -> Result<Vec<half::bf16>> {
        Ok(self
            .to_f32_vec(gpu)?
            .into_iter()
            .map(half::bf16::from_f32)
            .collect())
    }
}

pub(crate) fn check_shape(tensor: &'static str, shape: TensorShape) -> Result<()> {
    if shape.as_array().contains(&0) {
        return Err(Error::ZeroDimension {
            tensor,
            shape: shape.as_array(),
        });
    }
    shape_bytes(tensor, shape, DType::F32).map(|_| ())
}

/// Bytes of a packed tensor of `shape`, or `ShapeOverflow` when the count
/// does not fit (so that no later product wraps around).
pub(crate) fn shape_bytes(tensor: &'static str, shape: TensorShape, dtype: DType) -> Result<u64> {
    shape
        .as_array()
        .into_iter()
        .chain([dtype.size_bytes()])
        .try_fold(1usize, usize::checked_mul)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or(Error::ShapeOverflow {
            tensor,
            shape: shape.as_array(),
        })
}

/// `BufferUsage` unless `buffer` has `needed` (a caller's buffer may lack
/// what a particular call does with it).
pub(crate) fn require_usage(
    tensor: &'static str,
    buffer: &wgpu::Buffer,
    needed: wgpu::BufferUsages,
    why: &'static str,
) -> Result<()> {
    if buffer.usage().contains(needed) {
        return Ok(());
    }
    Err(Error::BufferUsage {
        tensor,
        usage: format!("{:?}", buffer.usage()),
        // One flag at a time: its bitflags name.
        needed: needed
            .iter_names()
            .next()
            .map_or("(none)", |(name, _)| name),
        why,
    })
}

/// Checks a buffer the caller hands over: this device's, usable as
/// storage, whole 4-byte words.
pub(crate) fn check_caller_buffer(
    gpu: &Gpu,
    tensor: &'static str,
    buffer: &wgpu::Buffer,
) -> Result<()> {
    require_usage(
        tensor,
        buffer,
        wgpu::BufferUsages::STORAGE,
        "bind it to the kernels",
    )?;
    // Zero bytes cannot hold a view; the device probe binds 4.
    if buffer.size() == 0 || !buffer.size().is_multiple_of(4) {
        return Err(Error::BufferSize {
            tensor,
            bytes: buffer.size(),
        });
    }
    gpu.check_own_buffer(tensor, buffer)
}

pub(crate) fn check_buffer_size(gpu: &Gpu, tensor: &'static str, bytes: u64) -> Result<()> {
    let limit = gpu.info().limits.max_buffer_size;
    if bytes > limit {
        return Err(Error::BufferTooLarge {
            tensor,
            bytes,
            limit_name: "max_buffer_size",
            limit,
        });
    }
    Ok(())
}

/// Checks that a buffer of `bytes` can be bound whole as storage: within
/// both `max_buffer_size` and `max_storage_buffer_binding_size`.
pub(crate) fn check_binding_size(gpu: &Gpu, tensor: &'static str, bytes: u64) -> Result<()> {
    check_buffer_size(gpu, tensor, bytes)?;
    let limit = gpu.info().limits.max_storage_buffer_binding_size;
    if bytes > limit {
        return Err(Error::BufferTooLarge {
            tensor,
            bytes,
            limit_name: "max_storage_buffer_binding_size",
            limit,
        });
    }
    Ok(())
}

/// Copies a whole storage buffer back to the host, blocking until the GPU
/// is done: [`read_buffer_async`] run to its end (natively it has finished
/// when first polled); a typed error in a browser, which cannot block.
pub(crate) fn read_buffer<T: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    buffer: &wgpu::Buffer,
) -> Result<Vec<T>> {
    block_on_readback(read_buffer_async(gpu, name, buffer))
}

/// Runs an async readback to its end: natively it has finished when first
/// polled (its wait happens inside); a browser cannot block, which is
/// [`Error::BlockingInBrowser`].
pub(crate) fn block_on_readback<T>(readback: impl Future<Output = Result<T>>) -> Result<T> {
    if cfg!(target_arch = "wasm32") {
        return Err(Error::BlockingInBrowser { what: "a readback" });
    }
    pollster::block_on(readback)
}

/// Copies a whole storage buffer back to the host once the GPU is done
/// with it: natively the wait happens before the first poll returns; in a
/// browser the future resolves from the browser's event loop.
pub(crate) async fn read_buffer_async<T: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    buffer: &wgpu::Buffer,
) -> Result<Vec<T>> {
    read_ranges_async(gpu, name, &[(buffer, 0, buffer.size())]).await
}

/// [`read_buffer_async`] for byte ranges `(buffer, offset, size)` of
/// buffers (offsets and sizes multiples of 4), back to back in the result.
pub(crate) async fn read_ranges_async<T: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<T>> {
    for (buffer, _, _) in ranges {
        require_usage(name, buffer, wgpu::BufferUsages::COPY_SRC, "download it")?;
    }
    let size: u64 = ranges.iter().map(|&(_, _, size)| size).sum();
    check_buffer_size(gpu, name, size)?;
    let staging = gpu.create_buffer(
        "wgpu-flash-attn readback",
        size,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    )?;
    let (sender, receiver) = futures_channel::oneshot::channel();
    // Under a validation scope: a buffer of a lost device fails here as a
    // typed error rather than in wgpu's default handler, which panics.
    gpu.submit_recorded("wgpu-flash-attn readback", |encoder| {
        let mut at = 0;
        for &(buffer, offset, size) in ranges {
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, at, size);
            at += size;
        }
        Ok(())
    })?;
    gpu.validated("wgpu-flash-attn readback", || {
        staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |result| {
                // Dropped only if the future was dropped: nobody waits then.
                let _ = sender.send(result);
            });
    })?;
    // Natively this runs the callback; a browser maps on its own.
    gpu.wait()?;
    let mapped = receiver.await.map_err(|e| e.to_string());
    // What a browser's scopes caught while the copy was under way comes
    // first: a failed map is often its consequence.
    gpu.check_alive()?;
    mapped
        .and_then(|result| result.map_err(|e| e.to_string()))
        .map_err(Error::Readback)?;
    let view = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| Error::Readback(e.to_string()))?;
    let values = bytemuck::cast_slice::<u8, T>(&view).to_vec();
    drop(view);
    staging.unmap();
    Ok(values)
}
