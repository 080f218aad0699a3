//! The cluster controller: one per cluster.
//!
//! In: the cluster's services, workloads and mesh config from its platform adapter (a
//! folder of YAML, the embedded default, or the Kubernetes API server), health reports and gateway addresses from its proxies' discovery streams,
//! and the merged global registry from the federation.
//! Out: per-proxy config pushed over xDS-style delta streams (`discovery`), workload
//! certificates signed by the cluster's intermediate CA (`ca`), and the cluster's exports
//! streamed to the federation (`federation`).
//!
//! State that must survive a restart (the cluster CA, the controller's certificate, the
//! token key, the last global registry) lives in the state folder, so a controller that
//! restarts while the federation is down still serves.

mod discovery;
mod federation;
mod gateways;
mod jwks;
mod signing;
mod snapshot;
mod syncz;
mod trust;
mod vips;

/// The default refresh of fetched JWT keys (Istio's 20 minutes).
pub use jwks::DEFAULT_REFRESH as JWKS_REFRESH;
/// The default push debounce (Istio's 100 ms).
pub use snapshot::DEBOUNCE as PUSH_DEBOUNCE;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::{Admin, AdminServer};
use isthmus_core::config::watch::LoadStatus;
use isthmus_core::readiness::Readiness;
use isthmus_core::tls::PeerPolicy;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use trust::mint_workload_token;

/// Static config of a controller.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of the cluster this controller runs.
    pub cluster: String,
    /// Trust domain of the mesh; must match the federation's.
    pub trust_domain: String,
    /// Where the cluster's services, workloads and mesh config come from.
    pub source: ConfigSource,
    /// Where the CA, keys and last global registry are kept.
    pub state_dir: PathBuf,
    /// gRPC listener for config streams and the CA (15012).
    pub grpc_addr: SocketAddr,
    /// Metrics and debug listener (15014).
    pub admin_addr: SocketAddr,
    /// A listener serving only `/ready` and `/stats/prometheus`, for scrapers on other
    /// hosts (the admin listener itself belongs on loopback).
    pub metrics_addr: Option<SocketAddr>,
    /// The federation controller's gRPC addresses: the first that answers is used, and the
    /// next when it stops (never empty).
    pub federation_addrs: Vec<SocketAddr>,
    /// Join token minted by the federation for this cluster; needed on first start only.
    pub join_token: Option<String>,
    /// PEM roots used to verify the federation before the cluster has joined.
    pub federation_bundle_pem: String,
    /// Lifetime of workload certificates.
    pub workload_cert_ttl: Duration,
    /// Config and health changes within this window go out in one push.
    pub push_debounce: Duration,
    /// How often the keys of JWT issuers named by URL (`jwksUri`, OpenID discovery) are
    /// fetched again.
    pub jwks_refresh: Duration,
    /// PEM roots trusted for those fetches over HTTPS, besides the system's.
    pub jwks_extra_roots_pem: Option<String>,
}

/// The platform adapter a controller reads its cluster from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A folder of YAML documents, watched (the embedded default).
    Files(PathBuf),
    /// The Kubernetes API server: Services, EndpointSlices, Pods and Nodes, and the mesh
    /// config as custom resources.
    Kubernetes {
        /// `None`: found as kubectl finds it, or the pod's own service account in a cluster.
        kubeconfig: Option<PathBuf>,
        /// Where the validating admission webhook listens (15017), if it runs.
        webhook: Option<SocketAddr>,
        /// The Lease replicas elect their leader with.
        lease: isthmus_kubernetes::lease::LeaseConfig,
        /// The image injected sidecars run; `None`: no injection (the webhook serves
        /// validation only).
        proxy_image: Option<String>,
    },
}

pub use isthmus_kubernetes::WEBHOOK_CONFIGURATION;
/// The names the API server calls the webhook by: the controller's Service.
pub const WEBHOOK_NAMES: &[&str] = &[
    "isthmus-controller.isthmus-system.svc",
    "isthmus-controller.isthmus-system.svc.cluster.local",
];
/// Lifetime of the webhook's serving certificate; a controller restart issues a new one.
const WEBHOOK_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Files(dir) => write!(f, "folder {}", dir.display()),
            ConfigSource::Kubernetes {
                kubeconfig: Some(k),
                ..
            } => write!(f, "Kubernetes (kubeconfig {})", k.display()),
            ConfigSource::Kubernetes { .. } => f.write_str("Kubernetes"),
        }
    }
}

