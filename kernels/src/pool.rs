//! `Pool`: a fixed set of persistent worker threads that run one closure on every
//! thread index per call. Workers wait on an atomic epoch (spin, then yield, then
//! park), so a call costs two atomic round trips when they are hot; nothing is
//! allocated per call. A panic in any thread is re-raised on the caller.

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// The job type as stored: the lifetime is erased (see `Pool::run`).
type Job = *const (dyn Fn(usize, usize) + Sync + 'static);

/// How long a worker spins on the epoch before it starts yielding.
const SPIN: Duration = Duration::from_micros(100);
/// How long it keeps yielding before it parks.
const YIELD: Duration = Duration::from_millis(2);

struct Shared {
    threads: usize,
    /// Incremented once per `run`; workers run the job when it changes.
    epoch: AtomicU64,
    /// The current job; written only while no worker runs one.
    job: Mutex<Option<SendJob>>,
    /// Workers still running the current job.
    remaining: AtomicUsize,
    /// Set on drop: workers exit.
    stop: AtomicBool,
    /// Per worker: true while it is (about to be) parked.
    sleeping: Vec<AtomicBool>,
    /// The first panic payload of the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync` and `run` keeps it alive until every worker is done.
unsafe impl Send for SendJob {}

thread_local! {
    /// True on a thread that is currently executing a pool job (for nested `run`).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Persistent worker threads; the calling thread acts as thread 0.
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

impl Pool {
    /// A pool of `threads` threads (the caller plus `threads - 1` workers).
    ///
    /// # Panics
    /// If `threads == 0` or a thread cannot be spawned.
    pub fn new(threads: usize) -> Pool {
        assert!(
            threads >= 1,
            "Pool::new: threads is {threads}, must be at least 1"
        );
        let shared = Arc::new(Shared {
            threads,
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            remaining: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            panic: Mutex::new(None),
        });
        let workers = (1..threads)
            .map(|t| {
                let s = Arc::clone(&shared);
                let h = thread::Builder::new()
                    .name(format!("cardinal-pool-{t}"))
                    .spawn(move || worker(s, t))
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

    /// Run `f(t, threads)` for every `t` in `0..threads` (t = 0 on the calling
    /// thread) and return when all are done. A panic in any `f` is re-raised
    /// here after every thread has finished. Calls from inside a job (nested)
    /// run all indices on the current thread.
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
        // SAFETY: only the lifetime is erased. The pointer is published to the
        // workers below and this function does not return (not even by panic,
        // which is caught) before `remaining` is 0, i.e. before every worker has
        // finished with it; the slot is cleared before returning.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendJob(job));
        s.remaining.store(n - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (k, (th, _)) in self.workers.iter().enumerate() {
            if s.sleeping[k].load(Ordering::SeqCst) {
                th.unpark();
            }
        }
        IN_JOB.with(|c| c.set(true));
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        IN_JOB.with(|c| c.set(false));
        let start = Instant::now();
        while s.remaining.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

fn worker(s: Arc<Shared>, t: usize) {
    let mut seen = 0u64;
    let sleep_flag = &s.sleeping[t - 1];
    loop {
        // Wait for a new epoch: spin, then yield, then park.
        let start = Instant::now();
        loop {
            if s.epoch.load(Ordering::Acquire) != seen || s.stop.load(Ordering::Acquire) {
                break;
            }
            let waited = start.elapsed();
            if waited < SPIN {
                std::hint::spin_loop();
            } else if waited < YIELD {
                thread::yield_now();
            } else {
                sleep_flag.store(true, Ordering::SeqCst);
                // Re-check after announcing: `run` bumps the epoch, then reads the
                // flag (both SeqCst), so either we see the epoch or it unparks us.
                if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    thread::park();
                }
                sleep_flag.store(false, Ordering::SeqCst);
            }
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = (*s.job.lock().unwrap_or_else(|e| e.into_inner())).expect("pool job set");
        IN_JOB.with(|c| c.set(true));
        // SAFETY: `run` keeps the closure alive until `remaining` reaches 0,
        // which happens only after this call returns (see `Pool::run`).
        let res = catch_unwind(AssertUnwindSafe(|| unsafe { (*job.0)(t, s.threads) }));
        IN_JOB.with(|c| c.set(false));
        if let Err(p) = res {
            let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
        }
        s.remaining.fetch_sub(1, Ordering::AcqRel);
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
