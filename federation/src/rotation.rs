//! Root rotation with no outage, driven by the federation and kept in its state folder so
//! that it resumes where it stopped (a restart, a pause). Three phases, each advancing only
//! once every known cluster reports that it is done:
//!
//! 1. **distribute**: the bundle holds the old and the new root; done when each controller
//!    trusts the new root and every proxy it serves has reported trusting it.
//! 2. **reissue**: the new root signs. Each controller asks for a new cluster CA and
//!    controller certificate (proving itself with its current one), then tells its proxies
//!    of the new CA, and they renew at once; done when each cluster's CA chains to the new
//!    root and every proxy's certificate comes from that CA.
//! 3. **retire**: the bundle holds only the new root; done when no controller or proxy
//!    trusts anything else. The new root becomes the active one and the old one is gone:
//!    a certificate from it is refused everywhere.
//!
//! A cluster that is not connected holds the rotation where it is, and says so.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::unix_seconds;
use isthmus_core::tls::bundle::short;
use isthmus_proto::federation::{ClusterProgress, RotationStatus, TrustReport};
use serde::{Deserialize, Serialize};

use crate::registry::GlobalRegistry;
use crate::root::{Root, RootCa};

pub const STATE_FILE: &str = "rotation.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Distribute,
    Reissue,
    Retire,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Distribute => "distribute",
            Phase::Reissue => "reissue",
            Phase::Retire => "retire",
        }
    }
}

/// What is kept on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    phase: Phase,
    paused: bool,
    started_unix: u64,
    phase_since_unix: u64,
}

pub struct Rotation {
    root: Arc<Root>,
    registry: GlobalRegistry,
    path: PathBuf,
    state: Mutex<Option<State>>,
}

fn now_unix() -> u64 {
    unix_seconds(std::time::SystemTime::now())
}

