//! Integration harness: starts a federation and whole clusters (controller, gateway,
//! workloads of sample app + sidecar) in this process on loopback. Each simulated pod gets
//! its own address `127.B.C.W` (B: this test, C: cluster, W: workload), so the same ports
//! repeat per workload as in real pods, and tests running side by side never collide.
//!
//! Components are the real ones (`build` of each crate), talking over real sockets with real
//! mTLS and QUIC; "killing" a component aborts all its tasks, which closes its sockets as a
//! dead process would.

pub mod apiserver;
mod federation_replicas;
mod on_kubernetes;
pub mod otlp;
pub mod plugins;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
pub use isthmus::client::{AppClient, Reply};
pub use isthmus::traffic::Traffic;
use isthmus_core::config::NamespacedName;
use isthmus_core::locality::Locality;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const NAMESPACE: &str = "demo";
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Where the sample app (or a test's own app) listens on its workload's address.
pub const APP_PORT: u16 = 8080;
/// Where the sample app echoes plain TCP, and the service's `tcp-echo` port.
pub const TCP_ECHO_PORT: u16 = 7000;

static NEXT_BLOCK: AtomicU32 = AtomicU32::new(0);

/// The second octet for one mesh: distinct for the first 240 meshes of this process (the
/// sum is taken in u32, so no two of them meet by 8-bit wrap-around), and spread by process
/// id across test binaries running at once.
fn next_block() -> u8 {
    let n = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed);
    let base = (std::process::id() % 20) * 12;
    10 + ((base + n) % 240) as u8
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Waits until `check` passes, or fails with its last error after `timeout`.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("timed out waiting for {what}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Where each cluster of a test mesh sits.
pub fn locality_of(cluster: &str) -> Locality {
    match cluster {
        "east" => Locality::new("us-east", "zone-a", ""),
        "west" => Locality::new("us-west", "zone-a", ""),
        "eu" => Locality::new("eu-central", "zone-a", ""),
        other => Locality::new(other, "zone-a", ""),
    }
}

pub struct Workload {
    pub name: String,
    pub ip: Ipv4Addr,
    pub app: Option<isthmus::echo::Bound>,
    /// An app the test runs itself, in place of the sample app.
    pub own_app: Option<SocketAddr>,
    pub sidecar: Option<isthmus_sidecar::Bound>,
    pub service_account: String,
}

impl Workload {
    /// The sidecar's outbound listener, where the app sends its requests.
    pub fn outbound(&self) -> SocketAddr {
        self.sidecar
            .as_ref()
            .expect("sidecar running")
            .outbound_address
    }

    /// The sidecar's admin listener (`/stats/prometheus`, `/config_dump`).
    pub fn admin(&self) -> SocketAddr {
        self.sidecar
            .as_ref()
            .expect("sidecar running")
            .admin_address
    }
}

pub struct Cluster {
    pub name: String,
    pub index: u8,
    block: u8,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub controller: Option<isthmus_controller::Bound>,
    controller_addr: SocketAddr,
    pub gateway: Option<isthmus_gateway::Bound>,
    pub workloads: BTreeMap<String, Workload>,
    next_workload: u8,
    /// Limits and timeouts of the sidecars started from now on.
    pub limits: isthmus_sidecar::ingress::Limits,
    /// The cluster's stand-in Kubernetes API server, when its controller reads one instead
    /// of the config folder.
    pub kube: Option<apiserver::ApiServer>,
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub federation: Option<isthmus_federation::Bound>,
    pub federation_addr: SocketAddr,
    pub bundle_pem: String,
    pub fed_state: PathBuf,
    pub clusters: BTreeMap<String, Cluster>,
    /// This mesh's block of loopback addresses (`127.B.C.W`-style, see `ip`).
    block: u8,
    /// Lifetime of workload certificates the controllers issue.
    pub cert_ttl: Duration,
    /// Lifetime of the cluster CAs and controller certificates the federation signs
    /// (set before it starts, with `start_configured`).
    pub cluster_ca_ttl: Duration,
    pub controller_cert_ttl: Duration,
    /// The federation's `--forget-silent-after`.
    pub forget_silent_after: Option<Duration>,
    /// Addresses every controller is given before the federation's own (to test a
    /// controller given several, some of them dead).
    pub federation_addrs_before: Vec<SocketAddr>,
    /// Run the federation as this many replicas electing a leader (0: one federation, no
    /// election), set before it starts.
    pub federation_replicas: usize,
    /// The replicas, when the federation runs as such; `None` for one stopped.
    pub replicas: Vec<Option<isthmus::replicas::Replicated>>,
    /// The API server of the federation's host cluster, with replicas.
    pub federation_kube: Option<apiserver::ApiServer>,
    /// How often controllers (started from now on) fetch JWT issuers' keys again.
    pub jwks_refresh: Duration,
    /// Extra roots controllers (started from now on) trust for HTTPS key fetches.
    pub jwks_roots_pem: Option<String>,
    /// OTLP export and access logs of the sidecars and gateways started from now on.
    pub telemetry: isthmus_core::otlp::TelemetryConfig,
}

/// A loopback address of a block no other mesh of this process uses, for a test that
/// starts a component on its own.
pub fn fresh_ip(c: u8, w: u8) -> IpAddr {
    IpAddr::V4(ip(next_block(), c, w))
}

fn ip(block: u8, c: u8, w: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, block, c, w)
}

/// A Service + ServiceExport named `service` with one HTTP port 80 → 8080 and a gRPC port.
pub fn service_yaml(service: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: {service}}}\n  ports:\n  - {{name: http, port: 80, targetPort: {APP_PORT}}}\n  - {{name: grpc, port: 9090, targetPort: {APP_PORT}}}\n  - {{name: tcp-echo, port: {TCP_ECHO_PORT}, targetPort: {TCP_ECHO_PORT}}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {service}, namespace: {NAMESPACE}}}\n"
    )
}

