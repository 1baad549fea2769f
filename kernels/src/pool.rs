//! `Pool`: a fixed set of persistent worker threads that run one closure for
//! every index `0..threads` per call. The caller publishes the job by bumping an
//! epoch; workers (spinning briefly, then yielding, then parked) and the caller
//! itself *claim* indices from a shared counter, so a call never waits for a
//! descheduled or sleeping worker to start: whoever is running takes the next
//! index. Nothing is allocated per call. A panic in any index is re-raised on
//! the caller after all claimed indices have finished.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// The job type as stored: the lifetime is erased (see `Pool::run`).
type Job = *const (dyn Fn(usize, usize) + Sync + 'static);

/// How long an idle worker spins on the state before it starts yielding.
const SPIN: Duration = Duration::from_micros(200);
/// How long it keeps yielding before it parks.
const YIELD: Duration = Duration::from_millis(2);

/// `state` packs the call's epoch (high 32 bits) and the next unclaimed index.
const IDX_BITS: u32 = 32;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;

struct Shared {
    threads: usize,
    /// (epoch << 32) | next index to claim.
    state: AtomicU64,
    /// The current job. Written by the caller only while no index of any epoch
    /// can be claimed (before publishing a new epoch); read by a thread only
    /// after it claimed an index of the current epoch, which keeps the caller
    /// waiting (see `Pool::run`).
    job: UnsafeCell<Option<Job>>,
    /// Indices of the current call that have finished.
    done: AtomicUsize,
    /// Set on drop: workers exit.
    stop: AtomicBool,
    /// Per worker: true while it is (about to be) parked.
    sleeping: Vec<AtomicBool>,
    /// The first panic payload of the current call.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is the only non-Sync field; its accesses are ordered by the
// `state`/`done` protocol described on the field, and the pointee is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

thread_local! {
    /// True on a thread that is currently executing a pool job (for nested `run`).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Persistent worker threads; the calling thread takes part as well.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<(Thread, Option<JoinHandle<()>>)>,
    /// Serialises concurrent `run` calls from different threads.
    busy: Mutex<()>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.shared.threads)
            .finish()
    }
}

impl Shared {
    /// Claim the next index of epoch `epoch`, if any is left.
    fn claim(&self, epoch: u64) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            if s >> IDX_BITS != epoch || (s & IDX_MASK) as usize >= self.threads {
                return None;
            }
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some((s & IDX_MASK) as usize),
                Err(now) => s = now,
            }
        }
    }

    /// Run index `t` of the current job, recording a panic, then count it done.
    ///
    /// # Safety
    /// `t` was claimed in the current epoch (so the job is set and alive).
    unsafe fn execute(&self, t: usize) {
        // SAFETY: per the contract the caller of `Pool::run` is still waiting for
        // this index, so the job slot holds its live closure.
        let job = unsafe { (*self.job.get()).expect("pool job set") };
        let was = IN_JOB.with(|c| c.replace(true));
        // SAFETY: the closure outlives the call (see above).
        let res = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(t, self.threads) }));
        IN_JOB.with(|c| c.set(was));
        if let Err(p) = res {
            let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        self.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A pool of `threads` threads (the caller plus `threads - 1` workers).
    ///
    /// # Panics
    /// If `threads == 0` or a thread cannot be spawned.
    pub fn new(threads: usize) -> Pool {
        Pool::with_nice(threads, 0)
    }

    /// As [`Pool::new`], with every worker's scheduling priority lowered by
    /// `nice` (see [`set_thread_nice`]), so that latency-sensitive threads of
    /// the same process (an HTTP runtime) win the CPU when they need it.
    pub fn with_nice(threads: usize, nice: i32) -> Pool {
        assert!(
            threads >= 1 && (threads as u64) < IDX_MASK,
            "Pool::new: threads is {threads}, must be at least 1"
        );
        let shared = Arc::new(Shared {
            threads,
            state: AtomicU64::new(threads as u64),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            panic: Mutex::new(None),
        });
        let workers = (1..threads)
            .map(|t| {
                let s = Arc::clone(&shared);
                let h = thread::Builder::new()
                    .name(format!("cardinal-pool-{t}"))
                    .spawn(move || {
                        // Best effort: a pool that keeps the default priority
                        // still computes correctly.
                        let _ = set_thread_nice(nice);
                        worker(s, t - 1)
                    })
                    .expect("Pool::new: failed to spawn a worker thread");
                (h.thread().clone(), Some(h))
            })
            .collect();
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Number of threads, including the caller.
    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Run `f(t, threads)` exactly once for every `t` in `0..threads`, on the
    /// caller and the workers, and return when all are done. A panic in any
    /// `f` is re-raised here after every index has finished. A call from inside
    /// a job (nested) runs all indices on the current thread.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.threads;
        if n == 1 || IN_JOB.with(Cell::get) {
            for t in 0..n {
                f(t, n);
            }
            return;
        }
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. This function does not return
        // (not even by panic: every index runs under catch_unwind) before `done`
        // reaches n, i.e. before every claimed index has finished with `f`.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        // SAFETY: every index of the previous epoch is claimed and done, so no
        // thread reads the slot until the new epoch is published below.
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        let epoch = ((s.state.load(Ordering::Relaxed) >> IDX_BITS) + 1) & IDX_MASK;
        s.state.store(epoch << IDX_BITS, Ordering::SeqCst);
        for (k, (th, _)) in self.workers.iter().enumerate() {
            if s.sleeping[k].load(Ordering::SeqCst) {
                th.unpark();
            }
        }
        while let Some(t) = s.claim(epoch) {
            // SAFETY: `t` was claimed in the current epoch.
            unsafe { s.execute(t) };
        }
        let start = Instant::now();
        while s.done.load(Ordering::Acquire) != n {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        // SAFETY: all indices are done and none can be claimed any more.
        unsafe { *s.job.get() = None };
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

/// Lower the calling thread's scheduling priority to `nice` (0 = default,
/// up to 19 = lowest). Linux keeps a nice value per thread (`setpriority` on
/// the thread id); elsewhere, and for 0, this does nothing. Raising a
/// priority (negative values) needs privileges and is refused.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    if !(1..=19).contains(&nice) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("nice {nice} must be between 0 and 19"),
        ));
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; setpriority only reads its
        // integer arguments and acts on this thread.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn worker(s: Arc<Shared>, k: usize) {
    let mut seen = 0u64;
    let sleep_flag = &s.sleeping[k];
    loop {
        let start = Instant::now();
        let epoch = loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.state.load(Ordering::Acquire) >> IDX_BITS;
            if e != seen {
                break e;
            }
            let waited = start.elapsed();
            if waited < SPIN {
                std::hint::spin_loop();
            } else if waited < YIELD {
                thread::yield_now();
            } else {
                sleep_flag.store(true, Ordering::SeqCst);
                // `run` publishes the epoch, then reads this flag (both SeqCst):
                // either we see the new epoch here or it unparks us.
                if s.state.load(Ordering::SeqCst) >> IDX_BITS == seen
                    && !s.stop.load(Ordering::SeqCst)
                {
                    thread::park();
                }
                sleep_flag.store(false, Ordering::SeqCst);
            }
        };
        seen = epoch;
        while let Some(t) = s.claim(epoch) {
            // SAFETY: `t` was claimed in the current epoch.
            unsafe { s.execute(t) };
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (th, h) in &mut self.workers {
            th.unpark();
            if let Some(h) = h.take() {
                let _ = h.join();
            }
        }
    }
}
