//! Watches a config folder and publishes each valid set. A change that fails validation is
//! logged with every fault and counted; the set that is serving stays.
//!
//! The folder is polled (its file contents hashed) rather than watched with inotify: it is
//! a handful of small files, polling works the same on every filesystem, and it sees
//! Kubernetes ConfigMap symlink swaps without special cases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::load::{load_files, read_dir, SourceFile};
use super::{ConfigErrors, ConfigSet};

/// How often the folder is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Outcome of the latest attempt to load the folder, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct LoadStatus {
    /// Sets accepted since start.
    pub accepted: u64,
    /// Changes rejected since start.
    pub rejected: u64,
    /// Faults of the latest rejected change, cleared when a good set is accepted.
    pub last_errors: Option<ConfigErrors>,
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

/// Loads the folder once; the first set must be valid.
pub fn initial(dir: &std::path::Path) -> Result<ConfigSet, ConfigErrors> {
    load_files(&read_dir(dir)?)
}

/// Polls `dir` until every receiver is gone, publishing valid sets on `config`.
pub async fn run(
    dir: PathBuf,
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
        match load_files(&files) {
            Ok(set) => {
                let changed = **config.borrow() != set;
                if changed {
                    tracing::info!(
                        services = set.services.len(),
                        workloads = set.workloads.len(),
                        "config accepted"
                    );
                    config.send_replace(Arc::new(set));
                }
                status.send_modify(|s| {
                    s.accepted += u64::from(changed);
                    s.last_errors = None;
                });
            }
            Err(errors) => {
                tracing::warn!(%errors, "config change rejected; keeping the serving config");
                status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_errors = Some(errors);
                });
            }
        }
    }
}
