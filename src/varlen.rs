//! Batches of unequal sequences without work on padding: packed
//! variable-length batches with cumulative offsets (FlashAttention's
//! `cu_seqlens`), and dense batches with per-sequence valid lengths (BERT's
//! key padding). Each sequence runs as views of the caller's tensors, so
//! padding is never read or computed.

use wgpu::util::DeviceExt;

use crate::attention::{AttentionArgs, Lse, check_lse_output};
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::{Tensor, TensorShape, require_usage};

/// Valid lengths of each sequence of a dense batch.
#[derive(Debug, Clone, Copy)]
pub struct ValidLengths<'a> {
    /// Query rows per sequence; rows past it are written as zeros (and
    /// logsumexp +inf). `None`: every row.
    pub q: Option<&'a [usize]>,
    /// Keys per sequence; keys past it are never read.
    pub kv: &'a [usize],
}

/// One sequence: its rows in the caller's tensors.
pub(crate) struct Sequence {
    /// Batch index and first row in the caller's Q/O (and logsumexp).
    pub batch: usize,
    pub q_start: usize,
    pub q_len: usize,
    /// Batch index and first key in the caller's K/V.
    pub kv_batch: usize,
    pub kv_start: usize,
    pub kv_len: usize,
}

/// The sequences of a packed variable-length batch, after checking that
/// every tensor has batch 1 and that the offsets fit the packed lengths.
pub(crate) fn varlen_sequences(
    tensors: &[(&'static str, &Tensor)],
    total_q: usize,
    total_k: usize,
    cu_seqlens_q: &[usize],
    cu_seqlens_k: &[usize],
) -> Result<Vec<Sequence>> {
    for &(name, tensor) in tensors {
        if tensor.shape().batch != 1 {
            return Err(Error::ShapeMismatch {
                what: "varlen tensors are packed as [1, total tokens, heads, head_dim]",
                left_name: name,
                left: tensor.shape().batch,
                right_name: "expected batch",
                right: 1,
            });
        }
    }
    check_offsets("cu_seqlens_q", cu_seqlens_q, total_q)?;
    check_offsets("cu_seqlens_k", cu_seqlens_k, total_k)?;
    if cu_seqlens_q.len() != cu_seqlens_k.len() {
        return Err(Error::DataLength {
            tensor: "cu_seqlens_k (one entry per cu_seqlens_q entry)",
            expected: cu_seqlens_q.len(),
            got: cu_seqlens_k.len(),
        });
    }
    Ok(cu_seqlens_q
        .windows(2)
        .zip(cu_seqlens_k.windows(2))
        .map(|(qs, ks)| Sequence {
            batch: 0,
            q_start: qs[0],
            q_len: qs[1] - qs[0],
            kv_batch: 0,
            kv_start: ks[0],
            kv_len: ks[1] - ks[0],
        })
        .collect())
}

/// The sequences of a dense batch with valid lengths (one per batch entry,
/// from row 0), after checking the lengths against `shape`.
pub(crate) fn padded_sequences(
    shape: &AttentionShape,
    lens: &ValidLengths<'_>,
) -> Result<Vec<Sequence>> {
    let check = |name: &'static str, values: &[usize], max: usize| -> Result<()> {
        if values.len() != shape.batch {
            return Err(Error::DataLength {
                tensor: name,
                expected: shape.batch,
                got: values.len(),
            });
        }
        for (index, &len) in values.iter().enumerate() {
            if len > max {
                return Err(Error::ValidLength {
                    name,
                    index,
                    len,
                    max,
                });
            }
        }
        Ok(())
    };
    check("valid kv lengths", lens.kv, shape.seq_kv)?;
    if let Some(q_lens) = lens.q {
        check("valid q lengths", q_lens, shape.seq_q)?;
    }
    Ok((0..shape.batch)
        .map(|b| Sequence {
            batch: b,
            q_start: 0,
            q_len: lens.q.map_or(shape.seq_q, |q| q[b]),
            kv_batch: b,
            kv_start: 0,
            kv_len: lens.kv[b],
        })
        .collect())
}

fn check_offsets(name: &'static str, offsets: &[usize], total: usize) -> Result<()> {
    let problem = |index: usize, problem: &'static str| Error::CuSeqlens {
        name,
        index,
        value: offsets.get(index).copied().unwrap_or(0),
        total,
        problem,
    };
    if offsets.is_empty() {
        return Err(problem(0, "needs at least one entry (0)"));
    }
    if offsets[0] != 0 {
        return Err(problem(0, "must start at 0"));
    }
    for index in 1..offsets.len() {
        if offsets[index] < offsets[index - 1] {
            return Err(problem(index, "must not decrease"));
        }
    }
    let last = offsets.len() - 1;
    if offsets[last] != total {
        return Err(problem(last, "must end at the total token count"));
    }
    Ok(())
}

