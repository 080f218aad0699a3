//! The federation as several replicas, so that it survives losing its host.
//!
//! The replicas elect a leader outside this module (a Kubernetes Lease: `leader` says
//! whether this replica holds it). Only the leader serves: the others bind no gRPC
//! listener, so controllers given every replica's address (or a Service whose endpoints
//! are the ready pods) reach the leader, and their admin listener answers `/ready` with
//! 503 and names the role.
//!
//! The leader mirrors its state folder into a [`StateStore`] every replica reaches: the
//! root CA (and the next one during a rotation), the join-token key, the rotation's state
//! and the last exports of every cluster. It saves within [`MIRROR_INTERVAL`] of a file
//! changing (the exports are themselves written at most every 100 ms), so a replica that
//! takes over starts from at most a few hundred milliseconds behind; a controller that
//! reconnects sends its whole export set again, which fills in anything newer.
//!
//! A standby copies the store into its own folder every [`STANDBY_REFRESH`], so the
//! operator commands that read the folder's keys work on whichever replica they run.
//!
//! Taking over: restore the folder from the store (replacing whatever this replica kept
//! from an earlier term), then start the federation on it; the last registry is served at
//! once, each cluster's entries marked stale until its controller reports.
//!
//! Split brain: a leader that loses the Lease stops serving at once. A save is a
//! compare-and-swap, so a leader that lost the Lease without noticing (paused, or cut
//! from the API server) finds out at its next save and stops too; it never overwrites the
//! state of the replica that took over.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_core::admin::{unix_seconds, Admin, AdminServer};
use isthmus_core::readiness::Readiness;
use isthmus_core::state_store::{Files, SaveError, StateStore};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::{build, root, rotation, Bound, Config};

/// How often the leader looks for changed state files.
pub const MIRROR_INTERVAL: Duration = Duration::from_millis(100);

/// How often a standby copies the store's state into its folder.
const STANDBY_REFRESH: Duration = Duration::from_secs(2);

/// How long a leader that found another replica's save in the store waits for the
/// election to say it lost before it takes over again (a lease's default duration).
const SUPERSEDED_WAIT: Duration = Duration::from_secs(15);

/// The files of the state folder that are mirrored, in the order they are written.
const MIRRORED: &[&str] = &[
    root::ROOT_CERT,
    root::ROOT_KEY,
    root::TOKEN_KEY,
    root::NEXT_CERT,
    root::NEXT_KEY,
    rotation::STATE_FILE,
    crate::registry::STATE_FILE,
];

/// What this replica does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Standby,
    Leading {
        grpc_address: std::net::SocketAddr,
        admin_address: std::net::SocketAddr,
        /// PEM roots the clusters trust.
        bundle_pem: String,
    },
}

/// This replica as its dump and metrics show it.
#[derive(Debug)]
pub struct ReplicaView {
    identity: String,
    store: String,
    state: Mutex<ViewState>,
    leading: Gauge,
    saved_bytes: Gauge,
    last_saved: Gauge,
    save_failures: Counter,
}

#[derive(Debug, Default)]
struct ViewState {
    leading_since_unix: Option<u64>,
    last_saved_unix: Option<u64>,
    last_error: Option<String>,
}

impl ReplicaView {
    fn new(identity: &str, store: String) -> Self {
        Self {
            identity: identity.to_owned(),
            store,
            state: Mutex::default(),
            leading: Gauge::default(),
            saved_bytes: Gauge::default(),
            last_saved: Gauge::default(),
            save_failures: Counter::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_leading(&self, leading: bool) {
        self.leading.set(i64::from(leading));
        self.lock().leading_since_unix = leading.then(|| unix_seconds(SystemTime::now()));
    }

    fn saved(&self, bytes: usize) {
        let now = unix_seconds(SystemTime::now());
        self.saved_bytes.set(bytes as i64);
        self.last_saved.set(now as i64);
        let mut s = self.lock();
        s.last_saved_unix = Some(now);
        s.last_error = None;
    }

    fn failed(&self, error: &SaveError) {
        self.save_failures.inc();
        self.lock().last_error = Some(error.to_string());
    }

    pub(crate) fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "leading",
            "1 while this replica leads and serves",
            self.leading.clone(),
        );
        registry.register(
            "state_bytes",
            "bytes of state last saved for the other replicas",
            self.saved_bytes.clone(),
        );
        registry.register(
            "state_saved_timestamp_seconds",
            "when the state was last saved for the other replicas",
            self.last_saved.clone(),
        );
        registry.register(
            "state_save_failures",
            "saves of the state that failed (the store unreachable, or the state too large)",
            self.save_failures.clone(),
        );
    }

