//! Backing weights with transparent huge pages.
//!
//! Decode reads every weight once per token, a stream of hundreds of megabytes. In 4 KiB pages
//! that is one TLB miss per page — under a hypervisor a two-level page walk — and the hardware
//! prefetchers stop at every page boundary: on the 2-core EPYC VM this project measures on, two
//! threads read a 150 MB buffer at 11–17 GB/s in 4 KiB pages and at 29–55 GB/s once the same
//! buffer is backed by 2 MiB pages (a C loop of 64-byte loads, alternating runs; BENCHMARKS.md).
//! The machine's THP setting is `madvise`, so nothing gets huge pages unless it asks.
//!
//! [`back_with_huge_pages`] asks, for the whole 2 MiB pages inside a set of buffers: `MADV_HUGEPAGE`
//! (future faults and khugepaged) and `MADV_COLLAPSE` (Linux ≥ 6.1: collapse the pages already
//! there now, copying them once). It is advice: where the kernel refuses (an older kernel, a
//! file mapping it cannot collapse, no free huge pages) the buffer stays as it was and only the
//! speed differs. Elsewhere than Linux it does nothing.

use std::ops::Range;

/// Huge page size on x86-64 and most aarch64 Linux systems.
pub const HUGE_PAGE: usize = 2 << 20;

/// Buffers at most this far apart are advised as one range: a model's weights are separate
/// allocations of 0.4–3 MB, most smaller than a huge page but laid out next to each other
/// (large allocations are separate memory maps, placed side by side with a page of allocator
/// bookkeeping between them), so only their union holds whole huge pages.
pub const MERGE_GAP: usize = 16 << 10;

/// The address range of `data`, for [`back_with_huge_pages`].
pub fn span<T>(data: &[T]) -> Range<usize> {
    let start = data.as_ptr() as usize;
    start..start + std::mem::size_of_val(data)
}

/// Asks the kernel to back the whole 2 MiB pages inside the given buffers' address ranges
/// (see the module docs) — inside their union where they lie at most [`MERGE_GAP`] apart, so
/// the advice may cover the few bytes between two buffers (advice never changes memory
/// contents, and the kernel skips what is not mapped). Returns the bytes it accepted the advice
/// for (0 when refused or unsupported).
pub fn back_with_huge_pages(spans: impl IntoIterator<Item = Range<usize>>) -> usize {
    let mut spans: Vec<Range<usize>> = spans.into_iter().filter(|r| r.end > r.start).collect();
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for r in spans {
        match merged.last_mut() {
            Some(m) if r.start <= m.end.saturating_add(MERGE_GAP) => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
        .into_iter()
        .map(|r| {
            let (lo, hi) = (
                r.start.next_multiple_of(HUGE_PAGE),
                r.end / HUGE_PAGE * HUGE_PAGE,
            );
            if hi > lo {
                advise(lo, hi - lo)
            } else {
                0
            }
        })
        .sum()
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, len: usize) -> usize {
    let p = addr as *mut libc::c_void;
    // SAFETY: neither advice changes memory contents or what is mapped where, whatever the
    // range: MADV_HUGEPAGE only marks it, MADV_COLLAPSE replaces its pages by huge pages
    // holding the same bytes; the kernel checks the range (unmapped parts are an error).
    let hinted = unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) } == 0;
    // SAFETY: as above.
    let collapsed = unsafe { libc::madvise(p, len, libc::MADV_COLLAPSE) } == 0;
    if hinted || collapsed {
        len
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _len: usize) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_unchanged_and_small_buffers_are_left_alone() {
        let v: Vec<u32> = (0..(3 * HUGE_PAGE / 4) as u32).collect();
        back_with_huge_pages([span(&v)]);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        assert_eq!(back_with_huge_pages([span(&v[..1000])]), 0);
        assert_eq!(back_with_huge_pages([span::<u8>(&[])]), 0);
    }

    #[test]
    fn nearby_buffers_are_advised_as_their_union() {
        // Two halves of one buffer, given in reverse order with a gap below MERGE_GAP between
        // them: advised as one range, which holds whole huge pages neither half alone may.
        let v = vec![7u8; 4 * HUGE_PAGE];
        let (a, b) = v.split_at(2 * HUGE_PAGE);
        let (a, b) = (&a[..a.len() - MERGE_GAP / 2], &b[1..]);
        let alone = back_with_huge_pages([span(a)]) + back_with_huge_pages([span(b)]);
        let together = back_with_huge_pages([span(b), span(a)]);
        assert!(together >= alone, "{together} < {alone}");
        assert!(v.iter().all(|&x| x == 7));
    }
}