impl Rotation {
    /// Resumes a rotation kept in `dir`, if any, and tells the registry the trust in force.
    pub fn load(
        root: Arc<Root>,
        registry: GlobalRegistry,
        dir: &std::path::Path,
    ) -> anyhow::Result<Arc<Self>> {
        let path = dir.join(STATE_FILE);
        let state: Option<State> = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a rotation state", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state = match state {
            // Stopped between promoting the new root and clearing the state: it is done.
            Some(s) if s.phase == Phase::Retire && root.next().is_none() => {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                tracing::info!("the root rotation had completed; its state is cleared");
                None
            }
            Some(_) if root.next().is_none() => anyhow::bail!(
                "{} says a rotation is in progress, but its new root is missing from {}",
                path.display(),
                dir.display()
            ),
            other => other,
        };
        let rotation = Arc::new(Self {
            root,
            registry,
            path,
            state: Mutex::new(state),
        });
        let state = rotation.lock().clone();
        rotation.apply(state.as_ref())?;
        if let Some(s) = &state {
            tracing::info!(
                phase = s.phase.name(),
                paused = s.paused,
                "resuming the root rotation"
            );
        }
        Ok(rotation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the roots that sign and are trusted in `state`'s phase, here and for every
    /// cluster.
    fn apply(&self, state: Option<&State>) -> anyhow::Result<()> {
        let active = self.root.active();
        let next = self.root.next();
        let (signing, roots): (Arc<RootCa>, Vec<&RootCa>) = match (state.map(|s| s.phase), &next) {
            (None, _) | (Some(_), None) => (active.clone(), vec![&active]),
            (Some(Phase::Distribute), Some(n)) => (active.clone(), vec![&active, n]),
            (Some(Phase::Reissue), Some(n)) => (n.clone(), vec![&active, n]),
            (Some(Phase::Retire), Some(n)) => (n.clone(), vec![n]),
        };
        self.root.set_trust(signing, &roots)?;
        let trust = self.root.trust();
        self.registry
            .set_trust(&trust.bundle_pem, &trust.signing.fingerprint);
        Ok(())
    }

    fn save(&self, state: &State) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).expect("a rotation state serializes");
        isthmus_core::fsutil::write_private(&self.path, &bytes)
            .with_context(|| format!("saving {}", self.path.display()))
    }

    /// Starts a rotation to `new` (or to a root created here), or resumes the one in
    /// progress when `new` is `None`.
    pub fn start(&self, new: Option<(String, String)>) -> anyhow::Result<()> {
        let mut guard = self.lock();
        if let Some(state) = guard.as_mut() {
            anyhow::ensure!(
                new.is_none(),
                "a rotation to root {} is in progress (phase {}); finish it (`isthmus root rotate` without a new root resumes it) before starting another",
                self.root
                    .next()
                    .map(|n| short(&n.fingerprint).to_owned())
                    .unwrap_or_default(),
                state.phase.name()
            );
            state.paused = false;
            self.save(state)?;
            tracing::info!(phase = state.phase.name(), "root rotation resumed");
            return Ok(());
        }
        let (root, key_pem) = match new {
            Some((cert, key)) => {
                let root = RootCa::from_pem(&cert, &key).context("the new root")?;
                (root, key)
            }
            None => RootCa::create(&self.root.trust_domain)?,
        };
        anyhow::ensure!(
            root.fingerprint != self.root.active().fingerprint,
            "the new root is the root in force"
        );
        let to = root.fingerprint.clone();
        self.root.set_next(root, &key_pem)?;
        let state = State {
            phase: Phase::Distribute,
            paused: false,
            started_unix: now_unix(),
            phase_since_unix: now_unix(),
        };
        self.save(&state)?;
        self.apply(Some(&state))?;
        *guard = Some(state);
        tracing::info!(
            from = short(&self.root.active().fingerprint),
            to = short(&to),
            "root rotation started"
        );
        Ok(())
    }

    /// Holds the rotation where it is.
    pub fn pause(&self) -> anyhow::Result<()> {
        let mut guard = self.lock();
        let state = guard.as_mut().context("no rotation is in progress")?;
        state.paused = true;
        self.save(state)?;
        tracing::info!(phase = state.phase.name(), "root rotation paused");
        Ok(())
    }

    /// Where the rotation stands, cluster by cluster.
    pub fn status(&self) -> RotationStatus {
        let state = self.lock().clone();
        let mut status = RotationStatus {
            active_root: self.root.active().fingerprint.clone(),
            ..Default::default()
        };
        let (Some(state), Some(next)) = (state, self.root.next()) else {
            return status;
        };
        status.in_progress = true;
        status.phase = state.phase.name().to_owned();
        status.paused = state.paused;
        status.started_unix = state.started_unix;
        status.phase_since_unix = state.phase_since_unix;
        status.to_root = next.fingerprint.clone();
        status.clusters = self
            .registry
            .trust_reports()
            .into_iter()
            .map(|(cluster, connected, report)| {
                progress(state.phase, &next.fingerprint, cluster, connected, report)
            })
            .collect();
        status
    }

    /// Moves to the next phase when every cluster is done with this one.
    fn step(&self) -> anyhow::Result<()> {
        let status = self.status();
        let mut guard = self.lock();
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        if state.paused || status.clusters.iter().any(|c| !c.done) {
            return Ok(());
        }
        let next = match state.phase {
            Phase::Distribute => Some(Phase::Reissue),
            Phase::Reissue => Some(Phase::Retire),
            Phase::Retire => None,
        };
        match next {
            Some(phase) => {
                let moved = State {
                    phase,
                    phase_since_unix: now_unix(),
                    ..state.clone()
                };
                self.save(&moved)?;
                self.apply(Some(&moved))?;
                tracing::info!(
                    phase = phase.name(),
                    clusters = status.clusters.len(),
                    "root rotation: next phase"
                );
                *state = moved;
            }
            None => {
                self.root.promote_next()?;
                std::fs::remove_file(&self.path)
                    .with_context(|| format!("removing {}", self.path.display()))?;
                *guard = None;
                self.apply(None)?;
                tracing::info!(
                    root = short(&self.root.active().fingerprint),
                    "root rotation complete; the old root is trusted nowhere"
                );
            }
        }
        Ok(())
    }

    /// Advances the rotation as clusters report, until the process ends.
    pub async fn run(self: Arc<Self>) {
        let changed = self.registry.trust_changed();
        loop {
            if let Err(e) = self.step() {
                tracing::warn!(error = %e, "root rotation cannot advance; retrying");
            }
            // Reports wake this at once; the timeout catches what does not report (a
            // start or resume from the operator).
            let _ = tokio::time::timeout(Duration::from_millis(500), changed.notified()).await;
        }
    }
}

