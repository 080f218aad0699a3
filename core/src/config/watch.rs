//! Watches a config folder and publishes what it admits. Each object is admitted on its
//! own: a rejected object is logged with its faults and counted, and its last admitted
//! version keeps serving; every other change applies.
//!
//! The folder is watched by events (inotify through the `notify` crate). An event starts a
//! scan that stats every file and reads and parses only those whose size, modification
//! time or inode changed (a Kubernetes ConfigMap's symlink swap changes the inode the link
//! resolves to), so an edit costs one file's parse, not the folder's. A file changed less
//! than [`STABLE`] ago is read again until it has been left alone that long, so a file
//! caught between its truncation and its write never applies empty. Admission itself
//! (cross-object checks, routing assembly) still runs over the whole set. A slow scan runs
//! every [`RESCAN_INTERVAL`] as well, for events lost to a full inotify queue; where the
//! folder cannot be watched at all (no inotify, out of watches) it is polled every
//! [`POLL_INTERVAL`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use super::load::{
    admit_parsed, io_err, parse_file, yaml_files, LastGood, ParsedFiles, SourceFile,
};
use super::{ConfigError, ConfigErrors, ConfigSet};

/// How often the folder is scanned when it cannot be watched.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the folder is scanned anyway while it is watched.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// After an event, the scan waits until no event came for this long (an editor's or
/// `kubectl cp`'s write, rename and chmod are one change).
const SETTLE: Duration = Duration::from_millis(20);
/// A changed file is applied only once its content has been left alone this long: a file
/// caught between its truncation and its write would otherwise apply as empty, taking its
/// objects away for a moment. Bounded by [`STABLE_WAIT`].
const STABLE: Duration = Duration::from_millis(50);
/// Longest wait for changed files to settle; past it they apply as they are.
const STABLE_WAIT: Duration = Duration::from_secs(1);
/// A file modified this recently is read again on every scan even if its stamp looks
/// unchanged: two writes within one timestamp tick can leave size and time equal.
const RACY: Duration = Duration::from_secs(2);

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
    pub fn record(&mut self, set: &ConfigSet, rejected: Vec<ConfigError>, changed: bool) {
        self.accepted += u64::from(changed);
        self.rejected += u64::from(!rejected.is_empty());
        self.last_errors = (!rejected.is_empty()).then_some(ConfigErrors(rejected));
        self.warnings = set.warnings.clone();
    }
}

/// What identifies a file's contents without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            len: m.len(),
            modified: m.modified()?,
            inode: m.ino(),
        })
    }

    fn recent(&self) -> bool {
        SystemTime::now()
            .duration_since(self.modified)
            .is_ok_and(|age| age < RACY)
    }
}

struct CachedFile {
    stamp: Stamp,
    contents: String,
    parsed: ParsedFiles,
}

/// The folder as last scanned: each file's stamp, contents and parse.
pub struct Folder {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// Files read (and parsed) by the last scan, for tests and logs.
    pub last_parsed: usize,
    /// The latest modification time among the files the last scan read anew.
    newest: Option<SystemTime>,
}

impl Folder {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            last_parsed: 0,
            newest: None,
        }
    }

    /// Reads what changed since the last scan. True when any file's contents changed, a
    /// file appeared or one went away. Fails when the folder or a file cannot be read; the
    /// cache is then left as it was.
    pub fn scan(&mut self) -> Result<bool, ConfigErrors> {
        let paths = yaml_files(&self.dir)?;
        let mut changed =
            self.files.len() != paths.len() || self.files.keys().zip(&paths).any(|(a, b)| a != b);
        let mut old = std::mem::take(&mut self.files);
        let mut next = BTreeMap::new();
        self.last_parsed = 0;
        self.newest = None;
        for path in paths {
            match self.read(&path, old.remove(&path)) {
                Ok(Some((file, parsed))) => {
                    changed |= parsed;
                    next.insert(path, file);
                }
                // Removed between the listing and the read: gone, like any removal.
                Ok(None) => changed = true,
                Err(e) => {
                    old.append(&mut next);
                    self.files = old;
                    return Err(e);
                }
            }
        }
        self.files = next;
        Ok(changed)
    }

    /// Scans until the files it read anew have been left alone for [`STABLE`] (at most
    /// [`STABLE_WAIT`]); blocks the calling thread while it waits. True when anything
    /// changed since the scan before.
    fn scan_until_stable(&mut self) -> Result<bool, ConfigErrors> {
        let started = std::time::Instant::now();
        let mut changed = self.scan()?;
        while let Some(age) = self
            .newest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .filter(|age| *age < STABLE && started.elapsed() < STABLE_WAIT)
        {
            std::thread::sleep(STABLE - age);
            changed |= self.scan()?;
        }
        Ok(changed)
    }

    /// One file, from the cache when its stamp says it is unchanged; true when it was
    /// parsed anew.
    fn read(
        &mut self,
        path: &Path,
        cached: Option<CachedFile>,
    ) -> Result<Option<(CachedFile, bool)>, ConfigErrors> {
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let stamp = match Stamp::of(path) {
            Ok(s) => s,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(io_err(path, e)),
        };
        let cached = match cached {
            Some(c) if c.stamp == stamp && !stamp.recent() => return Ok(Some((c, false))),
            other => other,
        };
        let contents = match std::fs::read_to_string(path) {
            Ok(c) => c,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(io_err(path, e)),
        };
        if let Some(c) = cached.filter(|c| c.contents == contents) {
            return Ok(Some((CachedFile { stamp, ..c }, false)));
        }
        self.last_parsed += 1;
        self.newest = self.newest.max(Some(stamp.modified));
        let parsed = parse_file(&SourceFile {
            name: path.display().to_string(),
            contents: contents.clone(),
        });
        Ok(Some((
            CachedFile {
                stamp,
                contents,
                parsed,
            },
            true,
        )))
    }

    /// Every file's parse, in path order.
    pub fn parsed(&self) -> ParsedFiles {
        let mut all = ParsedFiles::default();
        for f in self.files.values() {
            all.extend(&f.parsed);
        }
        all
    }
}

