//! The operator's commands against the federation, over its gRPC listener with an
//! operator token minted from its state folder:
//! - `isthmus root rotate` / `root status`: the federation drives the rotation and keeps it
//!   in its state folder (see the federation's `rotation` module); this starts, pauses or
//!   resumes it and follows its progress cluster by cluster;
//! - `isthmus cluster remove`: a cluster leaves the federation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::tls::bundle::short;
use isthmus_core::tls::{anonymous_client_config, PeerPolicy};
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::rotate_request::Action;
use isthmus_proto::federation::{
    RemoveClusterRequest, RemoveClusterResponse, RotateRequest, RotationStatus,
};

/// Where the federation is and how to prove the right to operate it.
pub struct Operator {
    pub federation: SocketAddr,
    pub state_dir: PathBuf,
    pub trust_domain: String,
}

/// What to ask of the rotation.
pub enum Ask {
    Status,
    Pause,
    /// Start (to the root given as certificate and key PEM files, or to a new one) or
    /// resume.
    Start(Option<(PathBuf, PathBuf)>),
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl Operator {
    /// The federation's roots as its state folder holds them (the next one too, while a
    /// rotation runs), to check the federation's certificate.
    fn roots(&self) -> anyhow::Result<String> {
        let mut pem = read(&self.state_dir.join("root-cert.pem"))?;
        if let Ok(next) = std::fs::read_to_string(self.state_dir.join("root-next-cert.pem")) {
            pem.push_str(&next);
        }
        Ok(pem)
    }

    /// A client of the federation, and the operator token for a request.
    fn client(&self) -> anyhow::Result<(FederationClient<tonic::transport::Channel>, String)> {
        let token = isthmus_federation::mint_operator_token(&self.state_dir)?;
        let federation = SpiffeId::new(&self.trust_domain, SYSTEM_NAMESPACE, "isthmus-federation");
        let tls = anonymous_client_config(&self.roots()?, PeerPolicy::OneOf(vec![federation]))?;
        let channel = isthmus_core::grpc::tls_channel(self.federation, tls);
        Ok((FederationClient::new(channel), format!("Bearer {token}")))
    }

    /// Removes `cluster` from the federation; its certificates are refused after `drain`.
    pub async fn remove_cluster(
        &self,
        cluster: &str,
        drain: Duration,
    ) -> anyhow::Result<RemoveClusterResponse> {
        let (mut client, bearer) = self.client()?;
        let mut req = tonic::Request::new(RemoveClusterRequest {
            cluster: cluster.to_owned(),
            drain_seconds: u32::try_from(drain.as_secs()).context("drain too long")?,
        });
        req.metadata_mut().insert("authorization", bearer.parse()?);
        req.set_timeout(Duration::from_secs(10));
        let resp = client.remove_cluster(req).await.map_err(|s| {
            anyhow::anyhow!("the federation at {}: {}", self.federation, s.message())
        })?;
        Ok(resp.into_inner())
    }

    /// Sends one request and returns the rotation's status.
    pub async fn ask(&self, ask: &Ask) -> anyhow::Result<RotationStatus> {
        let (mut client, bearer) = self.client()?;
        let mut body = RotateRequest::default();
        match ask {
            Ask::Status => body.set_action(Action::Status),
            Ask::Pause => body.set_action(Action::Pause),
            Ask::Start(new) => {
                body.set_action(Action::Start);
                if let Some((cert, key)) = new {
                    body.new_root_cert_pem = read(cert)?;
                    body.new_root_key_pem = read(key)?;
                }
            }
        }
        let mut req = tonic::Request::new(body);
        req.metadata_mut().insert("authorization", bearer.parse()?);
        req.set_timeout(Duration::from_secs(10));
        let status = client.rotate(req).await.map_err(|s| {
            anyhow::anyhow!("the federation at {}: {}", self.federation, s.message())
        })?;
        Ok(status.into_inner())
    }

    /// Asks, then (unless pausing or only reading) follows the rotation until it completes,
    /// printing each change of its status, or until `timeout`.
    pub async fn rotate(&self, ask: Ask, follow: bool, timeout: Duration) -> anyhow::Result<()> {
        let mut status = self.ask(&ask).await?;
        let mut shown = render(&status, SystemTime::now());
        print!("{shown}");
        if !follow || matches!(ask, Ask::Pause) {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        while status.in_progress && !status.paused {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the rotation has not completed in {timeout:?}; it goes on in the federation (`isthmus root status` shows where it stands)"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            status = match self.ask(&Ask::Status).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e:#}; retrying");
                    continue;
                }
            };
            let now = render(&status, SystemTime::now());
            if strip_ages(&now) != strip_ages(&shown) {
                print!("{now}");
                shown = now;
            }
        }
        if !status.in_progress {
            println!(
                "root rotation complete: root {} is the only one trusted",
                short(&status.active_root)
            );
        }
        Ok(())
    }
}