impl Gpu {
    /// A packed variable-length batch ([`crate::Sequences::Varlen`]):
    /// exactly what running each sequence alone gives (sequences of length
    /// 0 are allowed). Records one dispatch per non-empty sequence.
    pub(crate) fn encode_varlen_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        cu_seqlens_q: &[usize],
        cu_seqlens_k: &[usize],
    ) -> Result<()> {
        let sequences = varlen_sequences(
            &[
                ("q", args.q),
                ("k", args.k),
                ("v", args.v),
                ("out", args.out),
            ],
            args.q.shape().seq,
            args.k.shape().seq,
            cu_seqlens_q,
            cu_seqlens_k,
        )?;
        self.encode_sequences(encoder, args, config, sequences, Vec::new())
    }

    /// A dense batch where sequence `b` has `lens.kv[b]` valid keys (and,
    /// if given, `lens.q[b]` valid queries): the keys past it are neither
    /// read nor attended, as a key-padding mask would do, but no work is
    /// spent on them. Causal and windows align each sequence's valid
    /// queries with its valid keys (bottom-right).
    pub(crate) fn encode_padded_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        lens: &ValidLengths<'_>,
    ) -> Result<()> {
        let shape = args.shape()?;
        let sequences = padded_sequences(&shape, lens)?;
        let padding_rows = sequences
            .iter()
            .filter(|s| s.q_len < shape.seq_q)
            .map(|s| (s.batch, s.q_len, shape.seq_q - s.q_len))
            .collect();
        self.encode_sequences(encoder, args, config, sequences, padding_rows)
    }

    /// Runs each sequence on views of `args`, and writes zeros (logsumexp
    /// +inf) for rows that see no key: those of sequences without keys, and
    /// `padding_rows` as (batch, first row, rows).
    fn encode_sequences(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        sequences: Vec<Sequence>,
        padding_rows: Vec<(usize, usize, usize)>,
    ) -> Result<()> {
        let (q_shape, kv_shape) = (args.q.shape(), args.k.shape());
        // Q, K, V and O agree (batch, heads, head dim; O shaped like Q).
        args.shape()?;
        check_lse_output(self, args.lse, [q_shape.batch, q_shape.heads, q_shape.seq])?;
        // Rows that see no key are cleared, and the logsumexp is assembled
        // from each sequence's, by buffer copies.
        let copies = wgpu::BufferUsages::COPY_DST;
        require_usage("out", args.out.buffer(), copies, "clear rows without keys")?;
        if let Some(lse) = args.lse {
            require_usage("lse", lse.buffer(), copies, "assemble it per sequence")?;
        }
        let view = |tensor: &Tensor, batch: usize, start: usize, len: usize, heads: usize| {
            let s = tensor.strides();
            tensor.view(
                TensorShape::new(1, len, heads, tensor.shape().head_dim),
                s,
                tensor.offset() + batch * s.batch + start * s.seq,
            )
        };
        let heads_q = q_shape.heads;
        let mut calls = Vec::new();
        let mut empty_rows = Vec::new();
        for seq in &sequences {
            if seq.q_len == 0 {
                continue;
            }
            if seq.kv_len == 0 {
                empty_rows.push((seq.batch, seq.q_start, seq.q_len));
                continue;
            }
            let q = view(args.q, seq.batch, seq.q_start, seq.q_len, heads_q)?;
            let k = view(
                args.k,
                seq.kv_batch,
                seq.kv_start,
                seq.kv_len,
                kv_shape.heads,
            )?;
            let v = view(
                args.v,
                seq.kv_batch,
                seq.kv_start,
                seq.kv_len,
                kv_shape.heads,
            )?;
            let out = view(args.out, seq.batch, seq.q_start, seq.q_len, heads_q)?;
            let lse = match args.lse {
                Some(_) => Some(Lse::new(self, 1, heads_q, seq.q_len)?),
                None => None,
            };
            calls.push((seq, q, k, v, out, lse));
        }
        for (seq, q, k, v, out, lse) in &calls {
            let call = AttentionArgs {
                q,
                k,
                v,
                out,
                lse: lse.as_ref(),
            };
            // Alone, a sequence reads its batch entry's ALiBi slopes.
            let config = config.for_batch_entry(seq.batch, heads_q);
            self.encode_forward(encoder, &call, &config, None)?;
            if let (Some(part), Some(whole)) = (lse, args.lse) {
                // [1, heads, len] into rows q_start.. of [batch, heads, seq].
                let len = seq.q_len as u64 * 4;
                for head in 0..heads_q {
                    let row0 = (seq.batch * heads_q + head) * q_shape.seq + seq.q_start;
                    encoder.copy_buffer_to_buffer(
                        part.buffer(),
                        head as u64 * len,
                        whole.buffer(),
                        row0 as u64 * 4,
                        len,
                    );
                }
            }
        }
        // A real row without keys has the logsumexp of its sink alone (or
        // +inf); padding rows are +inf.
        let sink_lse = |head: usize| config.sinks.as_ref().map_or(f32::INFINITY, |s| s[head]);
        for (batch, start, len) in empty_rows {
            self.encode_empty_rows(encoder, args.out, args.lse, (batch, start, len), sink_lse);
        }
        for (batch, start, len) in padding_rows {
            self.encode_empty_rows(encoder, args.out, args.lse, (batch, start, len), |_| {
                f32::INFINITY
            });
        }
        Ok(())
    }

    /// Zeros in `out` and `lse_of(head)` in `lse` for `len` rows of batch
    /// `batch` from `start`: rows that see no key.
    fn encode_empty_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        out: &Tensor,
        lse: Option<&Lse>,
        (batch, start, len): (usize, usize, usize),
        lse_of: impl Fn(usize) -> f32,
    ) {
        let shape = out.shape();
        let s = out.strides();
        let elem = out.dtype().size_bytes() as u64;
        let row_bytes = shape.head_dim as u64 * elem;
        for row in start..start + len {
            for head in 0..shape.heads {
                let at = out.offset() + batch * s.batch + row * s.seq + head * s.head;
                encoder.clear_buffer(out.buffer(), at as u64 * elem, Some(row_bytes));
            }
        }
        if let Some(lse) = lse {
            // [heads, len] values, head by head.
            let values: Vec<f32> = (0..shape.heads)
                .flat_map(|head| std::iter::repeat_n(lse_of(head), len))
                .collect();
            let rows = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("wgpu-flash-attn rows without keys"),
                    contents: bytemuck::cast_slice(&values),
                    usage: wgpu::BufferUsages::COPY_SRC,
                });
            for head in 0..shape.heads {
                let row0 = (batch * shape.heads + head) * shape.seq + start;
                encoder.copy_buffer_to_buffer(
                    &rows,
                    (head * len) as u64 * 4,
                    lse.buffer(),
                    row0 as u64 * 4,
                    len as u64 * 4,
                );
            }
        }
    }
}
