//! Watches a config folder and publishes what it admits. Each object is admitted on its
//! own: a rejected object is logged with its faults and counted, and its last admitted
//! version keeps serving; every other change applies.
//!
//! The folder is polled (its file contents hashed) rather than watched with inotify: it is
//! a handful of small files, polling works the same on every filesystem, and it sees
//! Kubernetes ConfigMap symlink swaps without special cases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::load::{admit, read_dir, LastGood, SourceFile};
use super::{ConfigError, ConfigErrors, ConfigSet};

/// How often the folder is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Outcome of the latest attempt to load the folder, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct LoadStatus {
    /// Sets accepted since start.
    pub accepted: u64,
    /// Changes rejected since start.
    pub rejected: u64,
    /// Faults of the objects rejected now (each keeps its last admitted version); `None`
    /// when every object was admitted.
    pub last_errors: Option<ConfigErrors>,
    /// References to missing objects in the serving config.
    pub warnings: Vec<ConfigError>,
}

impl LoadStatus {
    /// The status after admitting `set` with `rejected` objects.
    fn record(&mut self, set: &ConfigSet, rejected: Vec<ConfigError>, changed: bool) {
        self.accepted += u64::from(changed);
        self.rejected += u64::from(!rejected.is_empty());
        self.last_errors = (!rejected.is_empty()).then_some(ConfigErrors(rejected));
        self.warnings = set.warnings.clone();
    }
}

fn fingerprint(files: &[SourceFile]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

impl std::hash::Hash for SourceFile {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.contents.hash(state);
    }
}

/// Loads the folder once: what it admits, the status, and the versions to fall back on.
/// Fails only when the folder cannot be read.
pub fn initial(dir: &std::path::Path) -> Result<(ConfigSet, LoadStatus, LastGood), ConfigErrors> {
    let mut last = LastGood::default();
    let (set, rejected) = admit(&read_dir(dir)?, &mut last);
    for e in &rejected {
        tracing::warn!(error = %e, "config object rejected");
    }
    let mut status = LoadStatus::default();
    status.record(&set, rejected, true);
    Ok((set, status, last))
}

/// Polls `dir` until every receiver is gone, publishing valid sets on `config`.
pub async fn run(
    dir: PathBuf,
    mut last_good: LastGood,
    config: watch::Sender<Arc<ConfigSet>>,
    status: watch::Sender<LoadStatus>,
) {
    let mut last = None;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if config.is_closed() {
            return;
        }
        let read = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || read_dir(&dir)).await
        };
        let files = match read {
            Ok(Ok(files)) => files,
            Ok(Err(errors)) => {
                tracing::warn!(dir = %dir.display(), %errors, "config folder unreadable; keeping the serving config");
                continue;
            }
            Err(_) => continue,
        };
        let fp = fingerprint(&files);
        if last == Some(fp) {
            continue;
        }
        last = Some(fp);
        let (set, rejected) = admit(&files, &mut last_good);
        for e in &rejected {
            tracing::warn!(error = %e, "config object rejected; its last admitted version stays");
        }
        let changed = **config.borrow() != set;
        if changed {
            tracing::info!(
                services = set.services.len(),
                workloads = set.workloads.len(),
                rejected = rejected.len(),
                "config accepted"
            );
            status.send_modify(|s| s.record(&set, rejected, true));
            config.send_replace(Arc::new(set));
        } else {
            status.send_modify(|s| s.record(&set, rejected, false));
        }
    }
}