pub fn workload_yaml(
    name: &str,
    service: &str,
    ip: Ipv4Addr,
    locality: &Locality,
    sa: &str,
) -> String {
    workload_yaml_labeled(name, service, ip, locality, sa, &[])
}

/// A WorkloadEntry with `app: <service>` and `extra` labels.
pub fn workload_yaml_labeled(
    name: &str,
    service: &str,
    ip: Ipv4Addr,
    locality: &Locality,
    sa: &str,
    extra: &[(&str, &str)],
) -> String {
    let labels: String = extra.iter().map(|(k, v)| format!(", {k}: {v}")).collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  address: {ip}\n  labels: {{app: {service}{labels}}}\n  locality: {locality}\n  serviceAccount: {sa}\n"
    )
}

impl Mesh {
    /// Starts the federation and, for each name, a cluster with its controller and gateway.
    /// `services[cluster]` lists the services whose YAML (Service + export) the cluster has.
    pub async fn start(clusters: &[&str]) -> anyhow::Result<Self> {
        Self::start_configured(clusters, |_| {}).await
    }

    /// Like [`Mesh::start`], with controllers issuing certificates that live `cert_ttl`.
    pub async fn start_with_cert_ttl(
        clusters: &[&str],
        cert_ttl: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_configured(clusters, |mesh| mesh.cert_ttl = cert_ttl).await
    }

    /// Like [`Mesh::start`], with `configure` applied to the mesh's settings (certificate
    /// lifetime, JWT key fetching) before any controller starts.
    pub async fn start_configured(
        clusters: &[&str],
        configure: impl FnOnce(&mut Mesh),
    ) -> anyhow::Result<Self> {
        Self::start_inner(clusters, &[], configure).await
    }

    /// Like [`Mesh::start`], with the clusters named in `on_kubernetes` run on a stand-in
    /// Kubernetes API server: their controllers read it, and their workloads are Pods with
    /// EndpointSlices there instead of files.
    pub async fn start_with_kubernetes(
        clusters: &[&str],
        on_kubernetes: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_inner(clusters, on_kubernetes, |_| {}).await
    }

