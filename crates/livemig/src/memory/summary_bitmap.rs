//! [`SummaryBitmap`]: a vm-memory dirty bitmap whose take costs what was
//! written, not the region's size.
//!
//! vm-memory's `AtomicBitmap::get_and_reset` swaps every word of the
//! bitmap and returns them in a fresh vector: at 64 GiB that is 256 K
//! locked operations and 2 MiB per take, several milliseconds, two of the
//! takes inside a migration's downtime. [`SummaryBitmap`] keeps a second
//! level, one bit per word of the page bitmap (one summary word per
//! 4096 pages, 16 MiB), set on every mark; [`SummaryBitmap::take`] visits
//! only the summary words and the page words they name.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;

/// A dirty bitmap for one vm-memory region: one bit per 4 KiB page
/// ([`PAGE_SIZE`], whatever the host's page size), plus one summary bit
/// per 64 pages, so that [`SummaryBitmap::take`] visits only words that
/// were marked.
///
/// Marks and takes may race: a page marked while a take runs is handed
/// to that take or to the next one, never lost. Every access is
/// sequentially consistent; a mark sets the page word's bits first and
/// the summary bit second, a take clears the summary bit first and swaps
/// the page word second, so a mark whose page bits the take missed sets
/// its summary bit after the take cleared it (and a mark that finds the
/// summary bit already set was ordered before the take that clears it,
/// which then swaps its page bits).
///
/// ```
/// use livemig::memory::SummaryBitmap;
/// use livemig::vm_memory::bitmap::{Bitmap, NewBitmap};
///
/// let b = SummaryBitmap::with_len(1 << 20);
/// b.mark_dirty(5 * 4096 + 10, 4096); // pages 5 and 6
/// let mut got = Vec::new();
/// b.take(|word, bits| got.push((word, bits)));
/// assert_eq!(got, [(0, 0b110_0000)]);
/// b.take(|_, _| panic!("taken already"));
/// ```
pub struct SummaryBitmap {
    /// Bit `p % 64` of word `p / 64`: page `p` was written.
    words: Box<[AtomicU64]>,
    /// Bit `w % 64` of word `w / 64`: word `w` of `words` may be non-zero.
    summary: Box<[AtomicU64]>,
    /// Pages covered.
    pages: usize,
}

impl SummaryBitmap {
    /// A clean bitmap for `byte_len` bytes (rounded up to whole pages).
    pub fn new(byte_len: usize) -> Self {
        let pages = byte_len.div_ceil(PAGE);
        let nwords = pages.div_ceil(64);
        SummaryBitmap {
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..nwords.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            pages,
        }
    }

    /// Pages covered (one bit each).
    pub fn len(&self) -> usize {
        self.pages
    }

    /// Whether the bitmap covers no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Hands every non-zero word marked since the previous take to `f`,
    /// as (word index, bits: bit `i` is page `64 * word + i`), in rising
    /// word order, and clears them. Visits the summary (one word per
    /// 4096 pages) and the page words it names only.
    pub fn take(&self, mut f: impl FnMut(usize, u64)) {
        for (si, s) in self.summary.iter().enumerate() {
            if s.load(SeqCst) == 0 {
                continue;
            }
            let mut marked = s.swap(0, SeqCst);
            while marked != 0 {
                let w = si * 64 + marked.trailing_zeros() as usize;
                marked &= marked - 1;
                let bits = self.words.get(w).map_or(0, |a| a.swap(0, SeqCst));
                if bits != 0 {
                    f(w, bits);
                }
            }
        }
    }

    /// Forgets every mark (a take that hands nothing out; named as
    /// `AtomicBitmap::reset`).
    pub fn reset(&self) {
        self.take(|_, _| {});
    }

    /// Marks pages `first..=last` (`last` < `self.pages`).
    fn mark_pages(&self, first: usize, last: usize) {
        for w in first / 64..=last / 64 {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let (Some(word), Some(sum)) = (self.words.get(w), self.summary.get(w / 64)) else {
                return;
            };
            word.fetch_or(mask, SeqCst);
            let bit = 1u64 << (w % 64);
            if sum.load(SeqCst) & bit == 0 {
                sum.fetch_or(bit, SeqCst);
            }
        }
    }
}

