//! A guarded global allocator: this module owns per-thread memory budgets.
//! [`GuardedAlloc`] wraps [`std::alloc::System`] and is installed as the
//! `#[global_allocator]` of every binary that links `cardinal-models` (see
//! `lib.rs`), so the server, the `cardinal` binary and all test binaries get
//! it. A thread may open a budget scope ([`enter`]); while it is open, the
//! net bytes that thread allocates are counted in a `thread_local!` cell. An
//! allocation that would take the count past the scope's [`Budget`] is never
//! made: the allocator records the trip in the budget (atomics the waiting
//! side polls) and then blocks that thread forever, so what it holds stays
//! bounded by the budget. It neither unwinds (a `GlobalAlloc` must not) nor
//! returns null (which aborts the process). A budget can also be cancelled
//! from another thread: the scoped thread then stops at its next allocation.
//!
//! Cost: one thread-local access and one branch per allocation, free and
//! reallocation on threads without a scope; the counting path is out of line.
//!
//! Invariants for code run inside a scope (chat template rendering):
//! - it must hold no lock shared with other threads while it allocates,
//!   since a tripped thread never releases what it holds; the same goes for
//!   one-time global initialisations (`OnceLock`), which a trip would leave
//!   pending forever, so they are done before the first scope (see
//!   `template.rs`, which warms minijinja's up);
//! - it must not hand the scope to another thread ([`Scope`] is `!Send`).
//!
//! A panicking thread is never stopped (its panic hook holds stderr and
//! backtrace locks); its allocations are still counted.
//!
//! The count is per thread and net: memory allocated in the scope and freed
//! elsewhere stays counted (conservative), and memory allocated before the
//! scope and freed inside it counts negative, so a scope can hold at most its
//! budget plus what it was handed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

/// The global allocator: [`System`] plus per-thread budget accounting.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuardedAlloc;

/// Why a scoped thread was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trip {
    /// An allocation would have taken the thread past its budget.
    Memory {
        /// Net bytes the thread held in the scope when it asked.
        in_use: usize,
        /// Bytes it asked for.
        requested: usize,
    },
    /// The budget was cancelled ([`Budget::cancel`]) and the thread stopped
    /// at its next allocation.
    Cancelled,
}

const RUNNING: u8 = 0;
const TRIPPED_MEMORY: u8 = 1;
const TRIPPED_CANCELLED: u8 = 2;

