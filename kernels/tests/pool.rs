//! The thread pool: every index runs exactly once per call, calls can follow
//! each other rapidly, a panic on any thread reaches the caller (and the pool
//! stays usable), nested and concurrent calls do not deadlock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cardinal_kernels::Pool;

#[test]
fn every_thread_index_runs_once_per_call() {
    for threads in [1, 2, 3, 5] {
        let pool = Pool::new(threads);
        assert_eq!(pool.threads(), threads);
        let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
        for round in 1..=2000 {
            pool.run(&|t, n| {
                assert_eq!(n, threads);
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), round);
            }
        }
    }
}

#[test]
fn calls_after_the_workers_went_to_sleep_still_run() {
    let pool = Pool::new(3);
    let count = AtomicUsize::new(0);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(20));
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
    }
    assert_eq!(count.load(Ordering::Relaxed), 9);
}

#[test]
fn panic_in_a_worker_propagates_and_the_pool_survives() {
    let pool = Pool::new(3);
    for bad in [0, 1, 2] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|t, _| {
                if t == bad {
                    panic!("boom on {t}");
                }
            })
        }));
        let err = r.expect_err("panic must propagate");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(msg, format!("boom on {bad}"));
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 3);
    }
}

#[test]
fn nested_and_concurrent_calls_complete() {
    let pool = Pool::new(2);
    let count = AtomicUsize::new(0);
    pool.run(&|_, _| {
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(count.load(Ordering::Relaxed), 4);
    let total = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    pool.run(&|_, _| {
                        total.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
        }
    });
    assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 2);
}

#[test]
fn pool_is_send_sync_and_debug() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
    let p = Pool::new(2);
    assert!(format!("{p:?}").contains("threads: 2"));
    drop(p);
}

/// The nice value of the calling thread (Linux, per thread).
#[cfg(target_os = "linux")]
fn own_nice() -> i32 {
    // SAFETY: gettid has no preconditions; getpriority only reads integers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

#[cfg(target_os = "linux")]
#[test]
fn workers_run_at_the_requested_nice_and_the_caller_keeps_its_own() {
    use std::sync::Mutex;
    let before = own_nice();
    let pool = cardinal_kernels::Pool::with_nice(3, 7);
    let seen = Mutex::new(Vec::new());
    // Several calls, so that the workers (not only the caller) claim indices.
    for _ in 0..200 {
        pool.run(&|_, _| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            seen.lock().unwrap().push((name, own_nice()));
            std::thread::sleep(std::time::Duration::from_micros(200));
        });
    }
    let seen = seen.into_inner().unwrap();
    let workers: Vec<_> = seen
        .iter()
        .filter(|(n, _)| n.starts_with("cardinal-pool-"))
        .collect();
    assert!(!workers.is_empty(), "the workers ran some indices");
    assert!(workers.iter().all(|&(_, nice)| *nice == 7), "{workers:?}");
    assert_eq!(own_nice(), before, "the caller's priority is untouched");
    assert!(
        cardinal_kernels::set_thread_nice(-1).is_err(),
        "raising priority is refused"
    );
    assert!(cardinal_kernels::set_thread_nice(20).is_err());
}
