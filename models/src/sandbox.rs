//! The render sandbox: this module owns running untrusted work (a model's
//! chat template) on a dedicated thread bounded in memory and wall-clock
//! time, and disabling that work for good once it has broken a bound.
//!
//! [`Sandbox::run`] hands each job, over a bounded queue, to one of
//! [`WORKERS`] persistent worker threads of the sandbox (started on first
//! use, ended when the sandbox is dropped), which opens an
//! [`alloc_guard`](crate::alloc_guard) budget scope for it; the caller waits,
//! with a timeout, for the answer on a bounded channel. If the job goes over
//! its memory budget, the allocator stops its worker for good (it keeps at
//! most the budget); if it runs past the timeout, the budget is cancelled so
//! the worker stops at its next allocation instead of burning CPU. Either
//! way the caller gets a [`Stopped`] naming the limit, and the sandbox is
//! *poisoned*: every later job fails at once with the same reason. A sandbox
//! therefore leaks at most [`WORKERS`] stuck threads, each holding at most
//! its budget, over the life of the process, while renders of concurrent
//! requests neither queue behind one lane nor pay a thread start each
//! (under an overload of 80 requests at once that cost 18 ms at p50).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::alloc_guard::{self, Budget, Trip};

/// How often the caller looks at the budget while it waits.
const POLL: Duration = Duration::from_millis(5);
/// Worker threads per sandbox: jobs run this many at a time, and at most
/// this many threads can be left stopped by a hostile job.
pub const WORKERS: usize = 2;
/// Jobs waiting for a worker before callers block.
const QUEUE: usize = 64;

/// A job and the budget its worker runs it under. The job runs inside the
/// budget scope and returns what delivers its answer, which the worker calls
/// after closing the scope, so the budget's peak is final by then.
type Work = (Arc<Budget>, Box<dyn FnOnce() -> Deliver + Send>);
/// Sends a finished job's answer to its caller.
type Deliver = Box<dyn FnOnce() + Send>;

/// Stack of a job thread: room for minijinja's recursion limit with margin
/// (reserved, not committed: only the pages touched are used).
const STACK_BYTES: usize = 8 << 20;

/// The bounds of one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Net bytes the job's thread may allocate.
    pub memory_bytes: usize,
    /// Wall-clock time the caller waits for the answer.
    pub timeout: Duration,
}

/// Why a job gave no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    /// This job went over the memory budget; the sandbox is now poisoned.
    #[error("rendering {}; it is disabled from now on", self.cause())]
    Memory {
        budget: usize,
        in_use: usize,
        requested: usize,
    },
    /// This job ran past the time limit; the sandbox is now poisoned.
    #[error("rendering {}; it is disabled from now on", self.cause())]
    Timeout(Duration),
    /// An earlier job broke a limit (the cause), so no job runs any more.
    #[error("disabled: an earlier render {0}")]
    Poisoned(String),
    /// The job's thread could not be started or panicked.
    #[error("the render thread {0}")]
    Failed(String),
}

impl Stopped {
    /// What the job did, e.g. "was stopped at its memory budget of 256.0 MiB
    /// (...)"; empty for the other kinds.
    fn cause(&self) -> String {
        match self {
            Stopped::Memory {
                budget,
                in_use,
                requested,
            } => format!(
                "was stopped at its memory budget of {} (it asked for {} more with {} in use)",
                mib(*budget),
                mib(*requested),
                mib(*in_use)
            ),
            Stopped::Timeout(t) => format!(
                "did not finish within its time limit of {} s",
                t.as_secs_f64()
            ),
            Stopped::Poisoned(_) | Stopped::Failed(_) => String::new(),
        }
    }
}

/// Bytes as MiB for messages.
fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// A sandbox for one piece of untrusted work (one chat template).
#[derive(Debug)]
pub struct Sandbox {
    limits: Limits,
    /// The workers' queue, created with them on first use.
    queue: OnceLock<Result<SyncSender<Work>, String>>,
    /// Set once, by the first job that breaks a limit: what it broke.
    poisoned: OnceLock<String>,
    /// The most net bytes any finished job held at once.
    peak: AtomicUsize,
}

impl Sandbox {
    /// A sandbox whose jobs run within `limits`.
    pub fn new(limits: Limits) -> Self {
        Sandbox {
            limits,
            queue: OnceLock::new(),
            poisoned: OnceLock::new(),
            peak: AtomicUsize::new(0),
        }
    }

