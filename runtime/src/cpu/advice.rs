//! When the weights get huge pages: the advice ([`kiln_kernels::pages`]) is given once per set
//! of graphs compiled together, on a thread of its own, when they run for the second time (the
//! first decode step after a prefill, or a second request). Collapsing hundreds of megabytes
//! into huge pages costs the kernel up to a second and contends with a starting process's page
//! faults (measured: 0.4–0.8 s more to start from a model directory when given at compile
//! time), so a one-shot forward pass never pays for it, and a decode loop runs meanwhile, in
//! 4 KiB pages until the advice is through. Advice changes no memory contents: a weight freed
//! before the thread gets to it is simply not advised.

use kiln_kernels::pages;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// The address ranges of the weights a set of graphs streams, advised at their second run.
#[derive(Debug)]
pub struct HugePages {
    spans: Mutex<Option<Vec<Range<usize>>>>,
    runs: AtomicUsize,
}

impl HugePages {
    /// Advice pending for `spans`.
    pub fn new(spans: Vec<Range<usize>>) -> Self {
        HugePages {
            spans: Mutex::new(Some(spans)),
            runs: AtomicUsize::new(0),
        }
    }

    /// Counts a run of one of the graphs; at the second, starts the advice on a thread of its
    /// own (kept as they are when no thread can be started). True when this call started it.
    pub fn run_started(&self) -> bool {
        if self.runs.fetch_add(1, Ordering::Relaxed) != 1 {
            return false;
        }
        let spans = self
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(spans) = spans else {
            return false;
        };
        std::thread::Builder::new()
            .name("kiln-huge-pages".into())
            .spawn(move || {
                pages::back_with_huge_pages(spans);
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::HugePages;

    #[test]
    fn the_advice_starts_at_the_second_run_only() {
        let data = vec![1u8; 3 << 20];
        let h = HugePages::new(vec![kiln_kernels::pages::span(&data)]);
        let started: Vec<bool> = (0..4).map(|_| h.run_started()).collect();
        assert_eq!(started, [false, true, false, false]);
        assert!(data.iter().all(|&b| b == 1));
    }
}