    pub(crate) fn dump(&self) -> serde_json::Value {
        let s = self.lock();
        serde_json::json!({
            "identity": self.identity,
            "role": if s.leading_since_unix.is_some() { "leading" } else { "standby" },
            "leading_since_unix": s.leading_since_unix,
            "store": self.store,
            "state_saved_unix": s.last_saved_unix,
            "state_bytes": self.saved_bytes.get(),
            "state_save_error": s.last_error,
        })
    }
}

/// A running replica.
pub struct Replica {
    role: watch::Receiver<Role>,
    stop: watch::Sender<Option<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Runs a replica named `identity` that leads while `leader` says so, with its state
    /// mirrored into `store`.
    pub fn start<S: StateStore>(
        mut config: Config,
        identity: &str,
        store: S,
        leader: watch::Receiver<bool>,
    ) -> Self {
        let view = Arc::new(ReplicaView::new(identity, store.describe()));
        config.replica = Some(view.clone());
        let (role_tx, role) = watch::channel(Role::Standby);
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(run(config, store, leader, role_tx, stop_rx, view));
        Self { role, stop, task }
    }

    /// What this replica does, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Stops at once, as if the process died: no drain, no last save.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stops: a leader drains its streams until `deadline`, keeps its exports on disk and
    /// saves its state a last time for the replica that takes over.
    pub async fn shutdown(self, deadline: Duration) {
        self.stop.send_replace(Some(deadline));
        let _ = self.task.await;
    }
}

/// How a term as leader ended.
enum Ended {
    LostLease,
    Superseded(SaveError),
    Failed(anyhow::Error),
    Stopped(Duration),
}

