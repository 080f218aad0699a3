//! Steady traffic as an app sends it: one request at a time through a sidecar's outbound
//! listener, recording when each finished and which cluster answered (or why it failed).
//! The demo and the tests watch failover through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::AppClient;

/// One request's outcome: the cluster that answered, or the failure.
#[derive(Debug, Clone)]
pub struct Event {
    /// When the request finished.
    pub at: Instant,
    /// How long it took, retries included: the stall a caller saw.
    pub took: Duration,
    pub landed: Result<String, String>,
}

type Events = Arc<Mutex<Vec<Event>>>;

pub struct Traffic {
    events: Events,
    task: tokio::task::JoinHandle<()>,
}

async fn once(client: &AppClient, outbound: SocketAddr, host: &str) -> Result<String, String> {
    match client.get(outbound, host, "/").await {
        Ok(r) if r.status == 200 => r.answer().map(|a| a.cluster).map_err(|e| e.to_string()),
        Ok(r) => Err(format!(
            "status {} ({})",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

impl Traffic {
    /// Starts sending to `host` through `outbound`, pausing `gap` between requests.
    pub fn start(outbound: SocketAddr, host: &str, gap: Duration) -> Self {
        let events: Events = Arc::default();
        let (ev, host) = (events.clone(), host.to_owned());
        let task = tokio::spawn(async move {
            let client = AppClient::new();
            loop {
                let sent = Instant::now();
                let landed = once(&client, outbound, &host).await;
                ev.lock().unwrap_or_else(|p| p.into_inner()).push(Event {
                    at: Instant::now(),
                    took: sent.elapsed(),
                    landed,
                });
                tokio::time::sleep(gap).await;
            }
        });
        Self { events, task }
    }

    /// Outcomes of requests that finished at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.at >= since)
            .cloned()
            .collect()
    }

    /// The last `n` outcomes, newest first.
    pub fn last(&self, n: usize) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .take(n)
            .cloned()
            .collect()
    }

    /// Every failure so far.
    pub fn failures(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|e| e.landed.clone().err())
            .collect()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}
