//! Forward calls whose keys do not fit one dispatch: K or V larger than
//! one storage binding (`max_storage_buffer_binding_size`, 128 MiB on
//! lavapipe: a 128K-token prompt of Llama-405B's 8 KV heads is 512 MiB of
//! f32 keys), more keys than llvmpipe's loop budget lets one invocation
//! visit, or fewer keys per dispatch than the caller asked for
//! ([`ForwardOptions::keys_per_dispatch`]).
//!
//! Every sequence's keys are cut into chunks. A dispatch binds a window of
//! K and of V (a byte range of each buffer) that holds its chunks, and
//! runs them as units of the forward kernel's sequence table: a chunk's
//! `diag` places its queries where they sit in the whole sequence, so
//! causal, windows and ALiBi are those of the whole call; each row starts
//! from the state the chunk before it left (its normalised output in an
//! f32 carry buffer and its logsumexp) and hands its own on, which is the
//! online softmax across dispatches: the result is the one-dispatch result
//! up to rounding, with no partial outputs to merge afterwards.
//!
//! [`ForwardOptions::keys_per_dispatch`]: crate::ForwardOptions::keys_per_dispatch

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::params::{SequenceRows, TensorStrides, carry_flags};

/// How the kernel addresses one of K and V, with the buffer it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KvView {
    pub name: &'static str,
    /// Size of the whole buffer.
    pub buffer_bytes: u64,
    /// Bytes of one vec4 (the kernel's index unit): 16 for f32, 8 for
    /// 16-bit types.
    pub unit_bytes: u64,
    /// Strides and offset in vec4s.
    pub strides: TensorStrides,
    pub heads: u32,
    /// Head dim / 4.
    pub width4: u32,
}

impl KvView {
    /// Bytes from the first to one past the last element of `keys`
    /// consecutive keys (every head), starting at key `start` of batch
    /// entry `batch`: `(offset, end)`.
    fn span(&self, batch: u32, start: u32, keys: u32) -> (u64, u64) {
        let s = &self.strides;
        let first = u64::from(batch) * u64::from(s.batch)
            + u64::from(start) * u64::from(s.seq)
            + u64::from(s.offset);
        let extent = u64::from(keys - 1) * u64::from(s.seq)
            + u64::from(self.heads - 1) * u64::from(s.head)
            + u64::from(self.width4);
        (first * self.unit_bytes, (first + extent) * self.unit_bytes)
    }

    /// The most consecutive keys a window of `binding` bytes holds wherever
    /// they start (an aligned window may begin up to `alignment - unit`
    /// bytes early); `None` when not even one key's heads fit.
    fn keys_per_window(&self, binding: u64, alignment: u64) -> Option<u64> {
        let room = binding.checked_sub(self.smallest_window(alignment))?;
        let step = u64::from(self.strides.seq) * self.unit_bytes;
        // A zero seq stride (every key the same vector) fits any count.
        Some(room.checked_div(step).map_or(u64::MAX, |keys| keys + 1))
    }

    /// Bytes of a window holding one key's heads wherever it starts.
    fn smallest_window(&self, alignment: u64) -> u64 {
        let (first, end) = self.span(0, 0, 1);
        alignment.saturating_sub(self.unit_bytes) + end - first
    }
}

/// A byte range of a K or V buffer bound to one dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub offset: u64,
    pub size: u64,
}

impl Window {
    /// Where the window starts, in the kernel's vec4 units.
    pub fn base(&self, view: &KvView) -> u64 {
        self.offset / view.unit_bytes
    }
}

/// One dispatch of a chunked call: its K and V windows and its units (at
/// most one chunk of each sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkDispatch {
    pub k: Window,
    pub v: Window,
    pub units: Vec<SequenceRows>,
}

/// What bounds the chunks, from the adapter and the call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkLimits {
    /// `max_storage_buffer_binding_size`.
    pub binding: u64,
    /// `min_storage_buffer_offset_alignment`.
    pub alignment: u64,
    /// Keys one invocation may visit (loop budget, caller's choice).
    pub keys_per_dispatch: Option<u64>,
    /// The kernel's key tile: chunks are whole tiles where they can be.
    pub block_n: u32,
    /// Units one dispatch may hold (workgroups along y).
    pub max_units: u32,
}