    async fn start_inner(
        clusters: &[&str],
        on_kubernetes: &[&str],
        configure: impl FnOnce(&mut Mesh),
    ) -> anyhow::Result<Self> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let block = next_block();
        let fed_state = dir.path().join("federation");
        let mut mesh = Mesh {
            federation_addr: SocketAddr::new(IpAddr::V4(ip(block, 0, 1)), 0),
            bundle_pem: String::new(),
            federation: None,
            dir,
            fed_state,
            clusters: BTreeMap::new(),
            block,
            cert_ttl: Duration::from_secs(24 * 3600),
            cluster_ca_ttl: isthmus_core::tls::ca::INTERMEDIATE_TTL,
            controller_cert_ttl: Duration::from_secs(30 * 24 * 3600),
            forget_silent_after: None,
            federation_addrs_before: Vec::new(),
            federation_replicas: 0,
            replicas: Vec::new(),
            federation_kube: None,
            jwks_refresh: isthmus_controller::JWKS_REFRESH,
            jwks_roots_pem: None,
            telemetry: Default::default(),
        };
        configure(&mut mesh);
        if mesh.federation_replicas > 0 {
            mesh.start_federation_replicas().await?;
            for name in clusters {
                mesh.add_cluster_inner(name, on_kubernetes.contains(name))
                    .await?;
            }
            return Ok(mesh);
        }
        let federation = isthmus_federation::build(federation_config(
            &mesh.fed_state,
            mesh.federation_addr,
            (
                mesh.cluster_ca_ttl,
                mesh.controller_cert_ttl,
                mesh.forget_silent_after,
            ),
        ))
        .await?;
        mesh.federation_addr = federation.grpc_address;
        mesh.bundle_pem = federation.bundle_pem.clone();
        mesh.federation = Some(federation);
        for name in clusters {
            mesh.add_cluster_inner(name, on_kubernetes.contains(name))
                .await?;
        }
        Ok(mesh)
    }

    /// Adds a cluster to the running mesh: it joins the federation with a token, and its
    /// controller and gateway start.
    pub async fn add_cluster(&mut self, name: &str) -> anyhow::Result<()> {
        self.add_cluster_inner(name, false).await
    }

    async fn add_cluster_inner(&mut self, name: &str, on_kubernetes: bool) -> anyhow::Result<()> {
        let mesh = self;
        let block = mesh.block;
        {
            let index = mesh.clusters.len() as u8 + 1;
            let cdir = mesh.dir.path().join(name);
            let config_dir = cdir.join("config");
            std::fs::create_dir_all(&config_dir)?;
            let cluster = Cluster {
                name: name.to_string(),
                index,
                block,
                config_dir,
                state_dir: cdir.join("state"),
                controller: None,
                controller_addr: SocketAddr::new(IpAddr::V4(ip(block, index, 1)), 15012),
                gateway: None,
                workloads: BTreeMap::new(),
                next_workload: 10,
                limits: Default::default(),
                kube: None,
            };
            mesh.clusters.insert(name.to_string(), cluster);
            if on_kubernetes {
                mesh.start_api_server(name).await?;
            }
            mesh.start_controller(name).await?;
            if on_kubernetes {
                mesh.wait_webhook_ready(name).await?;
            }
            mesh.start_gateway(name).await?;
        }
        Ok(())
    }

    pub fn cluster(&mut self, name: &str) -> &mut Cluster {
        self.clusters.get_mut(name).expect("cluster exists")
    }

    pub async fn start_controller(&mut self, name: &str) -> anyhow::Result<()> {
        let token = isthmus_federation::mint_join_token(&self.fed_state, name, TOKEN_TTL)?;
        let replicas: Vec<SocketAddr> = (0..self.replicas.len())
            .map(|n| self.federation_replica_addr(n))
            .collect();
        let fed: Vec<SocketAddr> = match replicas.is_empty() {
            true => vec![self.federation_addr],
            false => replicas,
        };
        let fed: Vec<SocketAddr> = self
            .federation_addrs_before
            .iter()
            .copied()
            .chain(fed)
            .collect();
        let (bundle, cert_ttl) = (self.bundle_pem.clone(), self.cert_ttl);
        let (jwks_refresh, jwks_extra_roots_pem) = (self.jwks_refresh, self.jwks_roots_pem.clone());
        let kubeconfig = match self.cluster(name).kube {
            Some(_) => Some(self.controller_kubeconfig(name, 0)?),
            None => None,
        };
        let c = self.cluster(name);
        wait_port_free(c.controller_addr).await?;
        let bound = isthmus_controller::build(isthmus_controller::Config {
            cluster: c.name.clone(),
            trust_domain: TRUST_DOMAIN.into(),
            source: match kubeconfig {
                Some(kubeconfig) => isthmus_controller::ConfigSource::Kubernetes {
                    kubeconfig: Some(kubeconfig),
                    webhook: Some(SocketAddr::new(IpAddr::V4(ip(c.block, c.index, 1)), 15017)),
                    lease: test_lease(&format!("{}-controller-0", c.name)),
                    proxy_image: Some("isthmus".into()),
                },
                None => isthmus_controller::ConfigSource::Files(c.config_dir.clone()),
            },
            state_dir: c.state_dir.clone(),
            grpc_addr: c.controller_addr,
            admin_addr: SocketAddr::new(IpAddr::V4(ip(c.block, c.index, 1)), 15014),
            metrics_addr: None,
            federation_addrs: fed,
            join_token: Some(token),
            federation_bundle_pem: bundle,
            workload_cert_ttl: cert_ttl,
            push_debounce: isthmus_controller::PUSH_DEBOUNCE,
            jwks_refresh,
            jwks_extra_roots_pem,
        })
        .await
        .with_context(|| format!("starting controller of {name}"))?;
        c.controller = Some(bound);
        Ok(())
    }

    pub fn kill_controller(&mut self, name: &str) {
        if let Some(c) = self.cluster(name).controller.take() {
            c.abort();
        }
    }

    pub async fn start_gateway(&mut self, name: &str) -> anyhow::Result<()> {
        self.start_gateway_on(name, 2).await
    }

    /// Starts `cluster`'s gateway on the pod address `127.B.C.<host>`.
    pub async fn start_gateway_on(&mut self, name: &str, host: u8) -> anyhow::Result<()> {
        let bundle = self.bundle_pem.clone();
        let otlp = self.telemetry.otlp.clone();
        let c = self.cluster(name);
        let token = isthmus_controller::mint_workload_token(
            &c.state_dir,
            &c.name,
            isthmus_core::identity::SYSTEM_NAMESPACE,
            isthmus_core::identity::GATEWAY_SERVICE_ACCOUNT,
            TOKEN_TTL,
        )?;
        let gw_ip = IpAddr::V4(ip(c.block, c.index, host));
        wait_port_free(SocketAddr::new(gw_ip, 15008)).await?;
        let bound = isthmus_gateway::build(isthmus_gateway::Config {
            cluster: c.name.clone(),
            trust_domain: TRUST_DOMAIN.into(),
            controller_addr: c.controller_addr,
            bootstrap: isthmus_core::ca_client::Roots::Inline(bundle),
            token: Some(isthmus_core::ca_client::Token::Inline(token)),
            tunnel_addr: SocketAddr::new(gw_ip, 15008),
            quic_addr: SocketAddr::new(gw_ip, 15443),
            admin_addr: SocketAddr::new(gw_ip, 15000),
            metrics_addr: None,
            advertise_tunnel: None,
            advertise_quic: None,
            otlp: otlp.clone(),
        })
        .await?;
        c.gateway = Some(bound);
        Ok(())
    }

    /// The QUIC address of `cluster`'s running gateway, where peer gateways reach it.
    pub fn gateway_quic(&self, cluster: &str) -> SocketAddr {
        self.clusters[cluster]
            .gateway
            .as_ref()
            .expect("gateway running")
            .quic_address
    }

    pub fn kill_gateway(&mut self, name: &str) {
        if let Some(g) = self.cluster(name).gateway.take() {
            g.abort();
        }
    }

    pub fn kill_federation(&mut self) {
        if let Some(f) = self.federation.take() {
            f.abort();
        }
    }

    /// Starts the federation again on its address, with the state it kept.
    pub async fn start_federation(&mut self) -> anyhow::Result<()> {
        wait_port_free(self.federation_addr).await?;
        let f = isthmus_federation::build(federation_config(
            &self.fed_state,
            self.federation_addr,
            (
                self.cluster_ca_ttl,
                self.controller_cert_ttl,
                self.forget_silent_after,
            ),
        ))
        .await
        .context("restarting the federation")?;
        self.federation = Some(f);
        Ok(())
    }

    /// Adds a workload: YAML (for a service), the sample app when `service` is given, and
    /// its sidecar. Waits until the sidecar is ready.
    pub async fn add_workload(
        &mut self,
        cluster: &str,
        name: &str,
        service: Option<&str>,
        service_account: &str,
    ) -> anyhow::Result<()> {
        self.add_workload_labeled(cluster, name, service, service_account, &[])
            .await
    }

    /// Like [`Mesh::add_workload`], with extra labels on the WorkloadEntry (`version: v2`).
    pub async fn add_workload_labeled(
        &mut self,
        cluster: &str,
        name: &str,
        service: Option<&str>,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let c = self.cluster(cluster);
        let w = c.next_workload;
        c.next_workload += 1;
        let addr = ip(c.block, c.index, w);
        let locality = locality_of(cluster);
        if c.kube.is_some() {
            self.create_pod(cluster, name, service, service_account, labels, addr)
                .await?;
        } else if let Some(svc) = service {
            let svc_file = c.config_dir.join(format!("service-{svc}.yaml"));
            if !svc_file.exists() {
                std::fs::write(&svc_file, service_yaml(svc))?;
            }
            std::fs::write(
                c.config_dir.join(format!("workload-{name}.yaml")),
                workload_yaml_labeled(name, svc, addr, &locality, service_account, labels),
            )?;
        }
        let app = match service {
            Some(_) => Some(
                isthmus::echo::build(isthmus::echo::Config {
                    listen: SocketAddr::new(IpAddr::V4(addr), APP_PORT),
                    cluster: cluster.to_owned(),
                    workload: name.to_owned(),
                    tcp_listen: Some(SocketAddr::new(IpAddr::V4(addr), TCP_ECHO_PORT)),
                })
                .await?,
            ),
            None => None,
        };
        let wl = Workload {
            name: name.to_owned(),
            ip: addr,
            app,
            own_app: None,
            sidecar: None,
            service_account: service_account.to_owned(),
        };
        self.start_workload(cluster, wl).await
    }

    /// The address the next workload of `cluster` gets, taken now: a test binds its own
    /// app there (at [`APP_PORT`]), writes the workload's YAML, then calls
    /// [`Mesh::add_own_workload`].
    pub fn take_address(&mut self, cluster: &str) -> Ipv4Addr {
        let c = self.cluster(cluster);
        let w = c.next_workload;
        c.next_workload += 1;
        ip(c.block, c.index, w)
    }

    /// Adds a sidecar in front of an app the test runs at `app` (an address from
    /// [`Mesh::take_address`]), whose WorkloadEntry and Service the test wrote.
    pub async fn add_own_workload(
        &mut self,
        cluster: &str,
        name: &str,
        service_account: &str,
        app: SocketAddr,
    ) -> anyhow::Result<()> {
        let IpAddr::V4(ip) = app.ip() else {
            anyhow::bail!("workloads have IPv4 loopback addresses");
        };
        let wl = Workload {
            name: name.to_owned(),
            ip,
            app: None,
            own_app: Some(app),
            sidecar: None,
            service_account: service_account.to_owned(),
        };
        self.start_workload(cluster, wl).await
    }

    async fn start_workload(&mut self, cluster: &str, mut wl: Workload) -> anyhow::Result<()> {
        let bundle = self.bundle_pem.clone();
        let telemetry = self.telemetry.clone();
        let c = self.cluster(cluster);
        wl.sidecar = Some(start_sidecar(c, &wl, &bundle, telemetry).await?);
        let ready = wl.sidecar.as_ref().expect("just started").readiness.clone();
        eventually("sidecar ready", Duration::from_secs(10), || {
            let ready = ready.clone();
            async move {
                if ready.is_ready() {
                    Ok(())
                } else {
                    anyhow::bail!("waiting for {:?}", ready.pending())
                }
            }
        })
        .await?;
        self.cluster(cluster).workloads.insert(wl.name.clone(), wl);
        Ok(())
    }

    pub fn workload(&mut self, cluster: &str, name: &str) -> &mut Workload {
        self.cluster(cluster)
            .workloads
            .get_mut(name)
            .expect("workload exists")
    }

    /// Kills a workload's app and sidecar, as when its pod dies.
    pub fn kill_workload(&mut self, cluster: &str, name: &str) {
        let w = self.workload(cluster, name);
        if let Some(a) = w.app.take() {
            a.abort();
        }
        if let Some(s) = w.sidecar.take() {
            s.abort();
        }
    }

    /// Kills only a workload's app; its sidecar keeps running.
    pub fn kill_app(&mut self, cluster: &str, name: &str) {
        if let Some(a) = self.workload(cluster, name).app.take() {
            a.abort();
        }
    }

    /// Restarts a killed workload on the same address.
    pub async fn restart_workload(&mut self, cluster: &str, name: &str) -> anyhow::Result<()> {
        let bundle = self.bundle_pem.clone();
        let telemetry = self.telemetry.clone();
        let c = self.cluster(cluster);
        let mut w = c.workloads.remove(name).context("no such workload")?;
        wait_port_free(SocketAddr::new(IpAddr::V4(w.ip), 15008)).await?;
        w.app = Some(
            isthmus::echo::build(isthmus::echo::Config {
                listen: SocketAddr::new(IpAddr::V4(w.ip), APP_PORT),
                cluster: cluster.to_owned(),
                workload: name.to_owned(),
                tcp_listen: Some(SocketAddr::new(IpAddr::V4(w.ip), TCP_ECHO_PORT)),
            })
            .await?,
        );
        w.sidecar = Some(start_sidecar(c, &w, &bundle, telemetry).await?);
        c.workloads.insert(name.to_owned(), w);
        Ok(())
    }
}

