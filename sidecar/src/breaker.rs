//! Circuit breaking (Istio's `connectionPool`): a limit on requests in flight to a
//! destination, a bounded queue of requests waiting for a slot, and a budget of retries in
//! flight. Past them the sidecar answers 503 with the `overflow` reason at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use isthmus_core::routing::ConnectionPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct Breaker {
    slots: Option<Arc<Semaphore>>,
    max_pending: Option<u32>,
    pending: AtomicU32,
    max_retries: Option<u32>,
    retries: Arc<AtomicU32>,
}

/// The request's slot; released when dropped.
#[derive(Debug)]
pub struct Admitted(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// A retry in flight; released when dropped.
#[derive(Debug)]
pub struct RetryToken(Arc<AtomicU32>);

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Breaker {
    pub fn new(pool: Option<&ConnectionPool>) -> Self {
        Self {
            slots: pool
                .and_then(|p| p.max_requests)
                .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
            max_pending: pool.and_then(|p| p.max_pending),
            pending: AtomicU32::new(0),
            max_retries: pool.and_then(|p| p.max_retries),
            retries: Arc::default(),
        }
    }

    /// Takes a slot, waiting in the queue if there is room; `None` means overflow.
    pub async fn admit(&self) -> Option<Admitted> {
        let Some(slots) = &self.slots else {
            return Some(Admitted(None));
        };
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Some(Admitted(Some(p)));
        }
        let queued = self.pending.fetch_add(1, Ordering::Relaxed);
        if self.max_pending.is_some_and(|m| queued >= m) {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let permit = slots.clone().acquire_owned().await.ok();
        self.pending.fetch_sub(1, Ordering::Relaxed);
        permit.map(|p| Admitted(Some(p)))
    }

    /// Takes a retry from the budget; `None` when the budget is spent.
    pub fn retry(&self) -> Option<RetryToken> {
        let n = self.retries.fetch_add(1, Ordering::Relaxed);
        let token = RetryToken(self.retries.clone());
        if self.max_retries.is_some_and(|m| n >= m) {
            return None;
        }
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_slot_one_queue_place_then_overflow() {
        let b = Breaker::new(Some(&ConnectionPool {
            max_requests: Some(1),
            max_pending: Some(1),
            ..Default::default()
        }));
        let first = b.admit().await.expect("a slot");
        let b = Arc::new(b);
        let queued = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await.is_some() }
        });
        tokio::task::yield_now().await;
        while b.pending.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(b.admit().await.is_none(), "the third request overflows");
        drop(first);
        assert!(
            queued.await.expect("task"),
            "the queued request gets the slot"
        );
    }

    #[test]
    fn the_retry_budget_is_returned_when_retries_end() {
        let b = Breaker::new(Some(&ConnectionPool {
            max_retries: Some(1),
            ..Default::default()
        }));
        let r = b.retry().expect("one retry");
        assert!(b.retry().is_none());
        drop(r);
        assert!(b.retry().is_some());
    }
}
