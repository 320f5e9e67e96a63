//! Per-region dirty bitmaps: one bit per 4 KiB guest page
//! ([`PAGE_SIZE`](crate::memory::PAGE_SIZE)), 64 pages per word, the same
//! layout as KVM's dirty log on x86-64 and as
//! [`GuestMemory::take_vmm_dirty`](crate::memory::GuestMemory::take_vmm_dirty)'s
//! words, so merging either is a word-wise OR.

use crate::memory::MemoryLayout;

/// A dirty bitmap covering every region of a [`MemoryLayout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    regions: Vec<RegionBits>,
}

/// One region's bits, and two summaries of them that the passes over the
/// bitmap (clear, count, runs, range checks) use instead of reading the
/// words: `clean`, no bit is set (any method that may set a bit makes it
/// false), and `full`, every bit is set (only [`DirtyBitmap::set_all`]
/// makes it true, any method that may clear a bit makes it false; the
/// words are set too, so [`DirtyBitmap::words`] stays exact). They keep a
/// round's passes from costing a large untouched region's size (a 61 GiB
/// region has 250 K words): clean after a sync, full in round 0.
#[derive(Debug, Clone)]
struct RegionBits {
    pages: u64,
    words: Vec<u64>,
    clean: bool,
    full: bool,
}

impl PartialEq for RegionBits {
    fn eq(&self, other: &Self) -> bool {
        self.pages == other.pages && self.words == other.words
    }
}

impl Eq for RegionBits {}

