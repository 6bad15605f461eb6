//! Pages released behind a sliding window: a sequence whose queries only
//! ever see its last `window` keys (Mistral's, Gemma's local layers,
//! gpt-oss's sliding layers) gives back the pages before them, so a long
//! conversation holds a window's pages, not its whole history. A released
//! entry keeps its place in the block table (positions keep their pages'
//! indices) and holds no key; every call that would read or write it is
//! refused instead.

use super::{KvCache, NO_PAGE};
use crate::error::{Error, Result};

/// Block-table entry of a released page ([`KvCache::release_pages_before`]):
/// its positions hold no key. The value the kernels already read as "no
/// page here", so they skip such positions as they skip unassigned ones.
pub const RELEASED_PAGE: u32 = NO_PAGE;

/// The (index, page) entries of a block table that hold a page.
pub(super) fn held_entries(table: &[u32]) -> impl Iterator<Item = (usize, u32)> + '_ {
    table
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, page)| page != RELEASED_PAGE)
}

impl KvCache {
    /// Releases the pages of `sequence` that lie wholly before `position`
    /// (at most its length, else [`Error::ReleasePastLength`]): their
    /// block-table entries become [`RELEASED_PAGE`], and each page no other
    /// sequence holds joins [`KvCache::free_pages`] for any sequence to
    /// take. Returns the pages released by this call, in position order.
    /// The sequence keeps its length and its positions: a decode whose
    /// queries would see a released key is refused
    /// ([`Error::ReleasedKeysInView`]: give it a left window that starts at
    /// or past the released pages), and so are appends and draft moves
    /// into one ([`Error::ReleasedPosition`]). [`KvCache::read_sequence`]
    /// reads released positions as zeros. In a contiguous cache the pages
    /// are a fixed run, so releasing frees no memory another sequence can
    /// use, though it is allowed.
    ///
    /// ```no_run
    /// # use wgpu_flash_attn::{AttentionConfig, DecodeArgs, Error, Gpu, KvCache, Tensor};
    /// /// A sliding-window layer's step, each sequence's new token already
    /// /// appended: give back the pages behind the window, then decode.
    /// fn step(
    ///     gpu: &Gpu,
    ///     cache: &mut KvCache,
    ///     (q, out): (&Tensor, &Tensor),
    ///     window: usize,
    /// ) -> Result<(), Error> {
    ///     for b in 0..cache.batch() {
    ///         // The query at position len - 1 sees back to len - 1 - window.
    ///         let first_visible = cache.lens()[b].saturating_sub(1 + window);
    ///         cache.release_pages_before(b, first_visible)?;
    ///     }
    ///     let config = AttentionConfig::new()
    ///         .causal(true)
    ///         .window(Some(window as i64), Some(0));
    ///     let args = DecodeArgs { q, cache, out, lse: None };
    ///     gpu.run(|encoder| gpu.decode(encoder, &args, &config))?;
    ///     Ok(())
    /// }
    /// ```
    pub fn release_pages_before(&mut self, sequence: usize, position: usize) -> Result<Vec<u32>> {
        self.check_sequence(sequence)?;
        let len = self.lens[sequence];
        if position > len {
            return Err(Error::ReleasePastLength {
                sequence,
                position,
                len,
            });
        }
        let whole_pages = (position / self.page_size).min(self.block_tables[sequence].len());
        let mut released = Vec::new();
        for entry in &mut self.block_tables[sequence][..whole_pages] {
            if *entry != RELEASED_PAGE {
                self.page_holders[*entry as usize] -= 1;
                released.push(*entry);
                *entry = RELEASED_PAGE;
            }
        }
        if !released.is_empty() {
            self.table_upload = Default::default();
        }
        Ok(released)
    }

    /// The end of the last released page of `sequence` (0 when none is).
    fn released_end(&self, sequence: usize) -> usize {
        self.block_tables[sequence]
            .iter()
            .rposition(|&page| page == RELEASED_PAGE)
            .map_or(0, |index| (index + 1) * self.page_size)
    }

    /// [`Error::ReleasedPosition`] for the first position of `positions`
    /// in `sequence` whose page was released.
    pub(crate) fn check_unreleased(
        &self,
        what: &'static str,
        sequence: usize,
        positions: std::ops::Range<usize>,
    ) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let table = &self.block_tables[sequence];
        let pages = positions.start / self.page_size..(positions.end - 1) / self.page_size + 1;
        let released = pages
            .into_iter()
            .find(|&index| table.get(index) == Some(&RELEASED_PAGE));
        match released {
            Some(index) => Err(Error::ReleasedPosition {
                what,
                sequence,
                position: positions.start.max(index * self.page_size),
            }),
            None => Ok(()),
        }
    }

    /// A decode's queries see no released key: sequence `b`'s
    /// `query_counts(b)` queries sit at its last positions and see back to
    /// `window_left` keys before the first of them (to position 0 without
    /// a left window).
    pub(crate) fn check_released_out_of_view(
        &self,
        query_counts: impl Fn(usize) -> usize,
        window_left: Option<i64>,
    ) -> Result<()> {
        for sequence in 0..self.batch() {
            let released_end = self.released_end(sequence);
            let queries = query_counts(sequence);
            if released_end == 0 || queries == 0 {
                continue;
            }
            let first_query = self.lens[sequence].saturating_sub(queries);
            let first_visible = window_left.map_or(0, |left| {
                first_query.saturating_sub(usize::try_from(left).unwrap_or(usize::MAX))
            });
            if first_visible < released_end {
                return Err(Error::ReleasedKeysInView {
                    sequence,
                    first_visible,
                    released_end,
                });
            }
        }
        Ok(())
    }
}