async fn run<S: StateStore>(
    config: Config,
    store: S,
    mut leader: watch::Receiver<bool>,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<Option<Duration>>,
    view: Arc<ReplicaView>,
) {
    loop {
        role.send_replace(Role::Standby);
        view.set_leading(false);
        let standby = standby_admin(&config, &view).await;
        // A standby keeps its folder a copy of the store's, so the operator commands that
        // read it (join tokens, `root rotate`, `cluster remove`) work on any replica.
        let mut held: Option<Files> = None;
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            if let Err(e) = follow(&config, &store, &mut held).await {
                tracing::warn!(error = %format!("{e:#}"), "standby: cannot copy the state from the store");
            }
            tokio::select! {
                r = leader.changed() => if r.is_err() {
                    tracing::error!("the leader election stopped; this replica stops too");
                    return;
                },
                _ = stop.changed() => return,
                _ = tokio::time::sleep(STANDBY_REFRESH) => {}
            }
        }
        if let Some(admin) = standby {
            admin.abort();
        }
        let Some((mut bound, restored)) = take_over(&config, &store, &mut leader).await else {
            continue;
        };
        tracing::info!(grpc = %bound.grpc_address, store = %store.describe(), "leading: serving the state restored from the store");
        view.set_leading(true);
        role.send_replace(Role::Leading {
            grpc_address: bound.grpc_address,
            admin_address: bound.admin_address,
            bundle_pem: bound.bundle_pem.clone(),
        });
        let mut mirror = Mirror::new(&store, &config.state_dir, restored, &view);
        let ended = tokio::select! {
            r = leader.wait_for(|l| !*l) => match r {
                Ok(_) => Ended::LostLease,
                Err(_) => Ended::Failed(anyhow::anyhow!("the leader election stopped")),
            },
            e = mirror.run() => Ended::Superseded(e),
            r = bound.wait_termination() => Ended::Failed(r.err().unwrap_or_else(|| anyhow::anyhow!("stopped"))),
            _ = stop.changed() => Ended::Stopped(stop.borrow().unwrap_or_default()),
        };
        match ended {
            Ended::Stopped(deadline) => {
                bound.shutdown(deadline).await;
                match mirror.pass().await {
                    Ok(()) => tracing::info!("state saved for the replica that takes over"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save the state a last time; the next leader starts from the last save")
                    }
                }
                return;
            }
            Ended::LostLease => {
                tracing::warn!(
                    "lost the lease; stopping at once so that only the new leader serves"
                )
            }
            Ended::Superseded(e) => {
                tracing::error!(error = %e, "another replica leads; stopping at once");
                bound.abort();
                role.send_replace(Role::Standby);
                view.set_leading(false);
                // The election has not told this replica yet: wait until it does, or for
                // as long as a lease holds, before taking over again from the store.
                let _ = tokio::time::timeout(SUPERSEDED_WAIT, leader.wait_for(|l| !*l)).await;
                continue;
            }
            Ended::Failed(e) => tracing::error!(error = %e, "the federation stopped; standing by"),
        }
        bound.abort();
        // Let the lease say who leads before trying again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A standby's admin listener: `/ready` is 503 and the dump names the role.
async fn standby_admin(
    config: &Config,
    view: &Arc<ReplicaView>,
) -> Option<isthmus_core::drain::Running> {
    let mut registry = prometheus_client::registry::Registry::with_prefix("isthmus_federation");
    view.register(registry.sub_registry_with_prefix("replica"));
    let readiness = Readiness::default();
    let blocked = readiness.register("standby: another replica leads");
    let dump_view = view.clone();
    let admin = Admin {
        registry: Arc::new(registry),
        readiness,
        dump: Arc::new(move || serde_json::json!({"replica": dump_view.dump()})),
        logging: None,
        explain: None,
    };
    let server =
        bind_retrying(|| AdminServer::bind(config.admin_addr, config.metrics_addr, admin.clone()))
            .await;
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(admin = %config.admin_addr, error = %e, "standby: no admin listener");
            return None;
        }
    };
    let (mut running, drain) = isthmus_core::drain::Running::new();
    running.spawn(async move {
        let _blocked = blocked;
        server.run(drain).await
    });
    Some(running)
}

/// Binds, retrying for a moment while a listener this process just closed still holds
/// the address.
async fn bind_retrying<T, F, Fut>(mut bind: F) -> std::io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let mut tries = 0;
    loop {
        match bind().await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

/// Restores the state folder from the store and starts the federation on it, retrying
/// while this replica leads; `None` once it does not.
async fn take_over<S: StateStore>(
    config: &Config,
    store: &S,
    leader: &mut watch::Receiver<bool>,
) -> Option<(Bound, Files)> {
    loop {
        if !*leader.borrow_and_update() {
            return None;
        }
        match restore(config, store).await {
            Ok(files) => match build(config.clone()).await {
                Ok(bound) => return Some((bound, files)),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot start serving; retrying")
                }
            },
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot restore the state; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = leader.changed() => {}
        }
    }
}

/// Writes the store's files into the state folder (removing mirrored files it lacks);
/// returns what the store held. With an empty store (the first leader ever), the folder
/// is kept as it is.
async fn restore<S: StateStore>(config: &Config, store: &S) -> anyhow::Result<Files> {
    let Some(files) = store.load().await? else {
        tracing::info!(store = %store.describe(), "no state saved yet: starting from the local state folder");
        return Ok(Files::new());
    };
    write_state(config, store, &files).await?;
    tracing::info!(store = %store.describe(), files = files.len(), "state folder restored");
    Ok(files)
}

