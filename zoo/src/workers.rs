//! How the zoo uses the machine's cores: models in parallel on the engine's worker pool, each
//! model single-threaded, and the CPU time that timings report.

use std::time::Instant;

use probex_engine::parallel::in_parallel_until;

use crate::ZooError;

/// Runs `f` in a one-thread rayon pool, so that Burn's CPU kernels, which use rayon when the
/// backend is built with it, stay single-threaded and the result does not depend on how many
/// models run beside it.
pub(crate) fn single_threaded<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, ZooError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| ZooError::Internal(format!("thread pool: {e}")))?;
    Ok(pool.install(f))
}

/// Worker threads for a `threads` setting (0 = all cores).
pub(crate) fn worker_count(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// CPU time of the calling thread in seconds (Linux; `None` elsewhere). Used for timings on a
/// shared machine, where wall time says more about the neighbours than about the zoo.
pub fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the command name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Thread CPU seconds since `cpu` when available, else wall seconds since `t`.
pub(crate) fn elapsed(t: Instant, cpu: Option<f64>) -> f64 {
    match (cpu, thread_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => t.elapsed().as_secs_f64(),
    }
}

/// Runs `job(0..n)` on `threads` threads of the engine's pool, each job single-threaded in a
/// one-thread rayon pool of its own ([`single_threaded`]); results in index order, the first
/// error (by index) returned. After a failure no new job starts. A job that panics fails the
/// build with an internal error instead of taking the process down.
pub(crate) fn run_parallel<T: Send>(
    threads: usize,
    n: usize,
    job: &(dyn Fn(usize) -> Result<T, ZooError> + Sync),
) -> Result<Vec<T>, ZooError> {
    let run_one = |i: usize| -> Result<T, ZooError> {
        let guarded = std::panic::AssertUnwindSafe(|| single_threaded(|| job(i)));
        std::panic::catch_unwind(guarded)
            .unwrap_or_else(|_| Err(ZooError::Internal("a worker thread panicked".into())))?
    };
    let slots = in_parallel_until((0..n).collect(), threads, run_one, Result::is_err);
    let mut out = Vec::with_capacity(n);
    for slot in slots {
        match slot {
            Some(r) => out.push(r?),
            // Only after a failure do jobs stay unstarted; that failure was returned above.
            None => return Err(ZooError::Internal("a job did not run".into())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_in_index_order_and_the_first_failure_wins() {
        let squares = run_parallel(3, 20, &|i| Ok(i * i)).unwrap();
        assert_eq!(squares, (0..20).map(|i| i * i).collect::<Vec<_>>());
        let failed = run_parallel(2, 20, &|i| {
            if i >= 5 {
                Err(ZooError::Config(format!("job {i}")))
            } else {
                Ok(i)
            }
        });
        assert!(matches!(failed, Err(ZooError::Config(m)) if m == "job 5"));
    }

    #[test]
    fn a_panicking_job_is_an_internal_error() {
        let r = run_parallel(2, 4, &|i| {
            if i == 2 {
                panic!("job {i} panics");
            }
            Ok(i)
        });
        assert!(matches!(r, Err(ZooError::Internal(m)) if m.contains("panicked")));
    }

    #[test]
    fn each_job_runs_on_one_rayon_thread() {
        let counts = run_parallel(4, 8, &|_| Ok(rayon::current_num_threads())).unwrap();
        assert!(counts.iter().all(|&c| c == 1), "{counts:?}");
    }
}
