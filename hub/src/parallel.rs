//! Many repos at once: the Hub client's use of the engine's worker pool, and how the errors of
//! many transfers are reported together.

use std::sync::atomic::Ordering;

use probex_engine::parallel::in_parallel_until;

use super::{Hub, HubError};

impl Hub {
    /// Runs `f` over `items` on at most `concurrency` threads of the engine's pool. After the
    /// first error, or once the fetch is cancelled, no new item starts (finished ones stay
    /// cached); an item that did not start is `None`.
    pub(super) fn parallel<T: Sync, R: Send>(
        &self,
        items: &[T],
        f: impl Fn(usize, &T) -> Result<R, HubError> + Sync,
    ) -> Vec<Option<Result<R, HubError>>> {
        let run = |(i, item): (usize, &T)| {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(HubError::Cancelled);
            }
            f(i, item)
        };
        let items: Vec<(usize, &T)> = items.iter().enumerate().collect();
        in_parallel_until(items, self.concurrency, run, Result::is_err)
    }

    /// [`collect_errors`] of [`Hub::parallel`]'s results, the items that did not start said as
    /// cancelled when the fetch was.
    pub(super) fn collect<R>(
        &self,
        results: Vec<Option<Result<R, HubError>>>,
    ) -> Result<Vec<R>, HubError> {
        let cancelled = self.cancel.load(Ordering::Relaxed);
        collect_errors(results, cancelled)
    }
}

/// Every result, or one error that lists the failures (at most 10) and says how many items did
/// not start after them. An item that did not start (`None`) is a failure of its own when the
/// fetch was `cancelled`.
pub(super) fn collect_errors<R>(
    results: Vec<Option<Result<R, HubError>>>,
    cancelled: bool,
) -> Result<Vec<R>, HubError> {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut not_started = 0usize;
    for r in results {
        match r {
            Some(Ok(v)) => ok.push(v),
            Some(Err(e)) => errors.push(e),
            None if cancelled => errors.push(HubError::Cancelled),
            None => not_started += 1,
        }
    }
    if errors.is_empty() && not_started == 0 {
        return Ok(ok);
    }
    Err(HubError::Many {
        errors,
        not_started,
        finished: ok.len(),
    })
}
