//! Clusters leaving the federation. Removing a cluster withdraws its exports and gateways
//! from every registry at once (so clients move away before anything is refused), cuts
//! off and refuses its controller, and after a drain period names it in every cluster's
//! `removed_clusters`, from which point every proxy refuses certificates its CA issued.
//! Removals are kept with the exports on disk.
//!
//! Also the federation's view of which clusters are down: one that no other connected
//! cluster's gateway can reach (every one reporting its links says the link to it is
//! down) is down for every proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use super::{GlobalRegistry, Inner};

fn now_unix() -> u64 {
    isthmus_core::admin::unix_seconds(SystemTime::now())
}

impl Inner {
    /// Clusters no other connected cluster's gateway can reach, and since when (the
    /// latest of the reports that agree). A cluster with no reporter is not judged.
    pub(super) fn down_since(&self) -> BTreeMap<String, u64> {
        let reporters: Vec<(&String, &BTreeMap<String, u64>)> = self
            .links
            .iter()
            .filter(|(c, _)| self.liveness.get(*c).is_some_and(|l| l.connected))
            .collect();
        let mut down = BTreeMap::new();
        for cluster in self.clusters.keys() {
            let judges: Vec<_> = reporters.iter().filter(|(r, _)| *r != cluster).collect();
            if judges.is_empty() {
                continue;
            }
            let since: Option<Vec<u64>> = judges
                .iter()
                .map(|(_, l)| l.get(cluster).copied())
                .collect();
            if let Some(since) = since {
                down.insert(cluster.clone(), since.into_iter().max().unwrap_or(0));
            }
        }
        down
    }

    /// The clusters whose gateway reports it cannot reach `cluster`.
    pub(super) fn unreachable_from(&self, cluster: &str) -> Vec<String> {
        self.links
            .iter()
            .filter(|(_, l)| l.contains_key(cluster))
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Removed clusters whose drain period is over.
    pub(super) fn refused_now(&self) -> Vec<String> {
        let now = now_unix();
        self.removed
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// What removing a cluster did.
#[derive(Debug)]
pub struct Removed {
    pub refused_from_unix: u64,
    pub withdrawn_services: usize,
}

impl GlobalRegistry {
    /// Removes `cluster` from the federation, refusing its certificates after `drain`.
    pub fn remove_cluster(&self, cluster: &str, drain: Duration) -> Result<Removed, String> {
        let mut inner = self.lock();
        if inner.removed.contains_key(cluster) {
            return Err(format!("cluster {cluster} was already removed"));
        }
        if !inner.clusters.contains_key(cluster) && !inner.liveness.contains_key(cluster) {
            return Err(format!("the federation knows no cluster {cluster}"));
        }
        let refused_from_unix = now_unix() + drain.as_secs();
        inner.removed.insert(cluster.to_owned(), refused_from_unix);
        inner.liveness.remove(cluster);
        inner.trust.remove(cluster);
        inner.links.remove(cluster);
        let keys = self.withdraw(&mut inner, cluster);
        drop(inner);
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot keep the removal on disk; it is written again with the next change");
        }
        self.removals.send_modify(|n| *n += 1);
        self.trust_changed.notify_one();
        tracing::info!(%cluster, withdrawn = keys.len(), refused_from_unix, "cluster removed from the federation");
        Ok(Removed {
            refused_from_unix,
            withdrawn_services: keys.len(),
        })
    }

    /// Takes `cluster`'s exports and gateways out of the registry and publishes the
    /// result; returns the services withdrawn.
    fn withdraw(&self, inner: &mut Inner, cluster: &str) -> Vec<String> {
        let keys: Vec<String> = inner
            .clusters
            .remove(cluster)
            .map(|c| c.services.into_keys().collect())
            .unwrap_or_default();
        inner.stale.remove(cluster);
        // Its share of each global rate limit goes to the clusters still serving.
        inner.limits.remove(cluster);
        inner.limit_shares = super::limits::shares(&inner.limits);
        let version = inner.version + 1;
        inner.remerge(keys.iter().cloned(), version);
        inner.version = version;
        inner.meta = std::sync::Arc::new(self.meta_of(inner));
        inner.meta_version = version;
        inner.compact();
        self.observe(inner);
        self.dirty.notify_one();
        self.changes.send_replace(version);
        keys
    }

    pub fn is_removed(&self, cluster: &str) -> bool {
        self.lock().removed.contains_key(cluster)
    }

    /// Bumped at every removal.
    pub fn removals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.removals.subscribe()
    }

    /// Tells every cluster of removed clusters as their drain periods end, and, with
    /// `forget_after`, withdraws the exports of a cluster silent for that long (until it
    /// reports again); runs until the process stops.
    pub async fn run_timers(self, forget_after: Option<Duration>) {
        let mut removals = self.removals();
        let mut changes = self.changes.subscribe();
        let mut told: BTreeSet<String> = BTreeSet::new();
        loop {
            let (next, now_refused) = {
                let mut inner = self.lock();
                let mut next_expiry = None;
                if let Some(ttl) = forget_after {
                    let now = now_unix();
                    for (cluster, since) in inner.stale_since() {
                        let at = since + ttl.as_secs();
                        if at <= now {
                            let gone = self.withdraw(&mut inner, &cluster);
                            tracing::warn!(%cluster, silent_s = now - since, withdrawn = gone.len(), "cluster silent too long: its exports are withdrawn until it reports again");
                        } else {
                            next_expiry = Some(next_expiry.map_or(at, |n: u64| n.min(at)));
                        }
                    }
                }
                let refused: BTreeSet<String> = inner.refused_now().into_iter().collect();
                if refused != told {
                    let version = inner.version + 1;
                    inner.version = version;
                    inner.meta = std::sync::Arc::new(self.meta_of(&inner));
                    inner.meta_version = version;
                    self.changes.send_replace(version);
                }
                let now = now_unix();
                let next = inner
                    .removed
                    .values()
                    .filter(|at| **at > now)
                    .copied()
                    .chain(next_expiry)
                    .min();
                (next, refused)
            };
            for c in now_refused.difference(&told) {
                tracing::info!(cluster = %c, "drain over: certificates of the removed cluster are refused everywhere");
            }
            told = now_refused;
            let wait = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_secs(at.saturating_sub(now_unix())).max(Duration::from_millis(200))
            });
            tokio::select! {
                changed = removals.changed() => if changed.is_err() { return },
                // A cluster went silent (or came back): its expiry moves.
                changed = changes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