/// A status without its ages, to print only what changed.
fn strip_ages(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("root rotation"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ago(unix: u64, now: SystemTime) -> String {
    let now = isthmus_core::admin::unix_seconds(now);
    format!("{}s ago", now.saturating_sub(unix))
}

/// The status as people read it: the phase, then each cluster and what it waits for.
pub fn render(s: &RotationStatus, now: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !s.in_progress {
        let _ = writeln!(
            out,
            "no root rotation in progress; root {} in force",
            short(&s.active_root)
        );
        return out;
    }
    let _ = writeln!(
        out,
        "root rotation {} -> {}: phase {}{} (since {}, started {})",
        short(&s.active_root),
        short(&s.to_root),
        s.phase,
        if s.paused { ", PAUSED" } else { "" },
        ago(s.phase_since_unix, now),
        ago(s.started_unix, now),
    );
    let width = s
        .clusters
        .iter()
        .map(|c| c.cluster.len())
        .max()
        .unwrap_or(0);
    for c in &s.clusters {
        let _ = writeln!(
            out,
            "  {:width$}  {:>3} proxies  {}",
            c.cluster, c.proxies, c.detail
        );
        for l in &c.lagging {
            let _ = writeln!(out, "  {:width$}    {l}", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::federation::ClusterProgress;

    #[test]
    fn the_status_names_the_phase_and_what_each_cluster_waits_for() {
        let s = RotationStatus {
            active_root: "aaaaaaaaaaaaaaaa".into(),
            in_progress: true,
            phase: "reissue".into(),
            paused: true,
            started_unix: 100,
            phase_since_unix: 150,
            to_root: "bbbbbbbbbbbbbbbb".into(),
            clusters: vec![
                ClusterProgress {
                    cluster: "east".into(),
                    connected: true,
                    done: true,
                    detail: "done".into(),
                    proxies: 3,
                    lagging: vec![],
                },
                ClusterProgress {
                    cluster: "west".into(),
                    connected: true,
                    done: false,
                    detail: "waiting for 1 of 2 proxies to renew under the new CA".into(),
                    proxies: 2,
                    lagging: vec!["demo/a (sidecar): certificate from CA cccccccccccc".into()],
                },
            ],
        };
        let text = render(&s, SystemTime::UNIX_EPOCH + Duration::from_secs(160));
        assert!(text.starts_with("root rotation aaaaaaaaaaaa -> bbbbbbbbbbbb: phase reissue, PAUSED (since 10s ago, started 60s ago)"), "{text}");
        assert!(
            text.contains("west    2 proxies  waiting for 1 of 2 proxies"),
            "{text}"
        );
        assert!(
            text.contains("demo/a (sidecar): certificate from CA"),
            "{text}"
        );
        let idle = RotationStatus {
            active_root: "aaaaaaaaaaaaaaaa".into(),
            ..Default::default()
        };
        assert_eq!(
            render(&idle, SystemTime::now()),
            "no root rotation in progress; root aaaaaaaaaaaa in force\n"
        );
    }
}