/// The dispatches that run `sequences` (whole sequences, carry bits 0)
/// within `limits`, or `None` when one dispatch binding K and V whole runs
/// them all.
pub(crate) fn plan_key_chunks(
    sequences: &[SequenceRows],
    k: &KvView,
    v: &KvView,
    limits: &ChunkLimits,
) -> Result<Option<Vec<ChunkDispatch>>> {
    let views = [k, v];
    let whole = views.map(|view| view.buffer_bytes <= limits.binding);
    let mut keys = limits.keys_per_dispatch.unwrap_or(u64::MAX);
    for (view, whole) in views.iter().zip(whole) {
        if whole {
            continue;
        }
        let fit = view
            .keys_per_window(limits.binding, limits.alignment)
            // The bytes named are those of the smallest window: one key's
            // heads.
            .ok_or(Error::BufferTooLarge {
                tensor: view.name,
                bytes: view.smallest_window(limits.alignment),
                limit_name: "max_storage_buffer_binding_size",
                limit: limits.binding,
            })?;
        keys = keys.min(fit);
    }
    let longest = sequences.iter().map(|s| s.kv_len).max().unwrap_or(0);
    if whole[0] && whole[1] && u64::from(longest) <= keys {
        return Ok(None);
    }
    let block_n = u64::from(limits.block_n);
    if keys >= block_n {
        keys -= keys % block_n;
    }
    let chunk = keys.clamp(1, u64::from(u32::MAX)) as u32;

    // Chunk-major order: every sequence's chunk j runs in a later dispatch
    // than its chunk j - 1, whose state it continues.
    let chunks_of = |s: &SequenceRows| s.kv_len.div_ceil(chunk).max(1);
    let rounds = sequences.iter().map(chunks_of).max().unwrap_or(0);
    let mut dispatches: Vec<ChunkDispatch> = Vec::new();
    let mut open: Option<OpenDispatch> = None;
    for round in 0..rounds {
        for (index, sequence) in sequences.iter().enumerate() {
            let count = chunks_of(sequence);
            if round >= count {
                continue;
            }
            let unit = chunk_unit(sequence, round, count, chunk);
            let spans = (unit.kv_len > 0)
                .then(|| views.map(|view| view.span(unit.kv_batch, unit.kv_start, unit.kv_len)));
            // Whole bindings: one dispatch per round. Windows: consecutive
            // units share one while their keys fit it, never two chunks of
            // one sequence.
            let joins = open.as_ref().is_some_and(|o| {
                let room =
                    o.units.len() < limits.max_units as usize && !o.sequences.contains(&index);
                if whole == [true, true] {
                    room && o.round == round
                } else {
                    room && o.fits(spans, whole, limits)
                }
            });
            if !joins {
                if let Some(done) = open.take() {
                    dispatches.push(done.finish(views, whole, limits));
                }
                open = Some(OpenDispatch::new(round));
            }
            let o = open.as_mut().expect("a dispatch is open");
            o.add(index, unit, spans);
        }
    }
    if let Some(done) = open.take() {
        dispatches.push(done.finish(views, whole, limits));
    }
    Ok(Some(dispatches))
}

/// Chunk `round` of `count` of a sequence's keys, `chunk` keys each.
fn chunk_unit(sequence: &SequenceRows, round: u32, count: u32, chunk: u32) -> SequenceRows {
    let first = round * chunk;
    let mut carry = 0;
    if round > 0 {
        carry |= carry_flags::IN;
    }
    if round + 1 < count {
        carry |= carry_flags::OUT;
    }
    SequenceRows {
        kv_start: sequence.kv_start + first,
        kv_len: sequence.kv_len.saturating_sub(first).min(chunk),
        diag: sequence.diag - first as i32,
        carry,
        key_base: sequence.key_base + first,
        ..*sequence
    }
}

/// A dispatch being filled: its units and the byte ranges of K and V
/// they read.
struct OpenDispatch {
    round: u32,
    sequences: HashSet<usize>,
    units: Vec<SequenceRows>,
    /// Per view, (lowest, end) byte of the keys read so far.
    spans: Option<[(u64, u64); 2]>,
}

impl OpenDispatch {
    fn new(round: u32) -> Self {
        OpenDispatch {
            round,
            sequences: HashSet::new(),
            units: Vec::new(),
            spans: None,
        }
    }

    fn merged(&self, spans: [(u64, u64); 2]) -> [(u64, u64); 2] {
        match self.spans {
            None => spans,
            Some(have) => [0, 1].map(|i| (have[i].0.min(spans[i].0), have[i].1.max(spans[i].1))),
        }
    }

