//! The one worker pool of probex: `f` over a list of items on up to `threads` scoped threads,
//! results in the items' order.
//!
//! The engine commits a batch's entries with it, the Hub client resolves and fetches repos with
//! it, and the zoo trains its models with it. Plain scoped threads rather than rayon: a caller
//! may run each item in a one-thread rayon pool of its own (the zoo does, so that a model's
//! numbers do not depend on the thread count), and a rayon worker waiting on another pool
//! would start more items meanwhile and oversubscribe the cores. Items are handed out in input
//! order, so whatever runs, runs in order; which thread runs an item never changes its result.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// `f` over `items` on up to `threads` scoped threads; results in the items' order. One item,
/// or one thread, runs on the calling thread.
pub fn in_parallel<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    // Without a stop condition every item runs, so every slot is filled.
    in_parallel_until(items, threads, f, |_| false)
        .into_iter()
        .flatten()
        .collect()
}

/// [`in_parallel`] that starts no new item once a result `stops` (a failure, say): items in
/// flight finish, the rest are `None`. Results in the items' order. Because items start in
/// order, every item before a stopping one has run.
pub fn in_parallel_until<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
    stops: impl Fn(&R) -> bool + Sync,
) -> Vec<Option<R>> {
    let n = items.len();
    let mut slots: Vec<Option<R>> = (0..n).map(|_| None).collect();
    if n <= 1 || threads <= 1 {
        for (slot, item) in slots.iter_mut().zip(items) {
            let r = f(item);
            let stop = stops(&r);
            *slot = Some(r);
            if stop {
                break;
            }
        }
        return slots;
    }
    let stopped = AtomicBool::new(false);
    let queue = Mutex::new(items.into_iter().enumerate());
    let done = Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|scope| {
        for _ in 0..threads.min(n) {
            scope.spawn(|| {
                while !stopped.load(Ordering::Relaxed) {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some((i, item)) = next else { break };
                    let r = f(item);
                    if stops(&r) {
                        stopped.store(true, Ordering::Relaxed);
                    }
                    if let Ok(mut d) = done.lock() {
                        d.push((i, r));
                    }
                }
            });
        }
    });
    // A worker's panic has already propagated out of the scope; the lock is not poisoned here.
    for (i, r) in done.into_inner().unwrap_or_default() {
        slots[i] = Some(r);
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_input_order_whatever_the_thread_count() {
        for threads in [0, 1, 2, 8, 100] {
            let items: Vec<u64> = (0..50).collect();
            let out = in_parallel(items, threads, |x| {
                // Uneven work, so that items finish out of order.
                std::thread::sleep(std::time::Duration::from_micros((50 - x) * 20));
                x * x
            });
            assert_eq!(out, (0..50).map(|x| x * x).collect::<Vec<_>>(), "{threads}");
        }
        assert!(in_parallel(Vec::<u8>::new(), 4, |x| x).is_empty());
    }

    #[test]
    fn a_stopping_result_starts_no_new_item_and_earlier_items_all_ran() {
        for threads in [1usize, 3] {
            let out = in_parallel_until(
                (0..40).collect::<Vec<u32>>(),
                threads,
                |x| {
                    if x == 10 {
                        return Err(x);
                    }
                    // Slow items, so that the others cannot race far past the stop.
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok(x)
                },
                Result::is_err,
            );
            assert_eq!(out.len(), 40);
            assert!(
                out[..10].iter().all(|r| matches!(r, Some(Ok(_)))),
                "{out:?}"
            );
            assert_eq!(out[10], Some(Err(10)));
            // Only what the other workers had in hand (or took in the instant before the stop
            // was seen) ran after it.
            let after = out[11..].iter().filter(|r| r.is_some()).count();
            assert!(after <= 2 * (threads - 1), "{threads}: {out:?}");
        }
    }
}