/// A memory budget shared between a scoped thread and whoever waits on it.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    cancelled: AtomicBool,
    state: AtomicU8,
    in_use: AtomicUsize,
    requested: AtomicUsize,
    peak: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` net bytes (at most `isize::MAX`).
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.min(isize::MAX as usize),
            cancelled: AtomicBool::new(false),
            state: AtomicU8::new(RUNNING),
            in_use: AtomicUsize::new(0),
            requested: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether (and why) the scoped thread has been stopped. Once this is
    /// `Some`, that thread will never run again.
    pub fn tripped(&self) -> Option<Trip> {
        match self.state.load(Ordering::Acquire) {
            TRIPPED_MEMORY => Some(Trip::Memory {
                in_use: self.in_use.load(Ordering::Relaxed),
                requested: self.requested.load(Ordering::Relaxed),
            }),
            TRIPPED_CANCELLED => Some(Trip::Cancelled),
            _ => None,
        }
    }

    /// The most net bytes the scoped thread held at once, as of when its
    /// scope closed or it was stopped (0 before).
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Asks the scoped thread to stop: its next allocation blocks it forever
    /// (it keeps what it holds, at most the budget, and uses no more CPU).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    fn record(&self, state: u8, in_use: usize, requested: usize) {
        self.peak.fetch_max(in_use, Ordering::Release);
        self.in_use.store(in_use, Ordering::Relaxed);
        self.requested.store(requested, Ordering::Relaxed);
        self.state.store(state, Ordering::Release);
    }
}

/// What this thread's scope looks like: the budget (null without a scope),
/// the net bytes allocated since the scope opened and their high-water mark.
#[derive(Clone, Copy)]
struct ThreadScope {
    budget: *const Budget,
    used: isize,
    peak: isize,
}

impl ThreadScope {
    const NONE: ThreadScope = ThreadScope {
        budget: std::ptr::null(),
        used: 0,
        peak: 0,
    };
}

thread_local! {
    // `const` initialisation and a `Copy` type without a destructor: the
    // access compiles to a plain thread-local load, never initialises lazily
    // and never registers a destructor, so it never allocates (which would
    // recurse into the allocator) and is valid for the thread's whole life.
    static SCOPE: Cell<ThreadScope> = const { Cell::new(ThreadScope::NONE) };
}

/// An open budget scope on the current thread; closing it (dropping) stops
/// the counting. Not `Send`: the scope belongs to the thread that opened it.
#[must_use = "the scope closes when dropped"]
#[derive(Debug)]
pub struct Scope {
    budget: Arc<Budget>,
    _not_send: PhantomData<*const ()>,
}

/// Opens a budget scope on the current thread.
///
/// # Panics
/// If this thread already has a scope open (scopes do not nest).
pub fn enter(budget: Arc<Budget>) -> Scope {
    let prev = SCOPE.with(Cell::get);
    assert!(
        prev.budget.is_null(),
        "alloc_guard::enter: this thread already has a budget scope open"
    );
    SCOPE.with(|c| {
        c.set(ThreadScope {
            budget: Arc::as_ptr(&budget),
            used: 0,
            peak: 0,
        })
    });
    Scope {
        budget,
        _not_send: PhantomData,
    }
}

impl Scope {
    /// The budget of this scope.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // Cleared before `self.budget` (the Arc keeping the pointee alive) is
        // released, so the thread-local never points at a freed budget.
        let s = SCOPE.with(|c| c.replace(ThreadScope::NONE));
        self.budget
            .peak
            .fetch_max(s.peak.max(0) as usize, Ordering::Release);
    }
}

/// Net bytes allocated on this thread since its scope opened, or None
/// without a scope.
pub fn used() -> Option<isize> {
    let s = SCOPE.with(Cell::get);
    (!s.budget.is_null()).then_some(s.used)
}

/// Whether [`GuardedAlloc`] is the global allocator of this process (a
/// scope sees its own allocations).
pub fn is_installed() -> bool {
    let fresh = used().is_none().then(|| enter(Budget::new(usize::MAX)));
    let before = used().unwrap_or(0);
    let probe = std::hint::black_box(Box::new([0u8; 64]));
    let seen = used().is_some_and(|u| u - before >= 64);
    drop(probe);
    drop(fresh);
    seen
}

/// Counts `bytes` about to be allocated on this thread. Returns only if the
/// allocation may go ahead.
#[inline(always)]
fn charge(bytes: usize) {
    let _ = SCOPE.try_with(|c| {
        let s = c.get();
        if !s.budget.is_null() {
            charge_scoped(c, s, bytes);
        }
    });
}

/// Uncounts `bytes` freed on this thread.
#[inline(always)]
fn credit(bytes: usize) {
    let _ = SCOPE.try_with(|c| {
        let mut s = c.get();
        if !s.budget.is_null() {
            s.used = s.used.wrapping_sub(bytes as isize);
            c.set(s);
        }
    });
}

#[inline(never)]
fn charge_scoped(cell: &Cell<ThreadScope>, s: ThreadScope, bytes: usize) {
    // SAFETY: `s.budget` is non-null only between `enter` and the drop of
    // the `Scope` it returned, which holds an `Arc` to the pointee; the
    // thread-local is cleared before that Arc is released, and a tripped
    // thread never returns, so the pointee outlives every use here.
    let budget = unsafe { &*s.budget };
    let in_use = s.used.max(0) as usize;
    let used = s
        .used
        .saturating_add(bytes.min(isize::MAX as usize) as isize);
    // A panicking thread is never stopped: the panic hook holds process-wide
    // locks (stderr, backtrace symbolisation) that a stopped thread would
    // keep forever, and what it allocates does not grow with the work.
    // (`panicking` reads a thread-local counter; it does not allocate.)
    if !std::thread::panicking() {
        if budget.cancelled.load(Ordering::Acquire) {
            stop(cell, budget, TRIPPED_CANCELLED, in_use, bytes);
        }
        if used > budget.limit as isize {
            stop(cell, budget, TRIPPED_MEMORY, in_use, bytes);
        }
    }
    cell.set(ThreadScope {
        used,
        peak: s.peak.max(used),
        ..s
    });
}

/// Records the trip and blocks this thread forever. Nothing here allocates:
/// the scope is cleared first (so even an allocation would not recurse),
/// the record is three atomic stores, and `thread::sleep` is a syscall.
#[cold]
#[inline(never)]
fn stop(
    cell: &Cell<ThreadScope>,
    budget: &Budget,
    state: u8,
    in_use: usize,
    requested: usize,
) -> ! {
    cell.set(ThreadScope::NONE);
    budget.record(state, in_use, requested);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the accounting around it
// only reads and writes a thread-local `Cell` and atomics, never allocates,
// never unwinds, and either lets the call through or blocks the thread
// forever before `System` is reached.
unsafe impl GlobalAlloc for GuardedAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for
        // `layout`, which is passed through unchanged.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            credit(layout.size());
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            credit(layout.size());
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        credit(layout.size());
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`,
        // with `layout` (the caller's contract).
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            charge(new_size - old);
        }
        // SAFETY: `ptr` was allocated by `System` with `layout`, and
        // `new_size` satisfies `realloc`'s contract (the caller's duty).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            // The old block is untouched: undo the charge.
            if new_size > old {
                credit(new_size - old);
            }
        } else if new_size < old {
            credit(old - new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn the_guard_is_the_global_allocator() {
        assert!(is_installed());
        assert_eq!(used(), None, "no scope is left open");
    }

    #[test]
    fn counts_go_up_on_allocation_and_back_down_on_free() {
        let scope = enter(Budget::new(64 << 20));
        let base = used().unwrap();
        let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
        v.push(1);
        assert_eq!(used().unwrap() - base, 1 << 20);
        v.reserve_exact(3 << 20);
        assert!(v.capacity() > 3 << 20);
        assert_eq!(
            used().unwrap() - base,
            v.capacity() as isize,
            "realloc growth counted"
        );
        v.shrink_to(1 << 10);
        let shrunk = used().unwrap() - base;
        assert_eq!(shrunk, v.capacity() as isize, "realloc shrink credited");
        let zeroed = vec![0u64; 1 << 16];
        assert_eq!(used().unwrap() - base, shrunk + (8 << 16));
        drop(zeroed);
        drop(v);
        assert_eq!(used().unwrap(), base, "everything freed is uncounted");
        assert!(scope.budget().tripped().is_none());
        let budget = scope.budget().clone();
        drop(scope);
        assert!(
            budget.peak() > 3 << 20,
            "the high-water mark: {}",
            budget.peak()
        );
        assert_eq!(used(), None);
        // Without a scope nothing is counted.
        let v = vec![0u8; 1 << 20];
        assert_eq!(used(), None);
        drop(v);
    }

    #[test]
    fn allocations_under_the_budget_work() {
        let budget = Budget::new(8 << 20);
        let scope = enter(budget.clone());
        // Many allocations adding up to far more than the budget, but never
        // more than 1 MiB live at once.
        for _ in 0..64 {
            let v = std::hint::black_box(vec![7u8; 1 << 20]);
            assert_eq!(v[12345], 7);
        }
        drop(scope);
        assert!(budget.tripped().is_none());
    }

    /// Spawns a thread that opens `budget`, sends `()` and runs `work`; it
    /// sends `()` again if `work` returns.
    fn scoped_thread(budget: Arc<Budget>, work: fn()) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::sync_channel(2);
        std::thread::spawn(move || {
            let scope = enter(budget);
            tx.send(()).unwrap();
            work();
            drop(scope);
            let _ = tx.send(());
        });
        rx
    }

    fn wait_for_trip(budget: &Budget) -> Trip {
        let t = Instant::now();
        loop {
            if let Some(trip) = budget.tripped() {
                return trip;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no trip");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn going_over_the_budget_stops_the_thread_without_the_allocation() {
        let budget = Budget::new(4 << 20);
        let rx = scoped_thread(budget.clone(), || {
            let mut held = Vec::new();
            for _ in 0..16 {
                held.push(vec![1u8; 1 << 20]);
            }
            std::hint::black_box(held);
        });
        rx.recv().unwrap();
        match wait_for_trip(&budget) {
            Trip::Memory { in_use, requested } => {
                assert!(in_use <= 4 << 20, "{in_use}");
                assert!(in_use + requested > 4 << 20);
            }
            t => panic!("{t:?}"),
        }
        // The thread is blocked for good: it never finishes its work.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn a_cancelled_budget_stops_the_thread_at_its_next_allocation() {
        let budget = Budget::new(usize::MAX);
        let rx = scoped_thread(budget.clone(), || {
            loop {
                std::hint::black_box(Box::new(1u32));
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        rx.recv().unwrap();
        assert!(budget.tripped().is_none());
        budget.cancel();
        assert_eq!(wait_for_trip(&budget), Trip::Cancelled);
    }
}
