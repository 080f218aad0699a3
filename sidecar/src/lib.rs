//! The Isthmus sidecar: the proxy next to each workload.
//!
//! In: the app's outbound requests on the explicit outbound listener (plain HTTP/1.1 or
//! HTTP/2, the Host header names the mesh service); other proxies' mTLS HTTP/2 connections
//! on the inbound tunnel listener (15008); config pushed by the cluster controller; a
//! workload certificate from the cluster CA.
//! Out: requests to peers over one multiplexed mTLS connection per peer (direct in the
//! cluster, through the east-west gateway across clusters, end-to-end TLS either way);
//! inbound requests to the local app with the caller's SPIFFE ID; the app's health to the
//! controller; metrics and config on the admin port (15000).

mod access_log;
mod app;
mod attempt;
mod authz;
mod body;
mod breaker;
pub mod capture;
mod convert;
pub mod dns;
mod egress;
mod errors;
mod explain;
mod ext_authz;
mod global_limit;
mod health_check;
mod inbound;
pub mod ingress;
mod lb;
mod metrics;
mod origination;
mod outbound;
mod peer;
mod pool;
mod routing_table;
mod spans;
mod state;
mod store;
mod telemetry;
mod telemetry_policy;
mod upgrade;
pub mod wasm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::admin::{Admin, AdminServer, LogControl};
use isthmus_core::ca_client::CaClient;
use isthmus_core::config::NamespacedName;
use isthmus_core::identity::SpiffeId;
use isthmus_core::locality::Locality;
use isthmus_core::readiness::Readiness;
use isthmus_core::tls::{PeerPolicy, ALPN_H2};
use isthmus_core::xds::XdsClient;
use isthmus_proto::discovery::{HealthReport, Node};
use isthmus_proto::type_url;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the app's port is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Static config of a sidecar.
#[derive(Clone)]
pub struct Config {
    pub cluster: String,
    pub trust_domain: String,
    /// The WorkloadEntry this sidecar serves.
    pub workload: NamespacedName,
    pub service_account: String,
    /// The workload's locality, for locality-aware load balancing.
    pub locality: Locality,
    pub controller_addr: SocketAddr,
    /// PEM roots to verify the controller before the first certificate.
    pub bootstrap: isthmus_core::ca_client::Roots,
    /// Proof of the workload's identity on first issue: a bootstrap token, or the pod's
    /// projected service-account token file.
    pub token: Option<isthmus_core::ca_client::Token>,
    /// Outbound listener: the app's HTTP proxy, and where capture redirects the pod's
    /// outbound TCP (15001; see `capture`).
    pub outbound_addr: SocketAddr,
    /// Where capture redirects the pod's inbound TCP (15006): plaintext from callers
    /// outside the mesh, handed to the port it was going to. `None` without capture.
    pub capture_inbound_addr: Option<SocketAddr>,
    /// The DNS proxy (15053, UDP and TCP; see `dns`), `None` for none.
    pub dns_addr: Option<SocketAddr>,
    /// Where the DNS proxy sends names outside the mesh; empty for none.
    pub dns_upstream: Vec<SocketAddr>,
    /// mTLS tunnel listener (15008).
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// A listener serving only `/ready` and `/stats/prometheus`, for scrapers on other
    /// hosts (the admin listener itself belongs on loopback).
    pub metrics_addr: Option<SocketAddr>,
    /// The local app, `None` for a workload that only calls out.
    pub app_addr: Option<SocketAddr>,
    /// Changes the process log filter from `/logging`.
    pub log_control: Option<LogControl>,
    /// Header limits, timeouts, path normalization and allowed upgrades.
    pub limits: ingress::Limits,
    /// OTLP export (traces, metrics, access logs) and access logs to standard output.
    pub telemetry: isthmus_core::otlp::TelemetryConfig,
}

pub struct Bound {
    pub outbound_address: SocketAddr,
    pub inbound_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub readiness: Readiness,
    running: isthmus_core::drain::Running,
}

