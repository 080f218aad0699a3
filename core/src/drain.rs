//! Stopping a component as a whole: every task it spawns for a connection or stream runs
//! under a [`Drain`] and ends when the component's [`Trigger`] is dropped, so a stopped
//! component leaves nothing serving behind (as a process that exits would).

use std::future::Future;

use tokio::sync::watch;

/// Held by the component's owner; dropping it stops every task spawned under its drain.
#[derive(Debug)]
pub struct Trigger {
    _tx: watch::Sender<()>,
}

/// Spawns tasks that stop with the component.
#[derive(Debug, Clone)]
pub struct Drain {
    rx: watch::Receiver<()>,
}

pub fn new() -> (Trigger, Drain) {
    let (tx, rx) = watch::channel(());
    (Trigger { _tx: tx }, Drain { rx })
}

impl Drain {
    /// Resolves when the trigger is gone.
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        while rx.changed().await.is_ok() {}
    }

    /// Runs `fut` until it finishes or the component stops.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let drain = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = drain.signaled() => {}
            }
        });
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
}

/// The long-lived tasks of a running component and the trigger of its drain: the one
/// handle a component's `Bound` keeps.
#[derive(Debug)]
pub struct Running {
    tasks: tokio::task::JoinSet<()>,
    _trigger: Trigger,
}

impl Running {
    pub fn new() -> (Self, Drain) {
        let (trigger, drain) = new();
        (
            Self {
                tasks: tokio::task::JoinSet::new(),
                _trigger: trigger,
            },
            drain,
        )
    }

    pub fn spawn<F>(&mut self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Resolves when any long-lived task ends, which only a fatal error makes happen.
    pub async fn wait_any(&mut self) {
        self.tasks.join_next().await;
    }

    /// Stops everything at once, as if the process died.
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }
}