/// What `phase` still waits for in one cluster.
fn progress(
    phase: Phase,
    next: &str,
    cluster: String,
    connected: bool,
    report: Option<TrustReport>,
) -> ClusterProgress {
    let mut p = ClusterProgress {
        cluster,
        connected,
        ..Default::default()
    };
    let Some(r) = report.filter(|_| connected) else {
        p.detail = "waiting for the cluster's controller to connect".into();
        return p;
    };
    p.proxies = r.proxies;
    p.lagging = r.lagging.clone();
    let trusting_next = r.trusting.get(next).copied().unwrap_or(0);
    let trusting_other = r
        .trusting
        .iter()
        .filter(|(root, _)| root.as_str() != next)
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    let waits: Vec<String> = match phase {
        Phase::Distribute => [
            (!r.controller_roots.iter().any(|c| c == next))
                .then(|| "the controller to trust the new root".to_owned()),
            (trusting_next < r.proxies).then(|| {
                format!(
                    "{} of {} proxies to trust the new root",
                    r.proxies - trusting_next,
                    r.proxies
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
        Phase::Reissue => [
            (r.ca_root != next).then(|| "a cluster CA under the new root".to_owned()),
            (r.ca_root == next && r.current_certificates < r.proxies).then(|| {
                format!(
                    "{} of {} proxies to renew under the new CA",
                    r.proxies - r.current_certificates,
                    r.proxies
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
        Phase::Retire => [
            (r.controller_roots != [next])
                .then(|| "the controller to drop the old root".to_owned()),
            (trusting_other > 0 || trusting_next < r.proxies)
                .then(|| format!("{trusting_other} proxies to drop the old root")),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    p.done = waits.is_empty();
    p.detail = if p.done {
        "done".into()
    } else {
        format!("waiting for {}", waits.join("; "))
    };
    p
}

/// The rotation's status for the federation's `/config_dump`.
pub fn dump(s: &RotationStatus) -> serde_json::Value {
    serde_json::json!({
        "active_root": s.active_root,
        "in_progress": s.in_progress,
        "phase": s.phase,
        "paused": s.paused,
        "started_unix": s.started_unix,
        "phase_since_unix": s.phase_since_unix,
        "to_root": s.to_root,
        "clusters": s.clusters.iter().map(|c| serde_json::json!({
            "cluster": c.cluster,
            "connected": c.connected,
            "done": c.done,
            "detail": c.detail,
            "proxies": c.proxies,
            "lagging": c.lagging,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        roots: &[&str],
        proxies: u32,
        trusting: &[(&str, u32)],
        ca_root: &str,
        current: u32,
    ) -> TrustReport {
        TrustReport {
            ca_fingerprint: "ca".into(),
            ca_root: ca_root.into(),
            controller_roots: roots.iter().map(|r| r.to_string()).collect(),
            proxies,
            trusting: trusting.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            current_certificates: current,
            lagging: vec![],
        }
    }

    #[test]
    fn each_phase_waits_for_the_controller_and_every_proxy_of_a_cluster() {
        let p = |phase, r, connected| progress(phase, "new", "east".into(), connected, Some(r));
        let d = p(
            Phase::Distribute,
            report(&["old", "new"], 3, &[("old", 3), ("new", 2)], "old", 3),
            true,
        );
        assert!(!d.done);
        assert!(
            d.detail.contains("1 of 3 proxies to trust the new root"),
            "{}",
            d.detail
        );
        assert!(
            p(
                Phase::Distribute,
                report(&["old", "new"], 3, &[("old", 3), ("new", 3)], "old", 3),
                true
            )
            .done
        );
        let gone = p(
            Phase::Distribute,
            report(&["old", "new"], 3, &[("new", 3)], "old", 3),
            false,
        );
        assert!(
            !gone.done && gone.detail.contains("to connect"),
            "{}",
            gone.detail
        );
        let r = p(
            Phase::Reissue,
            report(&["old", "new"], 3, &[("old", 3), ("new", 3)], "old", 3),
            true,
        );
        assert!(
            r.detail.contains("a cluster CA under the new root"),
            "{}",
            r.detail
        );
        let r = p(
            Phase::Reissue,
            report(&["old", "new"], 3, &[("old", 3), ("new", 3)], "new", 1),
            true,
        );
        assert!(r.detail.contains("2 of 3 proxies to renew"), "{}", r.detail);
        assert!(
            p(
                Phase::Reissue,
                report(&["old", "new"], 3, &[("new", 3)], "new", 3),
                true
            )
            .done
        );
        let t = p(
            Phase::Retire,
            report(&["new"], 3, &[("old", 1), ("new", 3)], "new", 3),
            true,
        );
        assert!(
            t.detail.contains("1 proxies to drop the old root"),
            "{}",
            t.detail
        );
        assert!(
            p(
                Phase::Retire,
                report(&["new"], 3, &[("new", 3)], "new", 3),
                true
            )
            .done
        );
    }

    #[test]
    fn a_rotation_stopped_after_promoting_its_root_loads_as_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::test_config(dir.path());
        let root = Arc::new(Root::load_or_create(&config).expect("root"));
        let mut metrics = prometheus_client::registry::Registry::default();
        let registry = GlobalRegistry::new(Default::default(), vec![], dir.path(), &mut metrics);
        let state = State {
            phase: Phase::Retire,
            paused: false,
            started_unix: 1,
            phase_since_unix: 2,
        };
        std::fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&state).expect("json"),
        )
        .expect("write");
        let rotation = Rotation::load(root.clone(), registry.clone(), dir.path()).expect("loads");
        assert!(!rotation.status().in_progress);
        assert!(!dir.path().join(STATE_FILE).exists());
        // In any other phase, a missing new root is an error that names the file.
        std::fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&State {
                phase: Phase::Reissue,
                ..state
            })
            .expect("json"),
        )
        .expect("write");
        let err = Rotation::load(root, registry, dir.path())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("its new root is missing"), "{err}");
    }
}