impl Bound {
    pub async fn wait_termination(&mut self) -> anyhow::Result<()> {
        self.running.wait_any().await;
        anyhow::bail!("sidecar task ended")
    }

    /// Stops the sidecar as if its process died.
    pub fn abort(self) {
        self.running.abort();
    }

    /// Stops accepting, lets open connections finish until `deadline`, then stops.
    pub async fn shutdown(self, deadline: std::time::Duration) {
        let cut = self.running.shutdown(deadline).await;
        tracing::info!(cut_off = cut, "drained");
    }
}

/// Binds every listener, then starts the sidecar: certificate first, then config, then
/// traffic. `/ready` on the admin port tells when it serves.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let outbound = TcpListener::bind(config.outbound_addr)
        .await
        .with_context(|| format!("binding outbound listener on {}", config.outbound_addr))?;
    let inbound = TcpListener::bind(config.inbound_addr)
        .await
        .with_context(|| format!("binding inbound listener on {}", config.inbound_addr))?;
    let captured_inbound = match config.capture_inbound_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the inbound capture listener on {addr}"))?,
        ),
        None => None,
    };
    let dns_sockets = match config.dns_addr {
        Some(addr) => Some((
            tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the DNS proxy on {addr} (UDP)"))?,
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the DNS proxy on {addr} (TCP)"))?,
        )),
        None => None,
    };
    let readiness = Readiness::default();
    let cert_block = readiness.register("workload certificate");
    let config_block = readiness.register("first config");
    let mut registry = prometheus_client::registry::Registry::default();
    isthmus_core::admin::register_build(&mut registry, "proxy");
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.register(&mut registry);
    let plugins = wasm::Plugins::new(&config.workload, &config.cluster, &mut registry)?;
    let health = Arc::new(lb::HealthTable::default());
    let certificate: Arc<std::sync::OnceLock<isthmus_core::tls::TlsIdentity>> = Arc::default();
    let own = store::Own {
        pod: config.workload.name.clone(),
        id: SpiffeId::new(
            &config.trust_domain,
            &config.workload.namespace,
            &config.service_account,
        ),
        cluster: config.cluster.clone(),
        workloads: metrics.workloads.clone(),
    };
    let store = Arc::new(store::Store::new(own, health));
    let admin = Admin {
        registry: Arc::new(registry),
        readiness: readiness.clone(),
        dump: {
            let (store, cfg, cert, plugins) = (
                store.clone(),
                config.clone(),
                certificate.clone(),
                plugins.clone(),
            );
            Arc::new(move || {
                let mut d = dump(&cfg, &store.current(), cert.get());
                d["wasm_plugins"] = plugins.dump();
                d
            })
        },
        logging: config.log_control.clone(),
        explain: Some({
            let (store, cfg) = (store.clone(), config.clone());
            Arc::new(move |query: &str| explain::explain(&cfg, &store.current(), query))
        }),
    };
    let admin = AdminServer::bind(config.admin_addr, config.metrics_addr, admin)
        .await
        .with_context(|| format!("binding admin listener on {}", config.admin_addr))?;
    plugins.call_through(outbound.local_addr()?);
    let bound_addrs = (
        outbound.local_addr()?,
        inbound.local_addr()?,
        admin.address(),
    );
    let (mut running, drain) = isthmus_core::drain::Running::new();
    running.spawn(admin.run(drain.clone()));
    if let Some((udp, tcp)) = dns_sockets {
        // Names are answered from the first config on; until then, all go upstream.
        let proxy = dns::DnsProxy::new(store.subscribe(), &config.dns_upstream, metrics.clone());
        running.spawn(proxy.serve(udp, tcp));
    }
    let ca = CaClient {
        address: config.controller_addr,
        controller: SpiffeId::controller(&config.trust_domain, &config.cluster),
        bootstrap: config.bootstrap.clone(),
        token: config.token.clone(),
        identity: SpiffeId::new(
            &config.trust_domain,
            &config.workload.namespace,
            &config.service_account,
        ),
    };
    let otlp = match &config.telemetry.otlp {
        Some(o) => Some(
            isthmus_core::otlp::Otlp::start(&resource(o, &config))
                .context("starting OTLP export")?,
        ),
        None => None,
    };
    if let Some(o) = &otlp {
        use opentelemetry::metrics::MeterProvider as _;
        metrics.export_otlp(&o.metrics.meter("isthmus-sidecar"));
    }
    let flags = Arc::new(telemetry_policy::from_flags(
        config.telemetry.access_log,
        otlp.as_ref(),
        &metrics.access_log_dropped,
    )?);
    let telemetry = Arc::new(telemetry::Telemetry::new(metrics.clone(), flags.clone()));
    running.spawn(plugins.clone().follow(store.subscribe()));
    running.spawn(telemetry_policy::follow(
        store.subscribe(),
        telemetry.clone(),
        telemetry_policy::Builder::new(
            resource(&isthmus_core::otlp::Config::default(), &config).resource,
            flags,
            metrics.access_log_dropped.clone(),
            drain.clone(),
        ),
    ));
    if let Some(o) = otlp {
        // Buffered spans, metrics and logs go out before the process ends.
        running.finally(o.shutdown());
    }
    let cfg = config.clone();
    running.spawn(async move {
        let identity = ca.fetch_until_issued().await;
        let _ = certificate.set(identity.clone());
        drop(cert_block);
        let mut tasks = tokio::task::JoinSet::new();
        let renew_now = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(
            ca.clone()
                .renew_forever(identity.clone(), renew_now.clone()),
        );
        let app_health = cfg.app_addr.map(|app| {
            let (tx, rx) = watch::channel(HealthReport::default());
            tasks.spawn(probe_app(app, tx.clone()));
            tasks.spawn(health_check::run(
                store.subscribe(),
                cfg.workload.to_string(),
                app,
                metrics.clone(),
                tx,
            ));
            rx
        });
        let global_limits = Arc::new(global_limit::GlobalLimits::default());
        let (demand_tx, demand_rx) = tokio::sync::watch::channel(Default::default());
        let channel = isthmus_core::grpc::tls_channel(
            cfg.controller_addr,
            identity.client_config(PeerPolicy::OneOf(vec![ca.controller.clone()]), &[ALPN_H2]),
        );
        let xds = XdsClient {
            channel,
            node: Node {
                cluster: cfg.cluster.clone(),
                role: "sidecar".into(),
                workload: cfg.workload.to_string(),
                ..Default::default()
            },
            types: vec![type_url::MESH, type_url::SERVICE, type_url::WORKLOAD],
            handler: isthmus_core::proxy_trust::FollowTrust::new(
                store.clone(),
                identity.clone(),
                renew_now,
            ),
            health: app_health,
            certificate: Some(identity.subscribe()),
            peer_links: None,
            demand: Some(demand_rx),
            first_config: Some(config_block),
        };
        tasks.spawn(xds.run());
        tasks.spawn(global_limit::report(
            global_limits.clone(),
            store.subscribe(),
            cfg.workload.to_string(),
            demand_tx,
        ));
        let out_ctx = Arc::new(outbound::OutboundCtx {
            state: store.subscribe(),
            pool: pool::Pool::new(
                identity.clone(),
                drain.clone(),
                metrics.upstream_connections.clone(),
                cfg.limits.upstream_idle_timeout,
            ),
            locality: cfg.locality.clone(),
            metrics: metrics.clone(),
            telemetry: telemetry.clone(),
            drain: drain.clone(),
            limits: cfg.limits.clone(),
            plugins: plugins.clone(),
        });
        tasks.spawn(outbound::Outbound::new(outbound, out_ctx.clone(), drain.clone()).run());
        let in_ctx = Arc::new(inbound::InboundCtx::new(
            identity,
            &cfg,
            telemetry,
            store.subscribe(),
            drain.clone(),
            out_ctx,
            global_limits,
        ));
        if let Some(listener) = captured_inbound {
            tasks.spawn(capture::inbound(listener, in_ctx.clone(), drain.clone()));
        }
        tasks.spawn(inbound::Inbound::new(inbound, in_ctx, drain).run());
        tasks.join_next().await;
    });
    tracing::info!(workload = %config.workload, outbound = %bound_addrs.0, inbound = %bound_addrs.1, admin = %bound_addrs.2, "sidecar started");
    Ok(Bound {
        outbound_address: bound_addrs.0,
        inbound_address: bound_addrs.1,
        admin_address: bound_addrs.2,
        readiness,
        running,
    })
}