/// The federation of a test mesh: the mesh's failover order, admin on a free port.
pub(crate) fn federation_config(
    state_dir: &std::path::Path,
    grpc: SocketAddr,
    (cluster_ca_ttl, controller_cert_ttl, forget_silent_after): (
        Duration,
        Duration,
        Option<Duration>,
    ),
) -> isthmus_federation::Config {
    isthmus_federation::Config {
        cluster_ca_ttl,
        controller_cert_ttl,
        forget_silent_after,
        replica: None,
        trust_domain: TRUST_DOMAIN.into(),
        state_dir: state_dir.to_owned(),
        grpc_addr: grpc,
        admin_addr: SocketAddr::new(grpc.ip(), 0),
        metrics_addr: None,
        root_cert: None,
        root_key: None,
        failover: vec![
            ("us-east".into(), "us-west".into()),
            ("us-west".into(), "eu-central".into()),
            ("eu-central".into(), "us-west".into()),
        ],
    }
}

/// A Lease held by `identity` with short timings, so that a test sees a takeover in
/// seconds (a leader that stops renewing is replaced after 2 s).
pub fn test_lease(identity: &str) -> isthmus_kubernetes::lease::LeaseConfig {
    isthmus_kubernetes::lease::LeaseConfig {
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry: Duration::from_millis(200),
        ..isthmus_kubernetes::lease::LeaseConfig::new("isthmus-system", identity)
    }
}

