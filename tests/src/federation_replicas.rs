//! A mesh whose federation runs as replicas (`isthmus federation --kubernetes`): they elect
//! a leader with a Lease and the leader keeps its state in a Secret, both on a stand-in
//! API server of the federation's own host cluster. The harness applies the federation's
//! ServiceAccount and RBAC from the rendered install manifests, so every call a replica
//! makes is checked against exactly what a real install grants.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use isthmus::replicas::Replicated;
use isthmus_core::identity::SYSTEM_NAMESPACE;
use isthmus_federation::Role;

use crate::apiserver::{self, ApiServer};
use crate::{ip, Mesh};

/// The port every replica listens for controllers on, each on its own address.
const FEDERATION_PORT: u16 = 15200;

impl Mesh {
    /// Replica `n`'s gRPC address: `127.B.0.<n+1>`.
    pub fn federation_replica_addr(&self, n: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(ip(self.block, 0, 1 + n as u8)), FEDERATION_PORT)
    }

    /// The stand-in API server of the federation's host cluster.
    pub fn federation_api(&self) -> &ApiServer {
        self.federation_kube
            .as_ref()
            .expect("the federation runs as replicas")
    }

    /// Starts the host cluster's API server, installs the federation's RBAC on it, and
    /// starts `self.federation_replicas` replicas, the first as the leader.
    pub(crate) async fn start_federation_replicas(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().join("federation-api");
        std::fs::create_dir_all(&dir)?;
        let api = ApiServer::start(
            IpAddr::V4(ip(self.block, 0, 9)),
            &apiserver::builtin(),
            &dir,
        )
        .await?;
        let manifests =
            isthmus_kubernetes::install::manifests(&isthmus_kubernetes::install::Options {
                federation_root: Some((String::new(), String::new())),
                ..crate::on_kubernetes::install_options("host", "", "")
            });
        let federation_rbac: Vec<_> = manifests
            .into_iter()
            .filter(|o| {
                o["kind"] == "Namespace"
                    || (o["metadata"]["labels"]["app"] == "isthmus-federation"
                        && ["ServiceAccount", "Role", "RoleBinding"]
                            .contains(&o["kind"].as_str().unwrap_or_default()))
            })
            .collect();
        crate::on_kubernetes::kubectl_apply(
            &api.client().await?,
            &isthmus_kubernetes::install::to_yaml(&federation_rbac),
        )
        .await
        .context("applying the federation's RBAC")?;
        self.federation_kube = Some(api);
        self.replicas = (0..self.federation_replicas).map(|_| None).collect();
        for n in 0..self.replicas.len() {
            self.start_federation_replica(n).await?;
            if n == 0 {
                let Role::Leading {
                    grpc_address,
                    bundle_pem,
                    ..
                } = self.wait_leading(Duration::from_secs(10)).await?.1
                else {
                    unreachable!("wait_leading returns a leader")
                };
                self.federation_addr = grpc_address;
                self.bundle_pem = bundle_pem;
            }
        }
        Ok(())
    }

    /// Starts replica `n` (again), with its own state folder and API credential
    /// (`federation-<n>` in the access log) as the federation's service account.
    pub async fn start_federation_replica(&mut self, n: usize) -> anyhow::Result<()> {
        let addr = self.federation_replica_addr(n);
        crate::wait_port_free(addr).await?;
        let kubeconfig = self.federation_api().kubeconfig_for(
            &format!("federation-{n}"),
            &format!("system:serviceaccount:{SYSTEM_NAMESPACE}:isthmus-federation"),
        )?;
        let client = isthmus_kubernetes::client(Some(&kubeconfig)).await?;
        let mut config = crate::federation_config(
            &self.federation_replica_state(n),
            addr,
            (
                self.cluster_ca_ttl,
                self.controller_cert_ttl,
                self.forget_silent_after,
            ),
        );
        config.admin_addr = SocketAddr::new(addr.ip(), 15014);
        let lease = isthmus_kubernetes::lease::LeaseConfig {
            name: isthmus::replicas::LEASE.into(),
            ..crate::test_lease(&format!("federation-{n}"))
        };
        self.replicas[n] = Some(Replicated::start(config, client, lease));
        Ok(())
    }

    /// Replica `n`'s state folder (replica 0's is `fed_state`, where tokens are minted).
    pub fn federation_replica_state(&self, n: usize) -> std::path::PathBuf {
        match n {
            0 => self.fed_state.clone(),
            n => self.dir.path().join(format!("federation-{n}")),
        }
    }

    /// Stops replica `n` as if its host died: no drain, the Lease left to expire.
    pub fn kill_federation_replica(&mut self, n: usize) {
        if let Some(r) = self.replicas[n].take() {
            r.abort();
        }
    }

    /// Replica `n`'s role now.
    pub fn federation_replica_role(&self, n: usize) -> Option<Role> {
        self.replicas[n].as_ref().map(|r| r.role().borrow().clone())
    }

    /// Waits until some running replica leads; returns which, and its role.
    pub async fn wait_leading(&self, within: Duration) -> anyhow::Result<(usize, Role)> {
        crate::eventually("a federation replica to lead", within, || async {
            (0..self.replicas.len())
                .find_map(|n| match self.federation_replica_role(n) {
                    Some(r @ Role::Leading { .. }) => Some((n, r)),
                    _ => None,
                })
                .context("no replica leads")
        })
        .await
    }
}