/// Loads the folder once: the folder's scan, what it admits, the status, and the versions
/// to fall back on. Fails only when the folder cannot be read.
pub fn initial(dir: &Path) -> Result<(Folder, ConfigSet, LoadStatus, LastGood), ConfigErrors> {
    let mut folder = Folder::new(dir);
    folder.scan()?;
    let mut last = LastGood::default();
    let (set, rejected) = admit_parsed(folder.parsed(), &mut last);
    for e in &rejected {
        tracing::warn!(error = %e, "config object rejected");
    }
    let mut status = LoadStatus::default();
    status.record(&set, rejected, true);
    Ok((folder, set, status, last))
}

/// Starts watching `dir`; every event pokes `tx`. `None` when the folder cannot be watched.
fn watch_events(dir: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // A full channel already holds a poke: the coming scan sees this change too.
        let _ = tx.try_send(());
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config folders; polling instead");
            return None;
        }
    };
    match watcher.watch(dir, notify::RecursiveMode::Recursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config folder; polling instead");
            None
        }
    }
}

/// Watches the folder until every receiver is gone, publishing what it admits on `config`.
pub async fn run(
    folder: Folder,
    last_good: LastGood,
    config: watch::Sender<Arc<ConfigSet>>,
    status: watch::Sender<LoadStatus>,
) {
    watch_folder(
        folder,
        last_good,
        config,
        status,
        RESCAN_INTERVAL,
        POLL_INTERVAL,
    )
    .await
}

/// [`run`], scanning every `rescan` while watched and every `poll` when not.
async fn watch_folder(
    mut folder: Folder,
    mut last_good: LastGood,
    config: watch::Sender<Arc<ConfigSet>>,
    status: watch::Sender<LoadStatus>,
    rescan: Duration,
    poll: Duration,
) {
    let (tx, mut events) = mpsc::channel(1);
    let watcher = watch_events(&folder.dir, tx);
    let every = if watcher.is_some() { rescan } else { poll };
    // After a failed scan the next one comes soon, event or not.
    let mut retry = false;
    let dir = folder.dir.clone();
    // The first scan runs at once: a change made after `initial` read the folder and before
    // the watch above began raised no event.
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = events.recv() => {
                    // Until the events stop: a burst of writes is one change.
                    let quiet = tokio::time::Instant::now() + STABLE_WAIT;
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        if events.try_recv().is_err() || tokio::time::Instant::now() > quiet {
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep(if retry { POLL_INTERVAL } else { every }) => {}
            }
        }
        while events.try_recv().is_ok() {}
        if config.is_closed() {
            return;
        }
        let scanned = tokio::task::spawn_blocking(move || {
            let changed = folder.scan_until_stable();
            (folder, changed)
        })
        .await;
        let changed = match scanned {
            Ok((back, changed)) => {
                folder = back;
                changed
            }
            Err(e) => {
                tracing::error!(error = %e, "config scan failed; no longer watching");
                return;
            }
        };
        retry = changed.is_err();
        match changed {
            Ok(false) => continue,
            Ok(true) => {}
            Err(errors) => {
                tracing::warn!(dir = %dir.display(), %errors, "config folder unreadable; keeping the serving config");
                continue;
            }
        }
        tracing::debug!(parsed = folder.last_parsed, "config files changed");
        let (set, rejected) = admit_parsed(folder.parsed(), &mut last_good);
        for e in &rejected {
            tracing::warn!(error = %e, "config object rejected; its last admitted version stays");
        }
        let (services, workloads, n) = (set.services.len(), set.workloads.len(), rejected.len());
        if publish(&config, &status, set, rejected) {
            tracing::info!(services, workloads, rejected = n, "config accepted");
        }
    }
}