    /// Whether a unit reading `spans` joins without any window outgrowing
    /// the binding limit.
    fn fits(&self, spans: Option<[(u64, u64); 2]>, whole: [bool; 2], limits: &ChunkLimits) -> bool {
        let Some(spans) = spans else {
            return true;
        };
        let merged = self.merged(spans);
        (0..2).all(|i| {
            whole[i] || merged[i].1 - align_down(merged[i].0, limits.alignment) <= limits.binding
        })
    }

    fn add(&mut self, sequence: usize, unit: SequenceRows, spans: Option<[(u64, u64); 2]>) {
        self.sequences.insert(sequence);
        self.units.push(unit);
        if let Some(spans) = spans {
            self.spans = Some(self.merged(spans));
        }
    }

    fn finish(self, views: [&KvView; 2], whole: [bool; 2], limits: &ChunkLimits) -> ChunkDispatch {
        let window = |i: usize| {
            let view = views[i];
            if whole[i] {
                return Window {
                    offset: 0,
                    size: view.buffer_bytes,
                };
            }
            match self.spans {
                Some(spans) => {
                    let offset = align_down(spans[i].0, limits.alignment);
                    Window {
                        offset,
                        size: spans[i].1 - offset,
                    }
                }
                // No unit reads a key: any valid window. A storage
                // binding's size is a whole number of words, and a
                // binding limit need not be (NVIDIA's Vulkan: 2^31 - 1).
                None => Window {
                    offset: 0,
                    size: align_down(limits.binding.min(view.buffer_bytes), 16),
                },
            }
        };
        ChunkDispatch {
            k: window(0),
            v: window(1),
            units: self.units,
        }
    }
}