/// The first config set of a source, and what keeps it current.
struct Loaded {
    initial: isthmus_core::config::ConfigSet,
    status: LoadStatus,
    keeper: Keeper,
}

/// Watches a source after its first load, publishing each set it admits.
enum Keeper {
    Files(
        isthmus_core::config::watch::Folder,
        isthmus_core::config::LastGood,
    ),
    Kubernetes(
        Box<isthmus_kubernetes::Source>,
        isthmus_core::config::LastGood,
    ),
}

impl Keeper {
    /// `leader`: whether this replica leads, on Kubernetes (where only the leader writes).
    async fn run(
        self,
        config: watch::Sender<Arc<isthmus_core::config::ConfigSet>>,
        status: watch::Sender<LoadStatus>,
        leader: Option<watch::Receiver<bool>>,
    ) {
        match (self, leader) {
            (Keeper::Files(folder, last), _) => {
                isthmus_core::config::watch::run(folder, last, config, status).await
            }
            (Keeper::Kubernetes(source, last), Some(leader)) => {
                isthmus_kubernetes::run(*source, last, config, status, leader).await
            }
            (Keeper::Kubernetes(..), None) => {
                tracing::error!("no leader election on Kubernetes; not watching")
            }
        }
    }
}

/// The services other clusters export, as the global registry says, for ServiceImports;
/// and the task that keeps them current.
fn registry_imports(
    cluster: &str,
    mut global: watch::Receiver<Arc<federation::Global>>,
) -> (
    watch::Receiver<Vec<isthmus_kubernetes::imports::Import>>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let cluster = cluster.to_owned();
    let of = move |g: &federation::Global| -> Vec<isthmus_kubernetes::imports::Import> {
        g.services
            .values()
            .filter_map(|gs| {
                let clusters: std::collections::BTreeSet<String> = gs
                    .clusters
                    .iter()
                    .map(|c| c.cluster.clone())
                    .filter(|c| *c != cluster)
                    .collect();
                (!clusters.is_empty()).then(|| isthmus_kubernetes::imports::Import {
                    namespace: gs.namespace.clone(),
                    name: gs.name.clone(),
                    ports: gs
                        .ports
                        .iter()
                        .map(|p| (p.name.clone(), p.port as u16, p.protocol.clone()))
                        .collect(),
                    clusters,
                })
            })
            .collect()
    };
    let (tx, rx) = watch::channel(of(&global.borrow_and_update()));
    let follow = async move {
        while global.changed().await.is_ok() {
            let next = of(&global.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = *cur != next;
                if changed {
                    *cur = next;
                }
                changed
            });
        }
    };
    (rx, follow)
}