/// The OTLP config with this sidecar's resource: Istio names a proxy's service
/// `<workload>.<namespace>`.
fn resource(otlp: &isthmus_core::otlp::Config, config: &Config) -> isthmus_core::otlp::Config {
    let w = &config.workload;
    otlp.for_proxy(
        format!("{}.{}", w.name, w.namespace),
        "sidecar",
        &config.cluster,
        [
            ("service.instance.id", w.to_string()),
            ("k8s.namespace.name", w.namespace.clone()),
            ("k8s.pod.name", w.name.clone()),
        ],
    )
}

/// Probes the app's port and publishes whether it accepts connections.
/// Probes the app's port and keeps `report.healthy` to whether it accepts connections.
async fn probe_app(app: SocketAddr, report: watch::Sender<HealthReport>) {
    loop {
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(app)).await,
            Ok(Ok(_))
        );
        report.send_if_modified(|r| std::mem::replace(&mut r.healthy, up) != up);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

fn dump(
    config: &Config,
    state: &state::MeshState,
    identity: Option<&isthmus_core::tls::TlsIdentity>,
) -> serde_json::Value {
    let certificate = identity.map(|i| {
        let c = i.current();
        let secs = isthmus_core::admin::unix_seconds;
        serde_json::json!({"id": c.id.to_string(), "not_after": secs(c.not_after), "renew_at": secs(c.renew_at())})
    });
    let services: Vec<serde_json::Value> = state
        .services
        .values()
        .map(|s| {
            serde_json::json!({
                "service": &*s.host,
                "routes": s.routing.as_ref().map(|r| r.routes.len()).unwrap_or(0),
                "policy": s.routing.as_ref().map(|r| serde_json::to_value(&r.state.policy).unwrap_or_default()),
                "ports": s.ports.iter().map(|p| serde_json::json!({"port": p.port, "protocol": &*p.protocol})).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().map(|e| serde_json::json!({"workload": e.workload, "address": e.tunnel_address.to_string(), "locality": e.locality.to_string(), "ejected": e.health.is_ejected()})).collect::<Vec<_>>(),
                "unhealthy_endpoints": s.unhealthy.iter().map(|(w, why)| serde_json::json!({"workload": w, "because": why})).collect::<Vec<_>>(),
                "remote": s.remote.iter().map(|r| serde_json::json!({"cluster": &*r.cluster, "locality": r.locality.to_string(), "ejected": r.health.is_ejected(), "stale_since_unix": state.mesh.stale_since(&r.cluster), "unreachable_since_unix": state.mesh.unreachable.get(&*r.cluster)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "workload": config.workload.to_string(),
        "cluster": config.cluster,
        "locality": config.locality.to_string(),
        "gateway": state.mesh.gateway.as_ref().map(|g| g.0.to_string()),
        // Entries of other clusters kept but not kept current, and since when.
        "stale": {
            "federation_since_unix": state.mesh.federation_stale_since,
            "clusters_since_unix": state.mesh.cluster_stale_since,
        },
        "certificate": certificate,
        "services": services,
        "telemetry": telemetry_policy::dump(state.telemetry.as_deref()),
    })
}