impl fmt::Debug for SummaryBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SummaryBitmap")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl Clone for SummaryBitmap {
    /// A copy of the marks as they are now (like `AtomicBitmap`'s clone).
    fn clone(&self) -> Self {
        let copy = |v: &[AtomicU64]| v.iter().map(|a| AtomicU64::new(a.load(SeqCst))).collect();
        SummaryBitmap {
            words: copy(&self.words),
            summary: copy(&self.summary),
            pages: self.pages,
        }
    }
}

impl Default for SummaryBitmap {
    fn default() -> Self {
        SummaryBitmap::new(0)
    }
}

impl<'a> WithBitmapSlice<'a> for SummaryBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for SummaryBitmap {
    /// Marks every page `offset..offset + len` touches; pages past the
    /// end are ignored (as `AtomicBitmap` does).
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = offset / PAGE;
        let last = (offset.saturating_add(len - 1) / PAGE).min(self.pages - 1);
        if first <= last {
            self.mark_pages(first, last);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let p = offset / PAGE;
        p < self.pages
            && self
                .words
                .get(p / 64)
                .is_some_and(|w| w.load(SeqCst) & (1 << (p % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for SummaryBitmap {
    fn with_len(len: usize) -> Self {
        SummaryBitmap::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn taken(b: &SummaryBitmap) -> BTreeSet<usize> {
        let mut pages = BTreeSet::new();
        b.take(|w, mut bits| {
            while bits != 0 {
                pages.insert(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        });
        pages
    }

    #[test]
    fn take_returns_exactly_the_marked_pages_and_resets_them() {
        let b = SummaryBitmap::new(100_000 * PAGE + 5);
        assert_eq!(b.len(), 100_001);
        b.mark_dirty(0, 1);
        b.mark_dirty(63 * PAGE + 4095, 2); // pages 63 and 64
        b.mark_dirty(4096 * PAGE - 1, PAGE + 1); // pages 4095..=4096
        b.mark_dirty(70_000 * PAGE, 200 * PAGE); // 200 pages, 5 words
        b.mark_dirty(100_000 * PAGE + 1, 1 << 30); // the last page, clipped
        b.mark_dirty(200_000 * PAGE, 1); // past the end: ignored
        b.mark_dirty(3 * PAGE, 0); // empty
        let mut want: BTreeSet<usize> = [0, 63, 64, 4095, 4096, 100_000].into();
        want.extend(70_000..70_200);
        assert!(b.dirty_at(64 * PAGE) && !b.dirty_at(65 * PAGE));
        assert_eq!(taken(&b), want);
        assert!(taken(&b).is_empty(), "a take resets what it hands out");
        assert!(!b.dirty_at(64 * PAGE));
        b.slice_at(8 * PAGE).mark_dirty(PAGE, 1);
        assert_eq!(taken(&b), [9].into());
        b.mark_dirty(0, 3 * PAGE);
        b.reset();
        assert!(taken(&b).is_empty() && !b.dirty_at(0));
    }

    #[test]
    fn a_mark_racing_a_take_is_in_that_take_or_the_next() {
        // A lost mark needs a narrow interleaving: try several times.
        for _ in 0..10 {
            marks_racing_takes();
        }
    }

    fn marks_racing_takes() {
        const PAGES: usize = 1 << 17;
        const WRITERS: usize = 3;
        const MARKS: usize = 40_000;
        let b = Arc::new(SummaryBitmap::new(PAGES * PAGE));
        let done = Arc::new(AtomicBool::new(false));
        let taker = {
            let (b, done) = (b.clone(), done.clone());
            std::thread::spawn(move || {
                let mut got = vec![0u32; PAGES];
                let mut count = |b: &SummaryBitmap| {
                    for p in taken(b) {
                        got[p] += 1;
                    }
                };
                while !done.load(SeqCst) {
                    count(&b);
                }
                count(&b); // the marks made after the last take in the loop
                got
            })
        };
        // Each writer marks its own pages once each, in a scattered order, so a
        // page taken twice or never shows.
        const _: () = assert!(WRITERS * MARKS <= PAGES);
        let writers: Vec<_> = (0..WRITERS)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..MARKS {
                        let p = (i * 7919 % MARKS) * WRITERS + t;
                        b.mark_dirty(p * PAGE + 17, 1);
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        done.store(true, SeqCst);
        let got = taker.join().unwrap();
        for (p, n) in got.iter().enumerate() {
            let want = u32::from(p < WRITERS * MARKS);
            assert_eq!(*n, want, "page {p} taken {n} times");
        }
    }
}