/// What a controller on Kubernetes runs besides watching: the leader election, and the
/// admission webhook with the CA bundle the API server needs to call it. Returns whether
/// this replica leads.
async fn start_kubernetes(
    running: &mut isthmus_core::drain::Running,
    client: isthmus_kubernetes::Client,
    config: &Config,
    state: &trust::ClusterState,
    metrics: &mut Registry,
    global: watch::Receiver<Arc<federation::Global>>,
) -> anyhow::Result<watch::Receiver<bool>> {
    let ConfigSource::Kubernetes {
        webhook,
        lease,
        proxy_image,
        ..
    } = &config.source
    else {
        anyhow::bail!("not a Kubernetes source");
    };
    let (webhook, lease) = (*webhook, lease.clone());
    let inject = proxy_image
        .as_ref()
        .map(|image| isthmus_kubernetes::inject::Template {
            cluster: config.cluster.clone(),
            trust_domain: config.trust_domain.clone(),
            image: image.clone(),
            controller: format!("{}:{}", WEBHOOK_NAMES[0], config.grpc_addr.port()),
            // The bundle at start: an injected pod needs it only for its first
            // certificate; from then on the controller pushes the current one.
            root_pem: state.trust.current().bundle_pem.clone(),
        });
    let (leading, leader) = watch::channel(false);
    running.spawn(isthmus_kubernetes::lease::run(
        client.clone(),
        lease,
        leading,
    ));
    running.spawn(isthmus_kubernetes::root_cert::run(
        client.clone(),
        state.trust.subscribe(),
        |t: &Arc<trust::Issuing>| t.bundle_pem.clone(),
        leader.clone(),
    ));
    let (imports, follow_registry) = registry_imports(&config.cluster, global);
    running.spawn(follow_registry);
    running.spawn(isthmus_kubernetes::imports::run(
        client.clone(),
        imports,
        leader.clone(),
    ));
    let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    metrics.register(
        "leader",
        "1 while this replica leads (writes statuses, Events, ServiceImports and the webhook's CA bundle)",
        gauge.clone(),
    );
    let mut watching = leader.clone();
    running.spawn(async move {
        loop {
            gauge.set(i64::from(*watching.borrow_and_update()));
            if watching.changed().await.is_err() {
                return;
            }
        }
    });
    let Some(addr) = webhook else {
        return Ok(leader);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admission webhook on {addr}"))?;
    let mut ips = Vec::new();
    if !addr.ip().is_unspecified() {
        ips.push(addr.ip());
    }
    let names: Vec<String> = WEBHOOK_NAMES.iter().map(|n| n.to_string()).collect();
    let (key, chain) = state
        .trust
        .current()
        .ca
        .issue_server(&names, &ips, WEBHOOK_CERT_TTL)
        .context("issuing the webhook's certificate")?;
    let tls = isthmus_core::tls::plain_server_config(&chain, &key)?;
    running.spawn(isthmus_kubernetes::webhook::serve(listener, tls, inject));
    let (bundle, mut leading) = (state.trust.current().bundle_pem.clone(), leader.clone());
    running.spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            if leading.wait_for(|l| *l).await.is_err() {
                return;
            }
            // The injector's configuration too, where it is installed.
            if let Err(e) =
                isthmus_kubernetes::webhook::publish_injector_ca_bundle(&client, &bundle).await
            {
                tracing::warn!(error = %e, "cannot publish the injector's CA bundle; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            match isthmus_kubernetes::webhook::publish_ca_bundle(
                &client,
                WEBHOOK_CONFIGURATION,
                &bundle,
            )
            .await
            {
                Ok(true) => return tracing::info!("webhook CA bundle published"),
                Ok(false) => {
                    return tracing::warn!(
                        configuration = WEBHOOK_CONFIGURATION,
                        "no ValidatingWebhookConfiguration: bad objects are caught only after they are stored"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish the webhook CA bundle; retrying")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    });
    Ok(leader)
}

async fn load(source: &ConfigSource) -> anyhow::Result<Loaded> {
    match source {
        ConfigSource::Files(dir) => {
            let (folder, initial, status, last_good) = isthmus_core::config::watch::initial(dir)
                .map_err(|e| anyhow::anyhow!("config in {} is unreadable:\n{e}", dir.display()))?;
            Ok(Loaded {
                initial,
                status,
                keeper: Keeper::Files(folder, last_good),
            })
        }
        ConfigSource::Kubernetes { kubeconfig, .. } => {
            let client = isthmus_kubernetes::client(kubeconfig.as_deref()).await?;
            let source = isthmus_kubernetes::Source::start(client).await?;
            let mut last_good = isthmus_core::config::LastGood::default();
            let (initial, rejected) = source.admit(&mut last_good);
            for e in &rejected {
                tracing::warn!(error = %e, "config object rejected");
            }
            let mut status = LoadStatus::default();
            status.record(&initial, rejected, true);
            Ok(Loaded {
                initial,
                status,
                keeper: Keeper::Kubernetes(Box::new(source), last_good),
            })
        }
    }
}

/// A running controller.
pub struct Bound {
    pub grpc_address: SocketAddr,
    pub admin_address: SocketAddr,
    running: isthmus_core::drain::Running,
}

impl Bound {
    /// Runs until a task ends (which only happens on a fatal error).
    pub async fn wait_termination(&mut self) -> anyhow::Result<()> {
        self.running.wait_any().await;
        anyhow::bail!("controller task ended")
    }

    /// Stops every task of this controller; open streams are cut as if the process died.
    pub fn abort(self) {
        self.running.abort();
    }

    /// Stops accepting, lets open connections finish until `deadline`, then stops.
    pub async fn shutdown(self, deadline: std::time::Duration) {
        let cut = self.running.shutdown(deadline).await;
        tracing::info!(cut_off = cut, "drained");
    }
}

/// Binds every listener, loads state and config, and starts the controller.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding controller gRPC on {}", config.grpc_addr))?;
    let Loaded {
        initial,
        status: initial_status,
        keeper,
    } = load(&config.source).await?;
    let state = trust::ClusterState::load_or_join(&config).await?;
    tracing::info!(cluster = %config.cluster, trust_domain = %state.trust_domain, "cluster CA ready");

    let mut root = Registry::default();
    isthmus_core::admin::register_build(&mut root, "pilot");
    let metrics = root.sub_registry_with_prefix("isthmus_controller");
    let (config_tx, config_rx) = watch::channel(Arc::new(initial));
    let (status_tx, status_rx) = watch::channel(initial_status);
    let global = Arc::new(federation::GlobalState::load(&config.state_dir));
    global.register_metrics(metrics);
    let trust_metrics = trust::TrustMetrics::default();
    trust_metrics.register(metrics);
    let getter = isthmus_core::fetch::Getter::new(config.jwks_extra_roots_pem.as_deref())
        .context("the trust roots for fetching JWT issuers' keys")?;
    let jwks = jwks::Resolver::new(getter, config.jwks_refresh);
    jwks.register_metrics(metrics);
    let registry = snapshot::Registry::new(
        &config.cluster,
        &state.trust_domain,
        config_rx,
        global.subscribe(),
        state.trust.subscribe(),
        &config.state_dir,
        jwks.clone(),
    );
    let (mut running, drain) = isthmus_core::drain::Running::new();
    let discovery = discovery::DiscoveryService::new(
        config.cluster.clone(),
        registry.clone(),
        state.trust_domain.clone(),
        drain.clone(),
        metrics.sub_registry_with_prefix("xds"),
    );
    let reviewer = match &keeper {
        Keeper::Kubernetes(source, _) => Some(isthmus_kubernetes::identity::TokenReviewer::new(
            source.client(),
        )),
        Keeper::Files(..) => None,
    };
    let ca = signing::CaService::new(&config, &state, reviewer)?;
    ca.register_metrics(metrics.sub_registry_with_prefix("ca"));
    config_metrics(metrics, status_rx.clone());
    let leader = match (&keeper, &config.source) {
        (Keeper::Kubernetes(source, _), ConfigSource::Kubernetes { .. }) => Some(
            start_kubernetes(
                &mut running,
                source.client(),
                &config,
                &state,
                metrics,
                global.subscribe(),
            )
            .await?,
        ),
        _ => None,
    };

    let (limits_tx, limits_rx) = watch::channel(federation::Limits::default());
    let admin = Admin {
        registry: Arc::new(root),
        readiness: Readiness::default(),
        dump: {
            let limits = limits_rx.clone();
            let registry = registry.clone();
            let status = status_rx.clone();
            let proxies = discovery.proxies();
            let link = global.clone();
            let (trust, identity) = (state.trust.clone(), state.identity.clone());
            Arc::new(move || {
                let mut dump = registry.dump(&status.borrow());
                dump["proxies"] = proxies.dump();
                dump["federation"] = link.dump();
                dump["ca"] = trust.dump(&identity);
                // This cluster's budget and demand per global rate limit, as reported.
                dump["global_rate_limits"] = limits
                    .borrow()
                    .iter()
                    .map(|(key, d)| {
                        (
                            key.clone(),
                            serde_json::json!({"budget_rps": d.budget_rps, "demand_rps": d.demand_rps}),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                dump
            })
        },
        logging: None,
        explain: None,
    };
    let admin = AdminServer::bind(config.admin_addr, config.metrics_addr, admin)
        .await
        .with_context(|| format!("binding controller admin on {}", config.admin_addr))?;
    let bound_grpc = grpc.local_addr()?;
    let admin_address = admin.address();

    // Sidecars asking for their first certificate have none yet; discovery checks for one.
    let auth = isthmus_core::tls::ClientAuth::Optional(PeerPolicy::TrustDomain(
        state.trust_domain.clone(),
    ));
    let tls = state
        .identity
        .server_config(auth, &[isthmus_core::tls::ALPN_H2]);
    running.spawn(keeper.run(config_tx, status_tx, leader));
    running.spawn(admin.run(drain.clone()));
    running.spawn(registry.clone().run(config.push_debounce));
    running.spawn(jwks.run());
    let link = federation::Link {
        addresses: config.federation_addrs.clone(),
        cluster: config.cluster.clone(),
        identity: state.identity.clone(),
        federation: PeerPolicy::OneOf(vec![isthmus_core::identity::SpiffeId::new(
            &state.trust_domain,
            isthmus_core::identity::SYSTEM_NAMESPACE,
            "isthmus-federation",
        )]),
    };
    running.spawn(trust::follow(
        config.clone(),
        state.trust.clone(),
        state.identity.clone(),
        global.clone(),
        trust_metrics,
    ));
    running.spawn(global.clone().persist());
    let (trust_tx, trust_rx) = watch::channel(Default::default());
    running.spawn(federation::report_trust(
        discovery.proxies(),
        state.trust.clone(),
        trust_tx,
    ));
    running.spawn(federation::report_limits(
        discovery.proxies(),
        registry.snapshots(),
        limits_tx,
    ));
    let reports = federation::Reports {
        trust: trust_rx,
        links: registry.unreachable(),
        limits: limits_rx,
    };
    running.spawn(link.run(registry.exports(), reports, global));
    running.spawn(async move {
        let incoming = isthmus_core::grpc::tls_incoming(grpc, tls, drain.clone());
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(
                isthmus_proto::discovery::discovery_server::DiscoveryServer::new(discovery)
                    .max_encoding_message_size(isthmus_core::grpc::MAX_MESSAGE_BYTES),
            )
            .add_service(
                isthmus_proto::ca::certificate_authority_server::CertificateAuthorityServer::new(
                    ca,
                ),
            )
            .serve_with_incoming_shutdown(incoming, async move { drain.signaled().await })
            .await;
        tracing::error!(?result, "controller gRPC server stopped");
    });
    tracing::info!(cluster = %config.cluster, grpc = %bound_grpc, admin = %admin_address, "controller started");
    Ok(Bound {
        grpc_address: bound_grpc,
        admin_address,
        running,
    })
}

fn config_metrics(metrics: &mut Registry, status: watch::Receiver<LoadStatus>) {
    use prometheus_client::metrics::gauge::ConstGauge;
    // Counters read at scrape time from the watcher's status.
    #[derive(Debug)]
    struct ConfigCounters(watch::Receiver<LoadStatus>);
    impl prometheus_client::collector::Collector for ConfigCounters {
        fn encode(
            &self,
            mut encoder: prometheus_client::encoding::DescriptorEncoder,
        ) -> Result<(), std::fmt::Error> {
            use prometheus_client::encoding::EncodeMetric;
            let s = self.0.borrow().clone();
            let rejected = ConstGauge::new(s.rejected as i64);
            let e = encoder.encode_descriptor(
                "config_rejected",
                "config changes rejected since start",
                None,
                rejected.metric_type(),
            )?;
            rejected.encode(e)?;
            let accepted = ConstGauge::new(s.accepted as i64);
            let e = encoder.encode_descriptor(
                "config_accepted",
                "config sets accepted since start",
                None,
                accepted.metric_type(),
            )?;
            accepted.encode(e)?;
            // The faults of the serving config, by code: what keeps objects out (errors)
            // and what they refer to that is missing or ignored (warnings).
            let mut by_code: std::collections::BTreeMap<(&'static str, &'static str), i64> =
                Default::default();
            for e in s.last_errors.iter().flat_map(|e| e.0.iter()) {
                *by_code.entry((e.code.as_str(), "error")).or_default() += 1;
            }
            for w in &s.warnings {
                *by_code.entry((w.code.as_str(), "warning")).or_default() += 1;
            }
            let mut family = encoder.encode_descriptor(
                "config_faults",
                "faults of the serving config by analyzer code: errors keep an object out, warnings do not",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for ((code, severity), n) in by_code {
                let labels = [("code", code), ("severity", severity)];
                ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
            }
            Ok(())
        }
    }
    metrics.register_collector(Box::new(ConfigCounters(status)));
}
