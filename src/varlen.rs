//! Batches of unequal sequences without work on padding: packed
//! variable-length batches with cumulative offsets (FlashAttention's
//! `cu_seqlens`), and dense batches with per-sequence valid lengths (BERT's
//! key padding). One dispatch runs every sequence, each reading its rows
//! and keys from a table, so padding keys are never read or computed, and
//! the kernel itself writes padding rows (zeros, logsumexp +inf).

use crate::attention::AttentionArgs;
use crate::config::{AttentionConfig, AttentionShape};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::params::{BackwardUnit, SequenceRows};
use crate::pipelines::PreparedPass;
use crate::tensor::Tensor;

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

impl Sequence {
    /// Batch entry `b` of a dense call: all of its rows and keys.
    pub fn dense(b: usize, shape: &AttentionShape) -> Self {
        Sequence {
            batch: b,
            q_start: 0,
            q_len: shape.seq_q,
            kv_batch: b,
            kv_start: 0,
            kv_len: shape.seq_kv,
        }
    }

    /// The sequence as the forward kernel reads it, writing `extent` rows;
    /// its queries align with the end of its keys (bottom-right). `index`
    /// is its place in the call (its dropout mask's sequence).
    pub fn rows(&self, index: usize, extent: usize) -> SequenceRows {
        SequenceRows {
            q_batch: self.batch as u32,
            q_start: self.q_start as u32,
            q_len: self.q_len as u32,
            extent: extent as u32,
            kv_batch: self.kv_batch as u32,
            kv_start: self.kv_start as u32,
            kv_len: self.kv_len as u32,
            diag: self.kv_len as i32 - self.q_len as i32,
            sequence: index as u32,
            ..SequenceRows::default()
        }
    }

    /// The sequence as the backward kernels read it, writing `extent_q`
    /// rows and `extent_kv` keys (past its lengths: zero gradients).
    pub fn backward_unit(&self, extent_q: usize, extent_kv: usize) -> BackwardUnit {
        BackwardUnit {
            q_batch: self.batch as u32,
            q_start: self.q_start as u32,
            q_len: self.q_len as u32,
            extent_q: extent_q as u32,
            kv_batch: self.kv_batch as u32,
            kv_start: self.kv_start as u32,
            kv_len: self.kv_len as u32,
            extent_kv: extent_kv as u32,
        }
    }
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
    /// 0 are allowed), in one dispatch.
    pub(crate) fn encode_varlen_attention(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        (cu_seqlens_q, cu_seqlens_k): (&[usize], &[usize]),
        keys_per_dispatch: Option<usize>,
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
        // Every row of a packed batch belongs to its sequence.
        let extents = sequences.iter().map(|s| s.q_len).collect();
        let prepared =
            self.prepare_sequences(args, config, sequences, extents, keys_per_dispatch)?;
        if let Some(pass) = prepared {
            pass.record(encoder);
        }
        Ok(())
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
        keys_per_dispatch: Option<usize>,
    ) -> Result<()> {
        if let Some(pass) = self.prepare_padded_attention(args, config, lens, keys_per_dispatch)? {
            pass.record(encoder);
        }
        Ok(())
    }

    /// [`Gpu::encode_padded_attention`]'s pass, built but not recorded
    /// (`None`: nothing to record).
    pub(crate) fn prepare_padded_attention(
        &self,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        lens: &ValidLengths<'_>,
        keys_per_dispatch: Option<usize>,
    ) -> Result<Option<PreparedPass>> {
        let shape = args.shape()?;
        let sequences = padded_sequences(&shape, lens)?;
        // The kernel writes every row of each batch entry: past the valid
        // queries, zeros.
        let extents = vec![shape.seq_q; sequences.len()];
        self.prepare_sequences(args, config, sequences, extents, keys_per_dispatch)
    }

    /// Every sequence in one dispatch: workgroups along y are the
    /// sequences, each reading its rows and keys from a table
    /// (`SequenceRows`); rows past a sequence's queries up to `extents[i]`
    /// (padding) are written as zeros with logsumexp +inf by the kernel,
    /// and so are rows of a sequence without keys (logsumexp: the head's
    /// sink, or +inf). Built, not recorded; `None` when there is nothing
    /// to record.
    pub(crate) fn prepare_sequences(
        &self,
        args: &AttentionArgs<'_>,
        config: &AttentionConfig,
        sequences: Vec<Sequence>,
        extents: Vec<usize>,
        keys_per_dispatch: Option<usize>,
    ) -> Result<Option<PreparedPass>> {
        let shape = args.shape()?;
        // One sequence per workgroup along y: tiles, workgroups and the
        // loop budget follow the longest sequence, not the packed total.
        let rows = extents.iter().copied().max().unwrap_or(0);
        let keys = sequences.iter().map(|s| s.kv_len).max().unwrap_or(0);
        let unit = AttentionShape {
            batch: sequences.len().max(1),
            seq_q: rows.max(1),
            seq_kv: keys.max(1),
            ..shape
        };
        let call = self.prepare_planned_call(args, config, shape, &unit)?;
        if rows == 0 {
            return Ok(None);
        }
        let units: Vec<SequenceRows> = sequences
            .iter()
            .zip(&extents)
            .enumerate()
            .map(|(index, (seq, &extent))| seq.rows(index, extent))
            .collect();
        call.prepare_units(self, units, keys_per_dispatch, true)
            .map(Some)
    }
}