/// A stopped component's tasks release their sockets asynchronously; wait until the
/// address can be bound again, as a restarted process would find it.
pub(crate) async fn wait_port_free(addr: SocketAddr) -> anyhow::Result<()> {
    eventually(
        &format!("{addr} to be free"),
        Duration::from_secs(5),
        || async {
            drop(tokio::net::TcpListener::bind(addr).await?);
            Ok(())
        },
    )
    .await
}

async fn start_sidecar(
    c: &Cluster,
    w: &Workload,
    bundle: &str,
    telemetry: isthmus_core::otlp::TelemetryConfig,
) -> anyhow::Result<isthmus_sidecar::Bound> {
    // On Kubernetes the pod proves itself with its projected service-account token, which
    // the kubelet keeps in a file; elsewhere with a bootstrap token.
    let token = match &c.kube {
        Some(api) => {
            let path = c.state_dir.join("../pods").join(&w.name).join("token");
            if !path.exists() {
                std::fs::create_dir_all(path.parent().expect("a folder"))?;
                let token = api.token_issuer().token(
                    NAMESPACE,
                    &w.service_account,
                    &w.name,
                    isthmus_kubernetes::identity::CA_AUDIENCE,
                    TOKEN_TTL,
                );
                std::fs::write(&path, token)?;
            }
            isthmus_core::ca_client::Token::File(path)
        }
        None => isthmus_core::ca_client::Token::Inline(isthmus_controller::mint_workload_token(
            &c.state_dir,
            &c.name,
            NAMESPACE,
            &w.service_account,
            TOKEN_TTL,
        )?),
    };
    let a = IpAddr::V4(w.ip);
    isthmus_sidecar::build(isthmus_sidecar::Config {
        cluster: c.name.clone(),
        trust_domain: TRUST_DOMAIN.into(),
        workload: NamespacedName::new(NAMESPACE, &w.name),
        service_account: w.service_account.clone(),
        locality: locality_of(&c.name),
        controller_addr: c.controller_addr,
        bootstrap: isthmus_core::ca_client::Roots::Inline(bundle.to_owned()),
        token: Some(token),
        outbound_addr: SocketAddr::new(a, 15001),
        capture_inbound_addr: None,
        // Every simulated pod answers mesh names (no upstream: others fail).
        dns_addr: Some(SocketAddr::new(a, 15053)),
        dns_upstream: Vec::new(),
        inbound_addr: SocketAddr::new(a, 15008),
        admin_addr: SocketAddr::new(a, 15000),
        metrics_addr: None,
        app_addr: w.own_app.or(w.app.as_ref().map(|app| app.address)),
        log_control: None,
        limits: c.limits.clone(),
        telemetry,
    })
    .await
}