/// Publishes an admitted set if it differs from the serving one, and records the outcome
/// in the status either way. Returns whether the set changed.
pub fn publish(
    config: &watch::Sender<Arc<ConfigSet>>,
    status: &watch::Sender<LoadStatus>,
    set: ConfigSet,
    rejected: Vec<ConfigError>,
) -> bool {
    let changed = **config.borrow() != set;
    status.send_modify(|s| s.record(&set, rejected, changed));
    if changed {
        config.send_replace(Arc::new(set));
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: NAME, namespace: demo}\nspec:\n  ports: [{name: http, port: 80}]\n";

    #[test]
    fn a_scan_parses_only_the_files_that_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..20 {
            std::fs::write(
                dir.path().join(format!("s{i}.yaml")),
                SERVICE.replace("NAME", &format!("s{i}")),
            )
            .expect("write");
        }
        let mut folder = Folder::new(dir.path());
        assert!(folder.scan().expect("scan"));
        assert_eq!(folder.last_parsed, 20);
        assert!(!folder.scan().expect("scan"), "nothing changed");
        assert_eq!(folder.last_parsed, 0);

        std::fs::write(
            dir.path().join("s3.yaml"),
            SERVICE.replace("NAME", "renamed"),
        )
        .expect("write");
        assert!(folder.scan().expect("scan"));
        assert_eq!(folder.last_parsed, 1, "one file changed, one parsed");
        let names: Vec<String> = folder
            .parsed()
            .documents
            .iter()
            .map(|d| d.metadata.name.clone())
            .collect();
        assert!(names.contains(&"renamed".to_string()));
        assert_eq!(names.len(), 20);

        std::fs::remove_file(dir.path().join("s4.yaml")).expect("remove");
        assert!(folder.scan().expect("scan"), "a removed file is a change");
        assert_eq!(folder.parsed().documents.len(), 19);
    }

    /// Watches with scan timers of an hour: only events can bring a change in time.
    fn watch_by_events_only(
        folder: Folder,
        set: ConfigSet,
        status: LoadStatus,
        last: LastGood,
    ) -> watch::Receiver<Arc<ConfigSet>> {
        let (config_tx, config_rx) = watch::channel(Arc::new(set));
        let (status_tx, _status_rx) = watch::channel(status);
        let hour = Duration::from_secs(3600);
        tokio::spawn(watch_folder(folder, last, config_tx, status_tx, hour, hour));
        config_rx
    }

    #[tokio::test]
    async fn an_edit_is_seen_by_its_event_with_no_scan_timer_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.yaml"), SERVICE.replace("NAME", "a")).expect("write");
        let (folder, set, status, last) = initial(dir.path()).expect("initial");
        let mut config_rx = watch_by_events_only(folder, set, status, last);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (i, name) in ["b", "c", "d"].into_iter().enumerate() {
            std::fs::write(
                dir.path().join(format!("{name}.yaml")),
                SERVICE.replace("NAME", name),
            )
            .expect("write");
            tokio::time::timeout(Duration::from_secs(5), config_rx.changed())
                .await
                .expect("seen by its event: no timer would scan within the hour")
                .expect("watcher alive");
            assert_eq!(config_rx.borrow_and_update().services.len(), i + 2);
        }
    }

    #[tokio::test]
    async fn a_change_between_the_first_read_and_the_watch_is_not_missed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (folder, set, status, last) = initial(dir.path()).expect("initial");
        std::fs::write(dir.path().join("a.yaml"), SERVICE.replace("NAME", "a")).expect("write");
        let mut config_rx = watch_by_events_only(folder, set, status, last);
        tokio::time::timeout(Duration::from_secs(5), config_rx.changed())
            .await
            .expect("seen at once, not at the next rescan")
            .expect("watcher alive");
        assert_eq!(config_rx.borrow().services.len(), 1);
    }

    #[test]
    fn a_file_caught_between_truncation_and_write_is_read_once_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, SERVICE.replace("NAME", "a")).expect("write");
        let mut folder = Folder::new(dir.path());
        folder.scan().expect("scan");
        // A writer that truncates, is held up for 30 ms, then writes.
        std::fs::write(&path, "").expect("truncate");
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                std::fs::write(&path, SERVICE.replace("NAME", "b")).expect("write");
            })
        };
        folder.scan_until_stable().expect("scan");
        writer.join().expect("writer");
        let names: Vec<String> = folder
            .parsed()
            .documents
            .iter()
            .map(|d| d.metadata.name.clone())
            .collect();
        assert_eq!(names, ["b"], "the empty moment never applied");
    }

    #[test]
    fn a_file_removed_between_listing_and_reading_is_a_removal_not_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, SERVICE.replace("NAME", "a")).expect("write");
        let mut folder = Folder::new(dir.path());
        folder.scan().expect("scan");
        std::fs::remove_file(&path).expect("remove");
        let vanished = folder.read(&path, None).expect("not an error");
        assert!(vanished.is_none());
        assert!(folder.scan().expect("scan"), "the removal is a change");
        assert!(folder.parsed().documents.is_empty());
    }
}