/// A standby's copy of the store: written into the folder when it changed since `held`.
async fn follow<S: StateStore>(
    config: &Config,
    store: &S,
    held: &mut Option<Files>,
) -> anyhow::Result<()> {
    let Some(files) = store.load().await? else {
        return Ok(());
    };
    if held.as_ref() != Some(&files) {
        write_state(config, store, &files).await?;
        tracing::debug!(
            files = files.len(),
            "standby: state folder follows the store"
        );
        *held = Some(files);
    }
    Ok(())
}

/// Makes the mirrored files of the state folder what `files` holds (removing those it
/// lacks); a state without a root is refused.
async fn write_state<S: StateStore>(
    config: &Config,
    store: &S,
    files: &Files,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        files.contains_key(root::ROOT_CERT) && files.contains_key(root::ROOT_KEY),
        "{} holds no root CA ({} and {}); refusing to start with a new root that no cluster trusts",
        store.describe(),
        root::ROOT_CERT,
        root::ROOT_KEY
    );
    let dir = config.state_dir.clone();
    let kept = files.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::create_dir_all(&dir)?;
        for name in MIRRORED {
            let path = dir.join(name);
            match kept.get(*name) {
                Some(bytes) => isthmus_core::fsutil::write_private(&path, bytes)?,
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                },
            }
        }
        Ok(())
    })
    .await?
}

/// Saves the state folder into the store whenever a mirrored file changes.
struct Mirror<'a, S> {
    store: &'a S,
    dir: &'a Path,
    /// What the store holds, as far as this replica knows.
    saved: Files,
    /// Length and modification time of each file at the last look.
    seen: Vec<(u64, Option<SystemTime>)>,
    view: &'a ReplicaView,
}

impl<'a, S: StateStore> Mirror<'a, S> {
    fn new(store: &'a S, dir: &'a Path, saved: Files, view: &'a ReplicaView) -> Self {
        Self {
            store,
            dir,
            saved,
            seen: Vec::new(),
            view,
        }
    }

