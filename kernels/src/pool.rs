//! A persistent team of threads for the short parallel regions of decode (a token's ~60 GEMV
//! groups and attention steps of a few hundred microseconds each).
//!
//! rayon, called from a thread outside its pool (the executor's), injects each region as a job
//! and puts the caller to sleep until the workers finish it: every region costs a futex sleep
//! and wake of the caller, and often a wake of a worker (measured: ~240 context switches per
//! decode token of the 125M Llama, 1.4 of 2 CPUs busy). A [`Team`] instead has `threads − 1`
//! helper threads that **spin** between regions (for [`SPIN`], then park on a condition
//! variable), and the **caller is a member**: it publishes a region with two atomic writes,
//! runs its own share and waits for the helpers' last tasks, never sleeping.
//!
//! Work is split statically: member `p` of `m` owns the contiguous index range
//! `[p·n/m, (p+1)·n/m)`, so each thread streams contiguous weight rows; a member that finishes
//! its range takes the remaining indices of the others' (one atomic increment per index), so a
//! helper that is late (parked, or descheduled on a shared machine) costs nothing but its
//! share being done by someone else.
//!
//! One region runs at a time per team; a region started while another runs (a second calling
//! thread, or a task starting a region of its own) runs on its caller alone, so nothing can
//! deadlock. A panic in a task is re-raised on the caller after every member has left.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins waiting for the next region before it parks: longer than the
/// serial steps between a decode token's regions (norms, cache appends: a few microseconds), so
/// within a token the helper never parks, and short, because a spinning helper takes CPU time
/// from its own caller when the machine is oversubscribed (with a 2 ms spin, bf16 decode of the
/// 125M Llama ran at 0.6× on this 2-core VM under a load of 6; at 30 µs as fast as rayon or
/// faster). Between tokens it parks, and the token's first region wakes it.
pub const SPIN: Duration = Duration::from_micros(30);

/// The team of [`crate::threads`] members (the caller and `threads − 1` helpers) that the
/// kernels' decode regions use, started on first use.
pub fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team::new(crate::threads().saturating_sub(1)))
}

/// `f(i, &mut items[i])` for every index, over the global [`team`].
pub fn for_each<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
    team().for_each(items, f)
}

/// A caller-joined team of helper threads (see the module docs).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Held by the caller of the running region.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team")
            .field("helpers", &self.helpers.len())
            .finish()
    }
}

/// What the caller and the helpers share.
#[derive(Default)]
struct Shared {
    /// Bumped once per region published (and at shutdown).
    epoch: AtomicU64,
    /// The running region's job (null between regions); lives on its caller's stack.
    job: AtomicPtr<Job<'static>>,
    /// Helpers between reading `job` and being done with it.
    inside: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// One region: `n` tasks, a cursor per member over its own range.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    /// Inline for up to 64 members: a region does not allocate.
    cursors: smallvec::SmallVec<[Cursor; 64]>,
    panicked: AtomicBool,
}

/// The next unclaimed index of one member's range, alone on its cache line.
#[repr(align(64))]
struct Cursor {
    next: AtomicUsize,
    end: usize,
}

