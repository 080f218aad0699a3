//! Stopping a component as a whole. Every task a component spawns for a connection or a
//! stream runs under its [`Drain`]; the component's [`Running`] handle stops them in two
//! steps, as ztunnel does:
//!
//! 1. *draining*: listeners stop accepting, long-lived control-plane streams end (their
//!    clients reconnect elsewhere), HTTP connections finish their requests and close;
//! 2. *force*, at the deadline or on `abort`: every task still running is cancelled.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;

/// Held by the component's owner; `true` once draining, dropped to force.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// Spawns tasks that stop with the component.
#[derive(Debug, Clone)]
pub struct Drain {
    rx: watch::Receiver<bool>,
    /// Tasks spawned under this drain that are still running.
    active: Arc<AtomicUsize>,
}

pub fn new() -> (Trigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (
        Trigger { tx },
        Drain {
            rx,
            active: Arc::default(),
        },
    )
}

/// Decrements the active count however the task ends.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drain {
    /// Resolves when the component is forced to stop.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        while rx.changed().await.is_ok() {}
    }

    /// Resolves when the component starts draining (or is forced to stop).
    pub async fn draining(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Runs `fut` until it finishes or the component is forced to stop.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let drain = self.clone();
        self.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.active.clone());
        tokio::spawn(async move {
            let _active = active;
            tokio::select! {
                _ = fut => {}
                _ = drain.signaled() => {}
            }
        });
    }

    /// Serves one HTTP connection; when draining starts, it finishes the requests in
    /// flight and closes (GOAWAY on HTTP/2, `Connection: close` on HTTP/1.1).
    pub async fn serve_http<C: GracefulConnection>(&self, conn: C) -> Result<(), C::Error> {
        let mut conn = pin!(conn);
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = self.draining() => conn.as_mut().graceful_shutdown(),
        }
        conn.await
    }
}

/// The long-lived tasks of a running component and the trigger of its drain: the one
/// handle a component's `Bound` keeps.
/// Work to finish when the component stops (flushing telemetry).
type Finally = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long [`Running::shutdown`] waits for the work given to [`Running::finally`].
const FINALLY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Running {
    tasks: tokio::task::JoinSet<()>,
    trigger: Trigger,
    active: Arc<AtomicUsize>,
    finally: Vec<Finally>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("tasks", &self.tasks.len())
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl Running {
    pub fn new() -> (Self, Drain) {
        let (trigger, drain) = new();
        let running = Self {
            tasks: tokio::task::JoinSet::new(),
            trigger,
            active: drain.active.clone(),
            finally: Vec::new(),
        };
        (running, drain)
    }

    pub fn spawn<F>(&mut self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Runs `fut` once connections have drained at [`Running::shutdown`] (bounded by a
    /// few seconds): telemetry flushing its buffers.
    pub fn finally<F>(&mut self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.finally.push(Box::pin(fut));
    }

    /// Resolves when any long-lived task ends, which only a fatal error makes happen.
    pub async fn wait_any(&mut self) {
        self.tasks.join_next().await;
    }

    /// Stops everything at once, as if the process died.
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }

    /// Drains, lets connection tasks finish until `deadline`, then forces the rest.
    /// Returns how many tasks were cut off.
    pub async fn shutdown(mut self, deadline: std::time::Duration) -> usize {
        self.trigger.tx.send_replace(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let end = tokio::time::Instant::now() + deadline;
        while self.active.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let cut = self.active.load(Ordering::Relaxed);
        let finally = futures::future::join_all(std::mem::take(&mut self.finally));
        let _ = tokio::time::timeout(FINALLY_DEADLINE, finally).await;
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_stop_when_the_trigger_is_dropped() {
        let (trigger, drain) = new();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        drain.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(trigger);
        let closed = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .expect("task ended");
        assert!(closed.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_tasks_finish_until_the_deadline_then_cuts_them_off() {
        let (running, drain) = Running::new();
        drain.spawn(tokio::time::sleep(Duration::from_millis(300)));
        assert_eq!(
            running.shutdown(Duration::from_secs(1)).await,
            0,
            "the short task finished"
        );

        let (running, drain) = Running::new();
        drain.spawn(std::future::pending());
        let start = tokio::time::Instant::now();
        assert_eq!(
            running.shutdown(Duration::from_secs(1)).await,
            1,
            "the stuck task was cut off"
        );
        assert!(start.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn long_lived_streams_end_when_draining_starts() {
        let (running, drain) = Running::new();
        let d = drain.clone();
        drain.spawn(async move { d.draining().await });
        assert_eq!(running.shutdown(Duration::from_secs(5)).await, 0);
    }
}