fn align_down(value: u64, alignment: u64) -> u64 {
    value - value % alignment.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packed `[batch, seq, heads, d]` f32 view.
    fn packed(name: &'static str, batch: u32, seq: u32, heads: u32, d: u32) -> KvView {
        let width4 = d / 4;
        KvView {
            name,
            buffer_bytes: u64::from(batch * seq * heads * d) * 4,
            unit_bytes: 16,
            strides: TensorStrides {
                batch: seq * heads * width4,
                seq: heads * width4,
                head: width4,
                offset: 0,
            },
            heads,
            width4,
        }
    }

    fn whole_sequences(batch: u32, seq_q: u32, seq_kv: u32) -> Vec<SequenceRows> {
        (0..batch)
            .map(|b| SequenceRows {
                q_batch: b,
                sequence: b,
                q_len: seq_q,
                extent: seq_q,
                kv_batch: b,
                kv_len: seq_kv,
                diag: seq_kv as i32 - seq_q as i32,
                ..SequenceRows::default()
            })
            .collect()
    }

    fn limits(binding: u64, keys: Option<u64>) -> ChunkLimits {
        ChunkLimits {
            binding,
            alignment: 256,
            keys_per_dispatch: keys,
            block_n: 64,
            max_units: 65_535,
        }
    }

    /// Every dispatch's windows are aligned, within the binding limit and
    /// hold its units' keys; each sequence's chunks run in order, cover
    /// its keys once, carry between each other, keep their queries' place
    /// on the key axis and name their sequence and first key (dropout's
    /// coordinates).
    fn check(
        sequences: &[SequenceRows],
        k: &KvView,
        v: &KvView,
        limits: &ChunkLimits,
        dispatches: &[ChunkDispatch],
    ) {
        let mut next_key = vec![0u32; sequences.len()];
        for dispatch in dispatches {
            for (view, window) in [(k, dispatch.k), (v, dispatch.v)] {
                assert_eq!(window.offset % limits.alignment, 0);
                assert!(window.size <= limits.binding, "{window:?}");
                assert!(window.offset + window.size <= view.buffer_bytes);
            }
            let mut seen = HashSet::new();
            for unit in &dispatch.units {
                // The tests number sequences by q_batch.
                let index = unit.q_batch as usize;
                assert!(
                    seen.insert(index),
                    "two chunks of one sequence in a dispatch"
                );
                let whole = &sequences[index];
                let first = next_key[index];
                assert_eq!(unit.kv_start, whole.kv_start + first);
                assert_eq!(unit.diag, whole.diag - first as i32);
                assert_eq!((unit.sequence, unit.key_base), (whole.sequence, first));
                assert_eq!(unit.carry & carry_flags::IN != 0, first > 0);
                let last = first + unit.kv_len >= whole.kv_len;
                assert_eq!(unit.carry & carry_flags::OUT != 0, !last);
                if let Some(keys) = limits.keys_per_dispatch {
                    assert!(u64::from(unit.kv_len) <= keys);
                }
                if unit.kv_len > 0 {
                    for (view, window) in [(k, dispatch.k), (v, dispatch.v)] {
                        let (lo, hi) = view.span(unit.kv_batch, unit.kv_start, unit.kv_len);
                        assert!(lo >= window.offset && hi <= window.offset + window.size);
                    }
                }
                next_key[index] = first + unit.kv_len;
                assert!(unit.kv_len > 0 || whole.kv_len == 0);
            }
        }
        for (index, sequence) in sequences.iter().enumerate() {
            assert_eq!(next_key[index], sequence.kv_len, "sequence {index}");
        }
    }

    #[test]
    fn calls_that_fit_run_in_one_dispatch() {
        let k = packed("k", 2, 4096, 8, 128);
        let sequences = whole_sequences(2, 4096, 4096);
        let fits = limits(128 << 20, Some(65_535));
        assert_eq!(plan_key_chunks(&sequences, &k, &k, &fits).unwrap(), None);
    }

    #[test]
    fn the_loop_budget_cuts_keys_into_whole_tiles() {
        let k = packed("k", 2, 203, 2, 64);
        let sequences = whole_sequences(2, 37, 203);
        let budget = limits(128 << 20, Some(100));
        let plan = plan_key_chunks(&sequences, &k, &k, &budget)
            .unwrap()
            .unwrap();
        // 100 keys round down to one 64-key tile: 4 rounds of both entries.
        assert_eq!(plan.len(), 4);
        assert!(plan.iter().all(|d| d.units.len() == 2));
        assert_eq!(plan[3].units[0].kv_len, 203 - 3 * 64);
        check(&sequences, &k, &k, &budget, &plan);
        // Below a tile, any count.
        let small = limits(128 << 20, Some(7));
        let plan = plan_key_chunks(&sequences, &k, &k, &small)
            .unwrap()
            .unwrap();
        assert_eq!(plan.len(), 203usize.div_ceil(7));
        check(&sequences, &k, &k, &small, &plan);
    }

    #[test]
    fn keys_past_one_binding_get_windows() {
        // Llama-405B's KV heads at 128K tokens: 512 MiB of f32 keys.
        let k = packed("k", 1, 131_072, 8, 128);
        let sequences = whole_sequences(1, 1, 131_072);
        let lavapipe = limits(128 << 20, Some(40_000));
        let plan = plan_key_chunks(&sequences, &k, &k, &lavapipe)
            .unwrap()
            .unwrap();
        check(&sequences, &k, &k, &lavapipe, &plan);
        assert_eq!(plan.len(), 131_072usize.div_ceil(32_768 - 64));
        // No loop budget: the windows alone cut the keys.
        let gpu = limits(128 << 20, None);
        let plan = plan_key_chunks(&sequences, &k, &k, &gpu).unwrap().unwrap();
        check(&sequences, &k, &k, &gpu, &plan);
        assert_eq!(plan.len(), 5);

        // Several small sequences share a window; the keys of a fused KV
        // buffer (K then V heads per key) are strided views.
        let mut fused = packed("k", 3, 300, 4, 64);
        fused.heads = 2;
        let mut v = fused;
        v.name = "v";
        v.strides.offset = 2 * 16;
        let mut sequences = [whole_sequences(3, 24, 300), whole_sequences(1, 5, 0)].concat();
        // `check` finds a unit's sequence by its q_batch.
        sequences[3].q_batch = 3;
        sequences[3].sequence = 3;
        let small = limits(64 << 10, None);
        let plan = plan_key_chunks(&sequences, &fused, &v, &small)
            .unwrap()
            .unwrap();
        check(&sequences, &fused, &v, &small, &plan);
    }

    #[test]
    fn a_key_wider_than_a_binding_is_refused() {
        let k = packed("k", 1, 4, 64, 64);
        let sequences = whole_sequences(1, 1, 4);
        let tiny = limits(16 << 10, None);
        assert!(matches!(
            plan_key_chunks(&sequences, &k, &k, &tiny),
            Err(Error::BufferTooLarge { tensor: "k", limit, .. }) if limit == 16 << 10
        ));
    }
}