impl Job<'_> {
    /// Claims and runs indices: member `me`'s own range first, then the others' leftovers.
    fn work(&self, me: usize) {
        let members = self.cursors.len();
        for c in (0..members).map(|o| &self.cursors[(me + o) % members]) {
            loop {
                let i = c.next.fetch_add(1, Ordering::Relaxed);
                if i >= c.end {
                    break;
                }
                if catch_unwind(AssertUnwindSafe(|| (self.task)(i))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Team {
    /// A team of the caller and `helpers` helper threads.
    pub fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared::default());
        let helpers = (1..=helpers)
            .filter_map(|me| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-team-{me}"))
                    .spawn(move || helper(&shared, me))
                    .ok()
            })
            .collect();
        Team {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// Members: the caller and the helpers.
    pub fn members(&self) -> usize {
        self.helpers.len() + 1
    }

    /// `f(i, &mut items[i])` for every index, each exactly once, over the team; returns when
    /// all are done. Re-raises (as a new panic) a panic of any call.
    pub fn for_each<T: Send>(&self, items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
        let base = ItemsPtr(items.as_mut_ptr());
        let n = items.len();
        let task = |i: usize| {
            assert!(i < n);
            // SAFETY: `run` calls `task` once per index below n (each index is claimed by
            // exactly one atomic increment of its range's cursor), so this is the only
            // reference to items[i]; `items` stays mutably borrowed until `run` returns, which
            // is after every call has finished. T: Send, so another thread may own it.
            let item = unsafe { &mut *base.at(i) };
            f(i, item)
        };
        self.run(n, &task)
    }

    /// `task(i)` for every `i < n` (see [`Team::for_each`]).
    fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let alone = || (0..n).for_each(task);
        if n <= 1 || self.helpers.is_empty() {
            return alone();
        }
        // A region inside a task, or from a second thread: on its caller alone.
        let Ok(_busy) = self.busy.try_lock() else {
            return alone();
        };
        let members = self.members().min(n);
        let job = Job {
            task,
            cursors: (0..members)
                .map(|p| Cursor {
                    next: AtomicUsize::new(p * n / members),
                    end: (p + 1) * n / members,
                })
                .collect(),
            panicked: AtomicBool::new(false),
        };
        let s = &*self.shared;
        let ptr = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        {
            // Withdraws the job and waits for the helpers inside it, also if a task of ours
            // panics: `job` must outlive every helper's use of it.
            let _withdraw = Withdraw(s);
            job.work(0);
        }
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a task of a parallel region panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// On drop: clears the published job, then waits until no helper is inside it.
struct Withdraw<'a>(&'a Shared);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        let s = self.0;
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        let mut spins = 0u32;
        while s.inside.load(Ordering::SeqCst) > 0 {
            // A helper finishing its last task: a few microseconds, unless it was descheduled.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The items of [`Team::for_each`], shared with the members.
struct ItemsPtr<T>(*mut T);

// SAFETY: the pointer is only used to reach distinct items from different threads (one
// claimant per index, see `Team::for_each`), and the items are Send.
unsafe impl<T: Send> Sync for ItemsPtr<T> {}

impl<T> ItemsPtr<T> {
    /// The address of item `i`.
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// A helper's life: wait for a region, take part in it, repeat until shutdown.
fn helper(s: &Shared, me: usize) {
    let mut seen = 0;
    while let Some(epoch) = next_epoch(s, seen) {
        seen = epoch;
        s.inside.fetch_add(1, Ordering::SeqCst);
        // Read after entering: the caller withdraws the job before it waits for `inside`, so
        // a job read here stays alive until this helper leaves.
        let job = s.job.load(Ordering::SeqCst);
        if !job.is_null() {
            // SAFETY: the job's caller is blocked in `Withdraw` until `inside` drops back
            // (see above), so the job and the task it borrows outlive this use.
            let job = unsafe { &*job };
            if me < job.cursors.len() {
                job.work(me);
            }
        }
        s.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until the epoch differs from `seen`: spinning for [`SPIN`], then parked. `None` at
/// shutdown.
fn next_epoch(s: &Shared, seen: u64) -> Option<u64> {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        if s.shutdown.load(Ordering::Relaxed) {
            return None;
        }
        let e = s.epoch.load(Ordering::SeqCst);
        if e != seen {
            return Some(e);
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && started.elapsed() > SPIN {
            break;
        }
    }
    let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    s.parked.fetch_add(1, Ordering::SeqCst);
    let e = loop {
        let e = s.epoch.load(Ordering::SeqCst);
        if e != seen || s.shutdown.load(Ordering::SeqCst) {
            break e;
        }
        l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
    };
    s.parked.fetch_sub(1, Ordering::SeqCst);
    (!s.shutdown.load(Ordering::SeqCst)).then_some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_exactly_once() {
        for helpers in [0, 1, 3] {
            let team = Team::new(helpers);
            for n in [0usize, 1, 2, 7, 33, 4097] {
                let mut items: Vec<u32> = vec![0; n];
                team.for_each(&mut items, |i, v| *v += 1 + i as u32);
                let want: Vec<u32> = (0..n).map(|i| 1 + i as u32).collect();
                assert_eq!(items, want, "{helpers} helpers, {n} items");
            }
        }
    }

    #[test]
    fn helpers_take_part_and_park_after_spinning() {
        let team = Team::new(1);
        let seen = Mutex::new(std::collections::HashSet::new());
        // Regions of tasks long enough that the helper joins while the caller is still busy
        // (on a busy machine it may be scheduled late: retried for up to 10 s).
        let region = |items: &mut [u8]| {
            team.for_each(items, |_, _| {
                seen.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(Duration::from_millis(1));
            })
        };
        let mut items = vec![0u8; 64];
        let took_part = |items: &mut [u8]| {
            seen.lock().unwrap().clear();
            let started = Instant::now();
            while seen.lock().unwrap().len() < 2 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no helper took part"
                );
                region(items);
            }
        };
        took_part(&mut items);
        // Past the spin the helper parks, and the next regions must wake it.
        let waited = Instant::now();
        while team.shared.parked.load(Ordering::SeqCst) == 0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "never parked");
            std::thread::sleep(SPIN);
        }
        took_part(&mut items);
    }

    #[test]
    fn nested_and_concurrent_regions_run_on_their_callers() {
        let team = Team::new(2);
        let total = AtomicU32::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    let mut outer = vec![0u32; 9];
                    team.for_each(&mut outer, |_, o| {
                        let mut inner = vec![1u32; 5];
                        team.for_each(&mut inner, |_, v| *v += 1);
                        *o = inner.iter().sum();
                    });
                    total.fetch_add(outer.iter().sum(), Ordering::Relaxed);
                });
            }
        });
        assert_eq!(total.into_inner(), 4 * 9 * 10);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_after_the_region() {
        let team = Team::new(1);
        let mut items = vec![0u32; 16];
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.for_each(&mut items, |i, v| {
                assert!(i != 11, "task 11");
                *v = 1;
            })
        }));
        assert!(r.is_err());
        // Every other task still ran, and the team still works.
        assert_eq!(items.iter().sum::<u32>(), 15);
        team.for_each(&mut items, |_, v| *v = 2);
        assert_eq!(items.iter().sum::<u32>(), 32);
    }
}