    /// Runs until another replica is found to have saved.
    async fn run(&mut self) -> SaveError {
        let mut too_large_said = false;
        loop {
            match self.pass().await {
                Ok(()) => too_large_said = false,
                Err(e @ SaveError::Conflict { .. }) => return e,
                Err(e @ SaveError::TooLarge { .. }) => {
                    if !too_large_said {
                        tracing::error!(error = %e, "the exports are saved for the other replicas only as they last fitted; a replica that takes over gets the rest when each controller reports");
                        too_large_said = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the state for the other replicas; retrying")
                }
            }
            tokio::time::sleep(MIRROR_INTERVAL).await;
        }
    }

    /// Saves the folder if it changed since the last save.
    async fn pass(&mut self) -> Result<(), SaveError> {
        let dir = self.dir.to_owned();
        let seen = tokio::task::spawn_blocking(move || {
            MIRRORED
                .iter()
                .map(|name| match std::fs::metadata(dir.join(name)) {
                    Ok(m) => (m.len(), m.modified().ok()),
                    Err(_) => (0, None),
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| SaveError::Failed(e.into()))?;
        if seen == self.seen {
            return Ok(());
        }
        let dir = self.dir.to_owned();
        let files = tokio::task::spawn_blocking(move || read_state(&dir))
            .await
            .map_err(|e| SaveError::Failed(e.into()))?
            .map_err(|e| SaveError::Failed(e.into()))?;
        if files == self.saved {
            self.seen = seen;
            return Ok(());
        }
        let (files, too_large) = match self.store.save(&files).await {
            Ok(()) => (files, None),
            Err(e @ SaveError::TooLarge { .. }) => {
                // The root, the keys and the rotation must reach the store whatever the
                // exports weigh: save them with the last exports that fit. A replica
                // taking over starts from those, and controllers fill in the rest.
                let mut kept = files;
                let exports = crate::registry::STATE_FILE;
                match self.saved.get(exports) {
                    Some(old) => kept.insert(exports.to_owned(), old.clone()),
                    None => kept.remove(exports),
                };
                if kept != self.saved {
                    if let Err(e) = self.store.save(&kept).await {
                        self.view.failed(&e);
                        return Err(e);
                    }
                }
                (kept, Some(e))
            }
            Err(e) => {
                self.view.failed(&e);
                return Err(e);
            }
        };
        self.view.saved(files.values().map(Vec::len).sum());
        self.saved = files;
        // A state too large is tried again when a file changes, not at every look.
        self.seen = seen;
        match too_large {
            Some(e) => {
                self.view.failed(&e);
                Err(e)
            }
            None => Ok(()),
        }
    }
}

/// The mirrored files present in `dir`.
fn read_state(dir: &Path) -> std::io::Result<Files> {
    let mut files = Files::new();
    for name in MIRRORED {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => {
                files.insert((*name).to_owned(), bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in memory, with the compare-and-swap of the real ones: a save fails if
    /// anyone saved since this handle last loaded or saved.
    #[derive(Clone, Default)]
    struct Shared {
        state: Arc<Mutex<(u64, Option<Files>)>>,
        seen: Arc<Mutex<u64>>,
        /// Bytes it holds at most, when limited.
        limit: Option<usize>,
    }

    impl Shared {
        /// Another handle on the same store, as another replica has.
        fn handle(&self) -> Self {
            Self {
                state: self.state.clone(),
                seen: Arc::default(),
                limit: self.limit,
            }
        }

        fn files(&self) -> Option<Files> {
            self.state.lock().expect("lock").1.clone()
        }
    }

    impl StateStore for Shared {
        fn describe(&self) -> String {
            "memory".into()
        }

        async fn load(&self) -> anyhow::Result<Option<Files>> {
            let state = self.state.lock().expect("lock");
            *self.seen.lock().expect("lock") = state.0;
            Ok(state.1.clone())
        }

        async fn save(&self, files: &Files) -> Result<(), SaveError> {
            let size = files.values().map(Vec::len).sum();
            if let Some(limit) = self.limit.filter(|l| size > *l) {
                return Err(SaveError::TooLarge {
                    size,
                    limit,
                    store: self.describe(),
                });
            }
            let mut state = self.state.lock().expect("lock");
            let mut seen = self.seen.lock().expect("lock");
            if state.0 != *seen {
                return Err(SaveError::Conflict {
                    store: self.describe(),
                });
            }
            state.0 += 1;
            state.1 = Some(files.clone());
            *seen = state.0;
            Ok(())
        }
    }

    /// Starts a replica named `name` on `dir` that the election says leads, and waits
    /// until it does; returns it, its role, and the election's side (dropping it ends
    /// the replica's term).
    async fn leader(
        dir: &std::path::Path,
        name: &str,
        store: &Shared,
    ) -> (Replica, Role, watch::Sender<bool>) {
        let (lead, leading) = watch::channel(true);
        let replica = Replica::start(crate::test_config(dir), name, store.handle(), leading);
        let mut role = replica.role();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            role.wait_for(|r| matches!(r, Role::Leading { .. })),
        )
        .await
        .expect("leads within 10 s")
        .expect("replica running")
        .clone();
        (replica, r, lead)
    }

    /// Waits up to 5 s for `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(MIRROR_INTERVAL).await;
        }
    }

    #[tokio::test]
    async fn a_replica_that_takes_over_serves_with_the_root_and_keys_the_leader_saved() {
        let (a_dir, b_dir) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let store = Shared::default();
        let (a, Role::Leading { bundle_pem, .. }, a_lead) = leader(a_dir.path(), "a", &store).await
        else {
            unreachable!()
        };
        // The first leader ever created the root; the store holds it once mirrored.
        until("state saved", || {
            store
                .files()
                .is_some_and(|f| f.contains_key(root::TOKEN_KEY))
        })
        .await;
        a.abort();
        drop(a_lead);
        let (
            b,
            Role::Leading {
                bundle_pem: b_bundle,
                ..
            },
            _b_lead,
        ) = leader(b_dir.path(), "b", &store).await
        else {
            unreachable!()
        };
        assert_eq!(b_bundle, bundle_pem, "the same root, not a new one");
        for name in [root::ROOT_KEY, root::TOKEN_KEY] {
            assert_eq!(
                std::fs::read(b_dir.path().join(name)).expect("restored"),
                std::fs::read(a_dir.path().join(name)).expect("kept"),
                "{name}"
            );
        }
        b.abort();
    }

    #[tokio::test]
    async fn a_leader_that_finds_another_replicas_save_stops_serving() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Shared::default();
        let (a, Role::Leading { grpc_address, .. }, _lead) = leader(dir.path(), "a", &store).await
        else {
            unreachable!()
        };
        // Another replica saves (it believes it leads), then a file of this one changes.
        let other = store.handle();
        other.load().await.expect("load");
        other.save(&Files::new()).await.expect("save");
        std::fs::write(dir.path().join(rotation::STATE_FILE), b"{}").expect("write");
        let mut role = a.role();
        tokio::time::timeout(
            Duration::from_secs(5),
            role.wait_for(|r| *r == Role::Standby),
        )
        .await
        .expect("steps down within 5 s")
        .expect("running");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(grpc_address).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "stops listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(store.files(), Some(Files::new()), "the other's save stands");
        a.abort();
    }

    #[tokio::test]
    async fn a_saved_state_without_a_root_is_refused_rather_than_replaced_by_a_new_root() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Shared::default();
        let seed = store.handle();
        seed.load().await.expect("load");
        seed.save(&[(crate::registry::STATE_FILE.to_owned(), vec![])].into())
            .await
            .expect("save");
        let (_lead, leading_rx) = watch::channel(true);
        let a = Replica::start(
            crate::test_config(dir.path()),
            "a",
            store.handle(),
            leading_rx,
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(*a.role().borrow(), Role::Standby);
        assert!(!dir.path().join(root::ROOT_CERT).exists(), "no new root");
        a.abort();
    }

    #[tokio::test]
    async fn exports_too_large_for_the_store_never_hold_back_the_keys_and_rotation() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Shared {
            limit: Some(16 * 1024),
            ..Shared::default()
        };
        let (a, Role::Leading { admin_address, .. }, _lead) = leader(dir.path(), "a", &store).await
        else {
            unreachable!()
        };
        let saved = |name: &'static str, want: Option<Vec<u8>>| {
            let store = store.clone();
            async move {
                until(&format!("{name} saved as expected"), || {
                    store.files().and_then(|f| f.get(name).cloned()) == want
                })
                .await
            }
        };
        saved(
            root::TOKEN_KEY,
            std::fs::read(dir.path().join(root::TOKEN_KEY)).ok(),
        )
        .await;
        let registry = crate::registry::STATE_FILE;
        std::fs::write(dir.path().join(registry), b"small").expect("write");
        saved(registry, Some(b"small".to_vec())).await;
        // Exports grow past what the store holds; then the rotation's state changes.
        std::fs::write(dir.path().join(registry), vec![7u8; 32 * 1024]).expect("write");
        tokio::time::sleep(4 * MIRROR_INTERVAL).await;
        std::fs::write(dir.path().join(rotation::STATE_FILE), b"{}").expect("write");
        saved(rotation::STATE_FILE, Some(b"{}".to_vec())).await;
        // Saved with the last exports that fitted, and the dump says why.
        saved(registry, Some(b"small".to_vec())).await;
        let dump = a.role().borrow().clone();
        assert!(matches!(dump, Role::Leading { .. }), "still leading");
        let body = admin_dump(admin_address).await;
        assert!(body.contains("holds at most 16384"), "{body}");
        a.abort();
    }

    /// The admin listener's `/config_dump`, as text.
    async fn admin_dump(admin: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(admin)
            .await
            .expect("connect");
        tcp.write_all(b"GET /config_dump HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        out
    }
}