/// A run of consecutive dirty pages: `npages` pages starting at page
/// `first_page` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Region index in the layout.
    pub region: usize,
    /// First page of the run, relative to the region start.
    pub first_page: u64,
    /// Number of pages.
    pub npages: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `layout`.
    pub fn new(layout: &MemoryLayout) -> Self {
        DirtyBitmap {
            regions: layout
                .regions()
                .iter()
                .map(|r| RegionBits {
                    pages: r.pages(),
                    words: vec![0; r.pages().div_ceil(64) as usize],
                    clean: true,
                    full: false,
                })
                .collect(),
        }
    }

    /// Number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }

    /// Pages in region `region` (0 if it does not exist).
    pub fn region_pages(&self, region: usize) -> u64 {
        self.regions.get(region).map_or(0, |r| r.pages)
    }

    /// The words of a region (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self, region: usize) -> &[u64] {
        self.regions.get(region).map_or(&[], |r| &r.words)
    }

    /// ORs `words` (KVM dirty-log layout) into region `region`. Extra words
    /// or bits beyond the region's end are ignored.
    pub fn or_words(&mut self, region: usize, words: &[u64]) {
        if let Some(r) = self.regions.get_mut(region) {
            let mut any = 0;
            for (dst, src) in r.words.iter_mut().zip(words) {
                *dst |= *src;
                any |= *src;
            }
            r.mask_tail();
            r.clean &= any == 0;
        }
    }

    /// ORs `bits` into word `word` of region `region` (bit `i` is page
    /// `64 * word + i`); bits beyond the region's end are ignored.
    pub fn or_word(&mut self, region: usize, word: usize, bits: u64) {
        if let Some(r) = self.regions.get_mut(region) {
            if let Some(w) = r.words.get_mut(word) {
                *w |= bits;
                r.clean &= bits == 0;
                if word + 1 == r.words.len() {
                    r.mask_tail();
                }
            }
        }
    }

    /// Clears every page that is set in `other` (regions `other` lacks are
    /// left alone).
    pub fn and_not(&mut self, other: &DirtyBitmap) {
        for (r, o) in self.regions.iter_mut().zip(&other.regions) {
            if r.clean || o.clean {
                continue;
            }
            r.full = false;
            for (dst, src) in r.words.iter_mut().zip(&o.words) {
                *dst &= !*src;
            }
        }
    }

    /// Marks every page dirty.
    pub fn set_all(&mut self) {
        for r in &mut self.regions {
            r.words.iter_mut().for_each(|w| *w = u64::MAX);
            r.mask_tail();
            r.clean = r.pages == 0;
            r.full = true;
        }
    }

    /// Marks one page dirty. Out-of-range pages are ignored.
    pub fn set(&mut self, region: usize, page: u64) {
        if let Some(r) = self.regions.get_mut(region) {
            if page < r.pages {
                r.words[(page / 64) as usize] |= 1 << (page % 64);
                r.clean = false;
            }
        }
    }

    /// Marks one page clean. Out-of-range pages are ignored; a clean region
    /// is left untouched (as [`DirtyBitmap::clear_range`] does), so a bitmap
    /// nothing was ever set in costs no memory writes.
    pub fn unset(&mut self, region: usize, page: u64) {
        if let Some(r) = self.regions.get_mut(region).filter(|r| !r.clean) {
            if page < r.pages {
                r.full = false;
                r.words[(page / 64) as usize] &= !(1 << (page % 64));
            }
        }
    }

    /// Sets pages `first..first + n` of `region` (clipped to the region).
    pub fn set_range(&mut self, region: usize, first: u64, n: u64) {
        for p in first..first.saturating_add(n).min(self.region_pages(region)) {
            self.set(region, p);
        }
    }

    /// Marks pages `first..first + n` of `region` clean (clipped to the
    /// region), a word at a time.
    pub fn clear_range(&mut self, region: usize, first: u64, n: u64) {
        let Some(r) = self.regions.get_mut(region).filter(|r| !r.clean) else {
            return;
        };
        let end = first.saturating_add(n).min(r.pages);
        r.full &= first >= end;
        let mut p = first;
        while p < end {
            let (w, bit) = ((p / 64) as usize, p % 64);
            let take = (64 - bit).min(end - p);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            r.words[w] &= !mask;
            p += take;
        }
    }

    /// Whether a page is dirty.
    pub fn is_set(&self, region: usize, page: u64) -> bool {
        self.regions.get(region).is_some_and(|r| {
            page < r.pages && r.words[(page / 64) as usize] & (1 << (page % 64)) != 0
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| !r.clean)
            .flat_map(|r| r.words.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Number of dirty pages in `first..end` of `region` (word-wise).
    pub fn count_in(&self, region: usize, first: u64, end: u64) -> u64 {
        let Some(r) = self.regions.get(region).filter(|r| !r.clean) else {
            return 0;
        };
        let end = end.min(r.pages);
        if first >= end {
            return 0;
        }
        if r.full {
            return end - first;
        }
        let (fw, lw) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        let mut n = 0;
        for wi in fw..=lw {
            let mut w = r.words[wi];
            if wi == fw {
                w &= u64::MAX << (first % 64);
            }
            if wi == lw && end % 64 != 0 {
                w &= (1u64 << (end % 64)) - 1;
            }
            n += u64::from(w.count_ones());
        }
        n
    }

    /// Marks every page clean.
    pub fn clear(&mut self) {
        for r in self.regions.iter_mut().filter(|r| !r.clean) {
            r.words.iter_mut().for_each(|w| *w = 0);
            r.clean = true;
            r.full = false;
        }
    }

    /// Iterates runs of consecutive dirty pages, none longer than
    /// `max_run` pages, in address order. Scans a word at a time, so clean
    /// stretches cost one comparison per 64 pages.
    pub fn runs(&self, max_run: u64) -> Runs<'_> {
        Runs {
            bm: self,
            region: 0,
            page: 0,
            end: None,
            max_run: max_run.max(1),
        }
    }

    /// Like [`DirtyBitmap::runs`], restricted to pages `first..end` of one region.
    pub fn runs_in(&self, region: usize, first: u64, end: u64, max_run: u64) -> Runs<'_> {
        Runs {
            bm: self,
            region,
            page: first,
            end: Some(end),
            max_run: max_run.max(1),
        }
    }

    /// Whether any page in `first..end` of `region` is dirty (word-wise).
    ///
    /// Looks only at the words covering `first..end` (a scan to the next
    /// set bit could cross the whole region for every chunk of a nearly
    /// clean bitmap).
    pub fn any_in(&self, region: usize, first: u64, end: u64) -> bool {
        let Some(r) = self.regions.get(region).filter(|r| !r.clean) else {
            return false;
        };
        let end = end.min(r.pages);
        if first >= end {
            return false;
        }
        if r.full {
            return true;
        }
        let (fw, lw) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        for wi in fw..=lw {
            let mut w = r.words[wi];
            if wi == fw {
                w &= u64::MAX << (first % 64);
            }
            if wi == lw && end % 64 != 0 {
                w &= (1u64 << (end % 64)) - 1;
            }
            if w != 0 {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
thread_local! {
    /// Words read by the run scans (tests check what a scan costs).
    static WORDS_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one word read by a run scan (tests only).
#[inline]
fn count_word() {
    #[cfg(test)]
    WORDS_READ.with(|c| c.set(c.get() + 1));
}

impl RegionBits {
    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// First set bit in `page..limit` (`limit` at most `pages`); reads
    /// only the words covering that range.
    fn next_set(&self, page: u64, limit: u64) -> Option<u64> {
        let limit = limit.min(self.pages);
        if page >= limit || self.clean {
            return None;
        }
        if self.full {
            return Some(page);
        }
        let last = ((limit - 1) / 64) as usize;
        let mut wi = (page / 64) as usize;
        let mut w = self.words[wi] & (u64::MAX << (page % 64));
        count_word();
        loop {
            if w != 0 {
                let at = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (at < limit).then_some(at);
            }
            wi += 1;
            if wi > last {
                return None;
            }
            w = self.words[wi];
            count_word();
        }
    }

    /// First clear bit in `page..limit` (`limit` at most `pages`), or
    /// `limit`; reads only the words covering that range.
    fn next_clear(&self, page: u64, limit: u64) -> u64 {
        let limit = limit.min(self.pages);
        if page >= limit || self.full {
            return limit;
        }
        let last = ((limit - 1) / 64) as usize;
        let mut wi = (page / 64) as usize;
        let mut w = !self.words[wi] & (u64::MAX << (page % 64));
        count_word();
        loop {
            if w != 0 {
                return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(limit);
            }
            wi += 1;
            if wi > last {
                return limit;
            }
            w = !self.words[wi];
            count_word();
        }
    }
}

/// Iterator over the dirty runs of a [`DirtyBitmap`].
pub struct Runs<'a> {
    bm: &'a DirtyBitmap,
    region: usize,
    page: u64,
    end: Option<u64>,
    max_run: u64,
}

impl Iterator for Runs<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        while let Some(r) = self.bm.regions.get(self.region) {
            let limit = self.end.unwrap_or(r.pages).min(r.pages);
            if let Some(start) = r.next_set(self.page, limit) {
                let cap = start.saturating_add(self.max_run).min(limit);
                let end = r.next_clear(start, cap);
                self.page = end;
                return Some(PageRun {
                    region: self.region,
                    first_page: start,
                    npages: end - start,
                });
            }
            if self.end.is_some() {
                return None;
            }
            self.region += 1;
            self.page = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionDesc;

    #[test]
    fn clear_range_clears_exactly_its_pages() {
        let l = MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: 300 * 4096,
        }])
        .unwrap();
        for (first, n) in [(0, 300), (3, 1), (60, 70), (64, 64), (130, 1000), (299, 5)] {
            let mut bm = DirtyBitmap::new(&l);
            bm.set_all();
            bm.clear_range(0, first, n);
            for p in 0..300 {
                assert_eq!(
                    bm.is_set(0, p),
                    !(first..first + n).contains(&p),
                    "{first}+{n}: {p}"
                );
            }
        }
    }

    /// `runs_in` over one chunk looks at that chunk's words, however much
    /// of the region lies beyond it set (or clear): walking a 64 GiB
    /// bitmap chunk by chunk must cost the bitmap once, not once per chunk.
    #[test]
    fn runs_in_reads_only_the_words_of_its_range() {
        let pages = 1 << 20;
        let l = MemoryLayout::new(vec![RegionDesc {
            guest_addr: 0,
            size: pages * 4096,
        }])
        .unwrap();
        let mut bm = DirtyBitmap::new(&l);
        bm.set_all();
        let read = || WORDS_READ.with(|c| c.get());
        let before = read();
        let runs: Vec<_> = bm.runs_in(0, 1024, 2048, u64::MAX).collect();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first_page, runs[0].npages), (1024, 1024));
        let all_set = read() - before;
        assert!(all_set <= 2 * (1024 / 64 + 2), "read {all_set} words");
        bm.clear();
        bm.set(0, pages - 1);
        let before = read();
        assert_eq!(bm.runs_in(0, 0, 1024, u64::MAX).count(), 0);
        let all_clear = read() - before;
        assert!(all_clear <= 1024 / 64 + 2, "read {all_clear} words");
    }

    /// A round's passes (runs, count) skip a region with no bit set: an
    /// untouched 61 GiB region costs them nothing, not 250 K words.
    #[test]
    fn passes_skip_a_region_with_no_page_set() {
        let l = MemoryLayout::new(vec![
            RegionDesc {
                guest_addr: 0,
                size: 1024 * 4096,
            },
            RegionDesc {
                guest_addr: 1 << 32,
                size: (1 << 20) * 4096,
            },
        ])
        .unwrap();
        let mut bm = DirtyBitmap::new(&l);
        bm.set_all();
        bm.clear();
        bm.set(0, 5);
        bm.clear_range(1, 0, 1 << 20);
        let read = || WORDS_READ.with(|c| c.get());
        let before = read();
        let runs: Vec<_> = bm.runs(u64::MAX).collect();
        assert_eq!(runs.len(), 1);
        assert_eq!(bm.count(), 1);
        let words = read() - before;
        assert!(words <= 2 * 16 + 2, "read {words} words");
    }

    /// After `set_all` the passes answer without reading the words (round
    /// 0's skipped chunks of a 61 GiB region were counted word by word);
    /// every method that clears a page makes them read the words again.
    #[test]
    fn a_full_region_is_counted_without_its_words_until_a_page_is_cleared() {
        let mut bm = DirtyBitmap::new(&layout());
        bm.set_all();
        let read = || WORDS_READ.with(|c| c.get());
        let before = read();
        assert_eq!(bm.count_in(0, 3, 130), 127);
        assert!(bm.any_in(1, 0, 64));
        let runs: Vec<_> = bm.runs(u64::MAX).map(|r| (r.region, r.npages)).collect();
        assert_eq!(runs, [(0, 130), (1, 64)]);
        assert_eq!(read() - before, 0, "words read");
        type Clearer = (&'static str, fn(&mut DirtyBitmap));
        let clearers: [Clearer; 3] = [
            ("unset", |b| b.unset(0, 70)),
            ("clear_range", |b| b.clear_range(0, 70, 1)),
            ("and_not", |b| {
                let mut o = DirtyBitmap::new(&layout());
                o.set(0, 70);
                b.and_not(&o);
            }),
        ];
        for (name, clear) in clearers {
            let mut bm = DirtyBitmap::new(&layout());
            bm.set_all();
            clear(&mut bm);
            assert_eq!(bm.count_in(0, 0, 130), 129, "{name}");
            assert_eq!(bm.count(), 129 + 64, "{name}");
            assert!(!bm.any_in(0, 70, 71), "{name}");
            let runs: Vec<_> = bm.runs_in(0, 0, 130, u64::MAX).map(|r| r.npages).collect();
            assert_eq!(runs, [70, 59], "{name}");
            bm.set(0, 70);
            assert_eq!(bm.count_in(0, 0, 130), 130, "{name}");
        }
        let mut bm = DirtyBitmap::new(&layout());
        bm.set_all();
        bm.clear();
        bm.set(0, 1);
        assert_eq!((bm.count(), bm.any_in(0, 2, 130)), (1, false));
    }

    /// Every method that sets a page makes the region's pages visible to
    /// the passes again, after a clear (the region's summary).
    #[test]
    fn every_setter_after_a_clear_is_seen() {
        type Setter = (&'static str, fn(&mut DirtyBitmap));
        let setters: [Setter; 5] = [
            ("set", |b| b.set(1, 7)),
            ("set_range", |b| b.set_range(1, 7, 1)),
            ("or_words", |b| b.or_words(1, &[1 << 7])),
            ("or_word", |b| b.or_word(1, 0, 1 << 7)),
            ("set_all", |b| {
                b.set_all();
                b.clear_range(0, 0, 130);
                b.clear_range(1, 0, 7);
                b.clear_range(1, 8, 64);
            }),
        ];
        for (name, set) in setters {
            let mut bm = DirtyBitmap::new(&layout());
            bm.set_all();
            bm.clear();
            bm.or_words(1, &[0]);
            set(&mut bm);
            assert_eq!(bm.count(), 1, "{name}");
            assert_eq!(bm.count_in(1, 0, 64), 1, "{name}");
            assert!(bm.any_in(1, 7, 8), "{name}");
            let runs: Vec<_> = bm.runs(64).map(|r| (r.region, r.first_page)).collect();
            assert_eq!(runs, [(1, 7)], "{name}");
            bm.clear();
            assert_eq!((bm.count(), bm.is_set(1, 7)), (0, false), "{name}");
        }
    }

    #[test]
    fn and_not_clears_the_pages_of_the_other_bitmap() {
        let mut a = DirtyBitmap::new(&layout());
        let mut b = DirtyBitmap::new(&layout());
        a.set_range(0, 0, 100);
        a.set(1, 3);
        b.set_range(0, 10, 80);
        b.set(1, 4);
        a.and_not(&b);
        assert_eq!(a.count(), 10 + 10 + 1);
        assert!(a.is_set(0, 9) && !a.is_set(0, 10) && !a.is_set(0, 89) && a.is_set(0, 90));
        assert!(a.is_set(1, 3));
    }

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            RegionDesc {
                guest_addr: 0,
                size: 130 * 4096,
            },
            RegionDesc {
                guest_addr: 1 << 30,
                size: 64 * 4096,
            },
        ])
        .unwrap()
    }

    #[test]
    fn runs_match_naive_scan() {
        let l = layout();
        let mut bm = DirtyBitmap::new(&l);
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut naive = vec![vec![false; 130], vec![false; 64]];
        for _ in 0..120 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let region = (x % 2) as usize;
            let page = (x >> 8) % naive[region].len() as u64;
            bm.set(region, page);
            naive[region][page as usize] = true;
        }
        for max_run in [1, 3, 64, 1000] {
            let mut rebuilt = vec![vec![false; 130], vec![false; 64]];
            for run in bm.runs(max_run) {
                assert!(run.npages >= 1 && run.npages <= max_run);
                for p in run.first_page..run.first_page + run.npages {
                    assert!(!rebuilt[run.region][p as usize]);
                    rebuilt[run.region][p as usize] = true;
                }
            }
            assert_eq!(rebuilt, naive);
        }
        let n: usize = naive.iter().flatten().filter(|b| **b).count();
        assert_eq!(bm.count(), n as u64);
    }

    #[test]
    fn runs_in_range() {
        let l = layout();
        let mut bm = DirtyBitmap::new(&l);
        for p in [3, 4, 5, 63, 64, 65, 100, 129] {
            bm.set(0, p);
        }
        bm.set(1, 0);
        let runs: Vec<_> = bm
            .runs_in(0, 4, 65, 100)
            .map(|r| (r.first_page, r.npages))
            .collect();
        assert_eq!(runs, vec![(4, 2), (63, 2)]);
        assert!(bm.any_in(0, 100, 101));
        assert!(!bm.any_in(0, 101, 129));
        assert_eq!(bm.runs_in(1, 0, 64, 8).count(), 1);
    }

    #[test]
    fn any_in_matches_a_bit_by_bit_scan() {
        let l = layout();
        let pages = l.regions()[0].pages();
        let mut bm = DirtyBitmap::new(&l);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bm.set(0, x % pages);
        }
        let mut checked = 0;
        for first in (0..pages).step_by(7) {
            for len in [0, 1, 2, 63, 64, 65, 200, 1000] {
                let end = first + len;
                let naive = (first..end.min(pages)).any(|p| bm.is_set(0, p));
                assert_eq!(bm.any_in(0, first, end), naive, "{first}..{end}");
                let n = (first..end.min(pages)).filter(|p| bm.is_set(0, *p)).count();
                assert_eq!(bm.count_in(0, first, end), n as u64, "{first}..{end}");
                checked += 1;
            }
        }
        assert!(checked > 100);
        assert!(!bm.any_in(9, 0, 10), "a missing region has no pages");
    }

    #[test]
    fn or_words_masks_tail_and_set_all() {
        let l = layout();
        let mut bm = DirtyBitmap::new(&l);
        bm.or_words(0, &[0, 0, u64::MAX, u64::MAX]);
        assert_eq!(bm.count(), 2);
        assert!(bm.is_set(0, 128) && bm.is_set(0, 129) && !bm.is_set(0, 130));
        bm.set_all();
        assert_eq!(bm.count(), 194);
        let runs: Vec<_> = bm.runs(u64::MAX).collect();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].npages, 130);
        bm.clear();
        assert_eq!(bm.runs(8).count(), 0);
        bm.set(5, 0);
        bm.set(0, 10_000);
        assert_eq!(bm.count(), 0);
    }
}
