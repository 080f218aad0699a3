//! Global rate limits as one sidecar enforces them (`GlobalRateLimit`): a token bucket
//! per limit whose rate is this sidecar's part of its cluster's share, and the demand it
//! sees, reported to the controller every second.
//!
//! The cluster's share comes from the federation in the `Mesh` resource
//! (`limit_shares`). Until one arrives (or with the federation away from the start), a
//! cluster takes the budget over the clusters that run the service. Each sidecar of the
//! service in this cluster takes an equal part: the share over the service's healthy
//! endpoints here. A bucket holds one second of its rate (at least one request), so the
//! mesh admits at most the budget plus one second of it in bursts while shares hold.
//!
//! Buckets live across config pushes, so a push never hands out a fresh burst.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::routing_table::GlobalLimit;
use crate::state::{MeshInfo, MeshState, Service};

/// How often demand is reported.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Every global limit this sidecar has enforced, by `namespace/service/limit`.
#[derive(Debug, Default)]
pub struct GlobalLimits {
    /// Read on every request, written only when a limit is first met.
    buckets: RwLock<HashMap<String, Arc<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    state: Mutex<(f64, Instant)>,
    /// Requests offered since the last report, admitted or not.
    offered: AtomicU64,
}

impl Bucket {
    /// Takes a token at `rate` per second, or says how long until one is free.
    fn take(&self, rate: f64) -> Result<(), Duration> {
        let capacity = rate.max(1.0);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, at) = *s;
        let tokens = (tokens + rate * now.duration_since(at).as_secs_f64()).min(capacity);
        if tokens >= 1.0 {
            *s = (tokens - 1.0, now);
            return Ok(());
        }
        *s = (tokens, now);
        let wait = if rate > 0.0 {
            (1.0 - tokens) / rate
        } else {
            1.0
        };
        Err(Duration::from_secs_f64(wait.min(60.0)))
    }
}

/// This sidecar's rate for `limit` of `svc`, in requests per second.
pub fn rate(mesh: &MeshInfo, svc: &Service, limit: &GlobalLimit) -> f64 {
    let share = mesh
        .limit_shares
        .get(&limit.key)
        .copied()
        .unwrap_or_else(|| {
            f64::from(limit.spec.requests_per_second) / (1 + svc.remote.len()) as f64
        });
    share / svc.endpoints.len().max(1) as f64
}

impl GlobalLimits {
    /// Counts the request against every global limit of `svc` it falls under; `Err(wait)`
    /// when one is spent.
    pub fn check(
        &self,
        mesh: &MeshInfo,
        svc: &Service,
        route: Option<&str>,
    ) -> Result<(), Duration> {
        let Some(routing) = &svc.routing else {
            return Ok(());
        };
        for limit in &routing.global {
            if limit
                .spec
                .route
                .as_deref()
                .is_some_and(|r| Some(r) != route)
            {
                continue;
            }
            let bucket = self.bucket(&limit.key);
            bucket.offered.fetch_add(1, Ordering::Relaxed);
            bucket.take(rate(mesh, svc, limit))?;
        }
        Ok(())
    }

    fn bucket(&self, key: &str) -> Arc<Bucket> {
        if let Some(b) = self
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return b.clone();
        }
        self.buckets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Bucket {
                    state: Mutex::new((f64::MAX, Instant::now())),
                    offered: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Requests per second offered over `elapsed` to each global limit of the services
    /// `workload` serves (every such limit, at no demand too: the controller counts this
    /// cluster in). Resets the counts.
    fn take_demand(
        &self,
        state: &MeshState,
        workload: &str,
        elapsed: Duration,
    ) -> BTreeMap<String, f64> {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        let secs = elapsed.as_secs_f64().max(0.001);
        state
            .services
            .values()
            .filter(|s| s.workloads.iter().any(|w| w == workload))
            .filter_map(|s| s.routing.as_ref())
            .flat_map(|r| r.global.iter())
            .map(|l| {
                let offered = buckets
                    .get(&l.key)
                    .map_or(0, |b| b.offered.swap(0, Ordering::Relaxed));
                (l.key.clone(), offered as f64 / secs)
            })
            .collect()
    }
}

/// Publishes this sidecar's demand into `tx` every [`REPORT_INTERVAL`] while it enforces
/// any global limit (and once more when it stops, so its demand drops to nothing).
pub async fn report(
    limits: Arc<GlobalLimits>,
    state: watch::Receiver<Arc<MeshState>>,
    workload: String,
    tx: watch::Sender<BTreeMap<String, f64>>,
) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(REPORT_INTERVAL).await;
        let now = Instant::now();
        let demand = limits.take_demand(&state.borrow(), &workload, now - last);
        last = now;
        if !demand.is_empty() || !tx.borrow().is_empty() {
            tx.send_replace(demand);
        }
    }
}