/// Reads a Prometheus text page and sums the samples of `metric` whose labels contain every
/// `key="value"` of `labels`.
pub async fn metric_sum(
    admin: SocketAddr,
    metric: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<f64> {
    let reply = AppClient::new()
        .send(admin, &admin.to_string(), "/stats/prometheus", false, &[])
        .await?;
    let text = String::from_utf8_lossy(&reply.body);
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or_default();
        if name != metric {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| name_labels.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(sum)
}

/// Steady traffic with the pause the tests use between requests.
pub fn traffic(outbound: SocketAddr, host: &str) -> Traffic {
    Traffic::start(outbound, host, Duration::from_millis(10))
}

/// Waits until the last `n` requests all landed in `cluster`.
pub async fn settles_in(
    traffic: &Traffic,
    cluster: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    eventually(
        &format!("traffic to settle in {cluster}"),
        timeout,
        || async {
            let tail = traffic.last(n);
            anyhow::ensure!(
                tail.len() == n && tail.iter().all(|e| e.landed.as_deref() == Ok(cluster)),
                "last: {:?}",
                tail.first().map(|e| &e.landed)
            );
            Ok(())
        },
    )
    .await
}

/// GETs a component's `/config_dump` as JSON.
pub async fn config_dump(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let r = AppClient::new().get(admin, "admin", "/config_dump").await?;
    Ok(serde_json::from_slice(&r.body)?)
}

/// A GET of `authority` as one proxy sends it to another's tunnel port.
pub fn proxy_get(authority: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::builder()
        .uri(format!("http://{authority}/"))
        .header("x-isthmus-app-protocol", "http")
        .body(Default::default())
        .expect("valid request")
}

/// Sends one HTTP/2 request over mTLS to a proxy's tunnel port, presenting `identity`,
/// as another proxy would; returns the response status.
pub async fn mtls_request(
    addr: SocketAddr,
    identity: &isthmus_core::tls::TlsIdentity,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> anyhow::Result<http::StatusCode> {
    let td = identity.id().trust_domain().to_owned();
    let config = identity.client_config(
        isthmus_core::tls::PeerPolicy::TrustDomain(td),
        &[isthmus_core::tls::ALPN_H2],
    );
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(isthmus_core::tls::server_name(), tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
    Ok(resp.status())
}

/// A QUIC connection to a gateway's peer listener, presenting `identity` as a peer
/// gateway would, and expecting the gateway of `cluster` on the other end.
pub async fn quic_to_gateway(
    gateway: SocketAddr,
    identity: &isthmus_core::tls::TlsIdentity,
    cluster: &str,
) -> anyhow::Result<quinn::Connection> {
    let tls = identity.client_config(
        isthmus_core::tls::PeerPolicy::GatewayOf {
            trust_domain: TRUST_DOMAIN.into(),
            cluster: Some(cluster.into()),
        },
        &[b"isthmus-peer/1"],
    );
    let config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let endpoint = quinn::Endpoint::client(SocketAddr::new(gateway.ip(), 0))?;
    Ok(endpoint
        .connect_with(config, gateway, "isthmus.mesh")?
        .await?)
}

/// Whether `cluster`'s gateway at `gateway` refuses a link from `identity`. In TLS 1.3 the
/// client finishes its handshake before the server has judged its certificate, so a
/// refusal shows on the connection's first stream when not at once.
pub async fn gateway_refuses(
    gateway: SocketAddr,
    identity: &isthmus_core::tls::TlsIdentity,
    cluster: &str,
) -> bool {
    let Ok(conn) = quic_to_gateway(gateway, identity, cluster).await else {
        return true;
    };
    let probe = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        isthmus_gateway::header::write(&mut send, &isthmus_proto::tunnel::StreamHeader::default())
            .await?;
        isthmus_gateway::header::read_reply(&mut recv).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .map_or(true, |r| r.is_err())
}

/// Credentials with a leaf for `id` signed by `issuer`, trusting `bundle_pem`.
pub fn credentials_from(
    issuer: &isthmus_core::tls::ca::CertificateAuthority,
    id: &isthmus_core::identity::SpiffeId,
    bundle_pem: &str,
) -> anyhow::Result<isthmus_core::tls::TlsIdentity> {
    let (key, csr) = isthmus_core::tls::ca::leaf_csr(id)?;
    let chain = issuer.sign_leaf(&csr, id, Duration::from_secs(3600))?;
    Ok(isthmus_core::tls::TlsIdentity::new(
        isthmus_core::tls::Credentials::from_pem(key.serialize_der(), &chain, bundle_pem)?,
    ))
}

impl Mesh {
    /// A CA client for `cluster` that proves `token_sa` but asks for `asked_sa`.
    pub fn ca_client(
        &mut self,
        cluster: &str,
        token_cluster: &str,
        token_sa: &str,
        asked_sa: &str,
    ) -> anyhow::Result<isthmus_core::ca_client::CaClient> {
        self.ca_client_in(cluster, token_cluster, NAMESPACE, token_sa, asked_sa)
    }

    /// Like [`Mesh::ca_client`], for a workload of namespace `namespace`.
    pub fn ca_client_in(
        &mut self,
        cluster: &str,
        token_cluster: &str,
        namespace: &str,
        token_sa: &str,
        asked_sa: &str,
    ) -> anyhow::Result<isthmus_core::ca_client::CaClient> {
        let bundle = self.bundle_pem.clone();
        let token_state = self.cluster(token_cluster).state_dir.clone();
        let token = isthmus_controller::mint_workload_token(
            &token_state,
            cluster,
            namespace,
            token_sa,
            TOKEN_TTL,
        )?;
        let c = self.cluster(cluster);
        Ok(isthmus_core::ca_client::CaClient {
            address: c.controller_addr,
            controller: isthmus_core::identity::SpiffeId::controller(TRUST_DOMAIN, &c.name),
            bootstrap: isthmus_core::ca_client::Roots::Inline(bundle),
            token: Some(isthmus_core::ca_client::Token::Inline(token)),
            identity: isthmus_core::identity::SpiffeId::new(TRUST_DOMAIN, namespace, asked_sa),
        })
    }

    /// A valid gateway certificate issued by `cluster`'s CA, as that cluster's gateway has.
    pub async fn gateway_certificate(
        &mut self,
        cluster: &str,
    ) -> anyhow::Result<isthmus_core::tls::TlsIdentity> {
        use isthmus_core::identity::{GATEWAY_SERVICE_ACCOUNT, SYSTEM_NAMESPACE};
        let ca = self.ca_client_in(
            cluster,
            cluster,
            SYSTEM_NAMESPACE,
            GATEWAY_SERVICE_ACCOUNT,
            GATEWAY_SERVICE_ACCOUNT,
        )?;
        Ok(isthmus_core::tls::TlsIdentity::new(ca.fetch(None).await?))
    }

    /// Writes a config file into a cluster's config folder and waits until the controller
    /// accepted it (fails with the controller's errors if it rejected it).
    pub async fn apply(&mut self, cluster: &str, file: &str, yaml: &str) -> anyhow::Result<()> {
        let admin = self.controller_admin(cluster);
        let before = config_dump(admin).await?["config"]["accepted"]
            .as_u64()
            .unwrap_or(0);
        std::fs::write(self.cluster(cluster).config_dir.join(file), yaml)?;
        eventually(
            &format!("{file} to be accepted"),
            Duration::from_secs(5),
            || async {
                let dump = config_dump(admin).await?;
                anyhow::ensure!(
                    dump["config"]["last_errors"].is_null(),
                    "rejected: {}",
                    dump["config"]["last_errors"]
                );
                anyhow::ensure!(
                    dump["config"]["accepted"].as_u64().unwrap_or(0) > before,
                    "not yet accepted"
                );
                Ok(())
            },
        )
        .await
        .map(|_| ())
    }

    /// Waits until a workload's sidecar has `routes` VirtualService routes for `host`.
    pub async fn wait_routes(
        &mut self,
        cluster: &str,
        workload: &str,
        host: &str,
        routes: usize,
    ) -> anyhow::Result<()> {
        let admin = self
            .workload(cluster, workload)
            .sidecar
            .as_ref()
            .context("sidecar running")?
            .admin_address;
        eventually(
            &format!("{routes} routes for {host} in {workload}"),
            Duration::from_secs(5),
            || async {
                let dump = config_dump(admin).await?;
                let n = dump["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s["service"] == host)
                    .and_then(|s| s["routes"].as_u64());
                anyhow::ensure!(n == Some(routes as u64), "routes: {n:?}");
                Ok(())
            },
        )
        .await
    }

    pub fn controller_admin(&mut self, cluster: &str) -> SocketAddr {
        self.cluster(cluster)
            .controller
            .as_ref()
            .expect("controller running")
            .admin_address
    }
}

/// A set of nftables drop rules on loopback, removed when dropped. Faults are injected
/// only into traffic between this mesh's own loopback addresses. Needs root and `nft`
/// (`.ci/run` installs it).
pub struct NetFault {
    table: String,
}

impl NetFault {
    /// Drops `percent`% of UDP packets to and from `addr` (100 = a partition).
    pub fn drop_udp(addr: SocketAddr, percent: u8) -> anyhow::Result<Self> {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let table = format!(
            "isthmus_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let fault = Self { table };
        let (ip, port) = (addr.ip(), addr.port());
        let sample = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        let script = format!(
            "add table inet {t}\n\
             add chain inet {t} out {{ type filter hook output priority 0; policy accept; }}\n\
             add rule inet {t} out ip daddr {ip} udp dport {port} {sample}drop\n\
             add rule inet {t} out ip saddr {ip} udp sport {port} {sample}drop\n",
            t = fault.table
        );
        fault
            .nft(&script)
            .context("installing nft drop rules (needs root and the nftables package)")?;
        Ok(fault)
    }

    fn nft(&self, script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Removes the rules now.
    pub fn heal(self) {}
}

impl Drop for NetFault {
    fn drop(&mut self) {
        let _ = self.nft(&format!("delete table inet {}\n", self.table));
    }
}

/// Waits until `host` answers 200 through the sidecar listening at `outbound`.
pub async fn reachable(outbound: SocketAddr, host: &str) -> anyhow::Result<()> {
    let client = AppClient::new();
    eventually(
        &format!("{host} reachable"),
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(client.get(outbound, host, "/").await?.status == 200);
            Ok(())
        },
    )
    .await
}

impl Mesh {
    /// Istio's `reviews` example: `reviews-v1` (label `version: v1`) in east, `reviews-v2`
    /// in `v2_cluster`, and a calling workload `client` in east; returns the mesh and the
    /// client's outbound listener.
    pub async fn with_reviews(
        clusters: &[&str],
        v2_cluster: &str,
        client: &str,
    ) -> anyhow::Result<(Mesh, SocketAddr)> {
        let mut mesh = Mesh::start(clusters).await?;
        mesh.add_workload_labeled(
            "east",
            "reviews-v1",
            Some("reviews"),
            "reviews",
            &[("version", "v1")],
        )
        .await?;
        mesh.add_workload_labeled(
            v2_cluster,
            "reviews-v2",
            Some("reviews"),
            "reviews",
            &[("version", "v2")],
        )
        .await?;
        mesh.add_workload("east", client, None, client).await?;
        let outbound = mesh.workload("east", client).outbound();
        Ok((mesh, outbound))
    }
}

impl Mesh {
    /// `echo` in each of `echo_in` (one workload per cluster) and a calling workload
    /// `client` in east; returns the mesh, the client's outbound listener, and steady
    /// traffic from it that has settled in `echo_in[0]`.
    pub async fn with_traffic_from_east(
        clusters: &[&str],
        echo_in: &[&str],
    ) -> anyhow::Result<(Mesh, SocketAddr, Traffic)> {
        Self::with_traffic_from_east_configured(clusters, echo_in, |_| {}).await
    }

    /// Like [`Mesh::with_traffic_from_east`], with the mesh's settings changed first (see
    /// [`Mesh::start_configured`]).
    pub async fn with_traffic_from_east_configured(
        clusters: &[&str],
        echo_in: &[&str],
        configure: impl FnOnce(&mut Mesh),
    ) -> anyhow::Result<(Mesh, SocketAddr, Traffic)> {
        let mut mesh = Mesh::start_configured(clusters, configure).await?;
        for c in echo_in {
            mesh.add_workload(c, &format!("echo-{c}"), Some("echo"), "echo")
                .await?;
        }
        mesh.add_workload("east", "client", None, "frontend")
            .await?;
        let outbound = mesh.workload("east", "client").outbound();
        let host = "echo.demo.svc.cluster.local";
        reachable(outbound, host).await?;
        let traffic = traffic(outbound, host);
        let home = echo_in.first().context("echo runs somewhere")?;
        settles_in(&traffic, home, 20, Duration::from_secs(10)).await?;
        Ok((mesh, outbound, traffic))
    }
}

impl Mesh {
    /// A discovery channel to `cluster`'s controller, authenticated as a workload of
    /// service account `sa` (certificate from the cluster's CA), as a proxy opens it.
    pub async fn controller_channel(
        &mut self,
        cluster: &str,
        sa: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        self.controller_channel_in(cluster, NAMESPACE, sa).await
    }

    /// Like [`Mesh::controller_channel`], for a workload of namespace `namespace`.
    pub async fn controller_channel_in(
        &mut self,
        cluster: &str,
        namespace: &str,
        sa: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let ca = self.ca_client_in(cluster, cluster, namespace, sa, sa)?;
        let identity = isthmus_core::tls::TlsIdentity::new(ca.fetch(None).await?);
        let controller = self
            .cluster(cluster)
            .controller
            .as_ref()
            .context("controller running")?
            .grpc_address;
        let policy = isthmus_core::tls::PeerPolicy::OneOf(vec![
            isthmus_core::identity::SpiffeId::controller(TRUST_DOMAIN, cluster),
        ]);
        Ok(isthmus_core::grpc::tls_channel(
            controller,
            identity.client_config(policy, &[isthmus_core::tls::ALPN_H2]),
        ))
    }
}

/// A certificate authority of a test's own (an issuer's, an external server's), which
/// issues certificates for names.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// (certificate PEM, key PEM) for `names`.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        Ok((
            params.signed_by(&key, &self.issuer)?.pem(),
            key.serialize_pem(),
        ))
    }
}