    /// The bounds of each job.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The most net bytes a job of this sandbox that answered held at once:
    /// how close real work comes to the budget.
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Why the sandbox is disabled, if it is.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    /// The queue to the workers, starting them on first use.
    fn queue(&self) -> Result<&SyncSender<Work>, Stopped> {
        let q = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Work>(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            for _ in 0..WORKERS {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name("chat-template".into())
                    .stack_size(STACK_BYTES)
                    .spawn(move || worker(&rx))
                    .map_err(|e| format!("could not be started: {e}"))?;
            }
            Ok(tx)
        });
        q.as_ref().map_err(|e| Stopped::Failed(e.clone()))
    }

    /// Runs `job` on a worker thread within the limits and returns its
    /// answer, or why there is none. Blocks the caller for at most the
    /// timeout (plus the wait for a free worker).
    pub fn run<T, F>(&self, job: F) -> Result<T, Stopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.check()?;
        let budget = Budget::new(self.limits.memory_bytes);
        let (tx, rx) = mpsc::sync_channel(1);
        let task: Box<dyn FnOnce() -> Deliver + Send> = Box::new(move || {
            let answer = job();
            Box::new(move || {
                // The caller may have given up (timeout): nothing to do then.
                let _ = tx.send(answer);
            })
        });
        self.queue()?
            .send((budget.clone(), task))
            .map_err(|_| Stopped::Failed("has no worker left".into()))?;
        let deadline = Instant::now() + self.limits.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(POLL)) {
                Ok(answer) => {
                    // The worker closed the scope before delivering the answer.
                    self.peak.fetch_max(budget.peak(), Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Stopped::Failed("panicked".into()));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let stopped = match budget.tripped() {
                Some(Trip::Memory { in_use, requested }) => Stopped::Memory {
                    budget: budget.limit(),
                    in_use,
                    requested,
                },
                // Only this function cancels, after a timeout it reports.
                Some(Trip::Cancelled) => Stopped::Timeout(self.limits.timeout),
                None if left.is_zero() => {
                    budget.cancel();
                    Stopped::Timeout(self.limits.timeout)
                }
                None => continue,
            };
            let _ = self.poisoned.set(stopped.cause());
            return Err(stopped);
        }
    }

    fn check(&self) -> Result<(), Stopped> {
        match self.poisoned.get() {
            Some(why) => Err(Stopped::Poisoned(why.clone())),
            None => Ok(()),
        }
    }
}

/// A worker: runs jobs from the queue, each in its own budget scope, until
/// the sandbox (the queue's sender) is dropped. A job that panics loses its
/// answer (its caller sees a failure) but not the worker.
fn worker(rx: &Mutex<Receiver<Work>>) {
    loop {
        // The lock is released before the job runs, so a stopped worker never
        // holds it; a poisoned lock only means another worker panicked in recv.
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((budget, task)) = next else {
            return;
        };
        let scope = alloc_guard::enter(budget);
        let deliver = catch_unwind(AssertUnwindSafe(task));
        drop(scope);
        if let Ok(deliver) = deliver {
            deliver();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(memory_bytes: usize, timeout_ms: u64) -> Sandbox {
        Sandbox::new(Limits {
            memory_bytes,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    #[test]
    fn answers_come_back() {
        let s = sandbox(16 << 20, 5000);
        for i in 0..8u32 {
            assert_eq!(s.run(move || vec![i; 1000].len()), Ok(1000));
        }
        assert!(s.peak_bytes() >= 4000, "{}", s.peak_bytes());
        assert_eq!(s.poisoned(), None);
    }

    #[test]
    fn a_memory_hog_is_stopped_and_poisons_the_sandbox() {
        let s = sandbox(8 << 20, 10_000);
        let t = Instant::now();
        let e = s
            .run(|| {
                let mut v = vec![0u8; 1];
                loop {
                    v.extend_from_within(..);
                }
            })
            .unwrap_err();
        assert!(matches!(e, Stopped::Memory { .. }), "{e}");
        assert!(e.to_string().contains("memory budget of 8.0 MiB"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let t = Instant::now();
        let again = s.run(|| 1).unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(50));
        assert!(matches!(again, Stopped::Poisoned(_)), "{again}");
        assert!(again.to_string().contains("memory budget"), "{again}");
    }

    #[test]
    fn a_slow_job_times_out_and_poisons_the_sandbox() {
        let s = sandbox(16 << 20, 50);
        let e = s
            .run(|| {
                loop {
                    std::hint::black_box(Box::new(0u8));
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap_err();
        assert_eq!(e, Stopped::Timeout(Duration::from_millis(50)));
        assert!(e.to_string().contains("time limit of 0.05 s"), "{e}");
        assert!(matches!(s.run(|| 1), Err(Stopped::Poisoned(_))));
    }

    #[test]
    fn a_panicking_job_is_an_error_but_does_not_poison() {
        let s = sandbox(16 << 20, 5000);
        let e = s.run(|| -> u32 { panic!("boom") }).unwrap_err();
        assert!(matches!(e, Stopped::Failed(_)), "{e}");
        assert_eq!(s.run(|| 2), Ok(2));
    }
}
