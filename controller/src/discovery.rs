//! The controller side of the discovery stream. Each proxy subscribes to resource types; the
//! controller sends what differs from what the proxy holds (its initial versions on connect,
//! then every change), reads ACKs/NACKs, and takes sidecars' health reports.
//!
//! Every response stays in flight until its ACK or NACK. A NACK names the resources the
//! proxy rejected: it kept its previous version of each, so the controller puts that back
//! as what the proxy holds, and does not send the rejected version again; the next version
//! of the resource goes out as soon as config changes it. The proxy applied the rest.
//!
//! A stream is authorized by the proxy's certificate: a sidecar may only speak for a
//! workload whose service account it holds, a gateway must hold the gateway identity.

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_core::config::NamespacedName;
use isthmus_core::identity::SpiffeId;
use isthmus_proto::discovery::discovery_server::Discovery;
use isthmus_proto::discovery::HealthReport;
use isthmus_proto::discovery::{DeltaRequest, DeltaResponse, Node, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::snapshot::{GatewayInfo, Registry, Snapshot};

/// Responses queued per stream before the sender waits for the proxy.
const RESPONSE_QUEUE: usize = 16;
/// Responses a proxy may leave unanswered; past this the oldest is taken as applied.
const MAX_IN_FLIGHT: usize = 256;

/// A response awaiting its ACK or NACK.
struct InFlight {
    type_url: String,
    sent_at: std::time::Instant,
    /// Name → what the proxy held before (its version, `None` if it had none); a rejected
    /// resource goes back to this.
    previous: BTreeMap<String, Option<String>>,
    /// Name → version sent (updates only).
    sent: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
}

#[derive(Clone)]
struct Metrics {
    connected: Gauge,
    pushes: Family<TypeLabel, Counter>,
    /// Bytes of resources pushed, to see what scoping (exportTo, Sidecar) saves.
    pushed_bytes: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    /// From a response's send to the proxy's ACK or NACK: how long config takes to land.
    answer_seconds: Family<TypeLabel, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connected: Gauge::default(),
            pushes: Family::default(),
            pushed_bytes: Family::default(),
            nacks: Family::default(),
            answer_seconds: Family::new_with_constructor(|| {
                // 1 ms to 16 s.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.001, 2.0, 15,
                ))
            }),
        }
    }
}

#[derive(Clone)]
pub struct DiscoveryService {
    cluster: String,
    registry: Registry,
    trust_domain: String,
    drain: isthmus_core::drain::Drain,
    metrics: Metrics,
    proxies: Arc<crate::syncz::Proxies>,
}

enum Role {
    /// A sidecar; `verified` when its WorkloadEntry is in config with the peer's service
    /// account. Only verified sidecars' streams and health reports count for endpoint
    /// health; an unknown workload still gets config.
    Sidecar {
        workload: NamespacedName,
        verified: bool,
    },
    Gateway(GatewayInfo),
}

/// Marks a sidecar's or a gateway's stream closed when the stream task ends, however it
/// ends.
struct StreamGuard {
    registry: Registry,
    workload: Option<NamespacedName>,
    gateway: Option<GatewayInfo>,
    connected: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.connected.dec();
        if let Some(w) = &self.workload {
            self.registry.stream_closed(w);
        }
        if let Some(g) = &self.gateway {
            self.registry.gateway_closed(g);
        }
    }
}

impl DiscoveryService {
    pub fn new(
        cluster: String,
        registry: Registry,
        trust_domain: String,
        drain: isthmus_core::drain::Drain,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let m = Metrics::default();
        metrics.register(
            "connected_proxies",
            "proxies with an open discovery stream",
            m.connected.clone(),
        );
        metrics.register("pushes", "responses pushed to proxies", m.pushes.clone());
        metrics.register("nacks", "responses proxies rejected", m.nacks.clone());
        metrics.register(
            "pushed_bytes",
            "bytes of resources pushed to proxies",
            m.pushed_bytes.clone(),
        );
        metrics.register(
            "answer_seconds",
            "time from a push to the proxy's ACK or NACK, by type",
            m.answer_seconds.clone(),
        );
        Self {
            cluster,
            registry,
            trust_domain,
            drain,
            metrics: m,
            proxies: Arc::default(),
        }
    }

    /// The connected proxies and their sync state.
    pub fn proxies(&self) -> Arc<crate::syncz::Proxies> {
        self.proxies.clone()
    }

    fn authorize(
        &self,
        node: &Node,
        peer: &SpiffeId,
        issuer: Option<&str>,
    ) -> Result<Role, Status> {
        if node.cluster != self.cluster {
            return Err(Status::permission_denied(format!(
                "proxy of cluster {} connected to the controller of {}",
                node.cluster, self.cluster
            )));
        }
        match node.role.as_str() {
            "gateway" => {
                if *peer != SpiffeId::gateway(&self.trust_domain) {
                    return Err(Status::permission_denied(format!(
                        "{peer} is not a gateway identity"
                    )));
                }
                // Only this cluster's CA makes this cluster's gateways: another cluster's
                // gateway certificate cannot register here and draw its traffic.
                if issuer != Some(self.cluster.as_str()) {
                    return Err(Status::permission_denied(format!(
                        "a gateway of cluster {} needs a certificate from its CA; this one was issued by {}",
                        self.cluster,
                        issuer.map_or("no cluster CA".to_owned(), |c| format!("cluster {c}'s CA"))
                    )));
                }
                let ok = node.tunnel_address.parse::<std::net::SocketAddr>().is_ok()
                    && node.quic_address.parse::<std::net::SocketAddr>().is_ok();
                if !ok {
                    return Err(Status::invalid_argument(
                        "gateway node must carry tunnel_address and quic_address as ip:port",
                    ));
                }
                Ok(Role::Gateway(GatewayInfo {
                    tunnel_address: node.tunnel_address.clone(),
                    quic_address: node.quic_address.clone(),
                    identity: peer.to_string(),
                }))
            }
            "sidecar" => {
                let (ns, name) = node.workload.split_once('/').ok_or_else(|| {
                    Status::invalid_argument("sidecar node.workload must be namespace/name")
                })?;
                let key = NamespacedName::new(ns, name);
                let config = self.registry.config();
                let (allowed, verified) = match config.workloads.get(&key) {
                    Some(w) => {
                        let ok = w.key.namespace == peer.namespace()
                            && w.service_account == peer.service_account();
                        (ok, ok)
                    }
                    None => (ns == peer.namespace(), false),
                };
                if !allowed {
                    return Err(Status::permission_denied(format!(
                        "{peer} may not speak for workload {key}"
                    )));
                }
                Ok(Role::Sidecar {
                    workload: key,
                    verified,
                })
            }
            other => Err(Status::invalid_argument(format!(
                "unknown proxy role `{other}`"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type DeltaResourcesStream = ReceiverStream<Result<DeltaResponse, Status>>;

    async fn delta_resources(
        &self,
        req: Request<Streaming<DeltaRequest>>,
    ) -> Result<Response<Self::DeltaResourcesStream>, Status> {
        let info = isthmus_core::grpc::peer_of(&req);
        let issuer = info.and_then(|p| p.issuer_cluster.clone());
        let peer = info
            .and_then(|p| p.identity.clone())
            .ok_or_else(|| Status::unauthenticated("discovery requires a workload certificate"))?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let node = first
            .node
            .clone()
            .ok_or_else(|| Status::invalid_argument("the first request must carry the node"))?;
        let role = self.authorize(&node, &peer, issuer.as_deref())?;
        let role_pending = match &role {
            Role::Sidecar {
                workload,
                verified: false,
            } => Some(workload.clone()),
            _ => None,
        };
        let (workload, gateway) = match role {
            Role::Sidecar {
                workload,
                verified: true,
            } => {
                self.registry.stream_opened(&workload);
                (Some(workload), None)
            }
            Role::Sidecar {
                verified: false, ..
            } => (None, None),
            Role::Gateway(info) => {
                self.registry.gateway_connected(info.clone());
                (None, Some(info))
            }
        };
        let pending = role_pending.map(|w| (w, peer.clone()));
        self.metrics.connected.inc();
        let guard = StreamGuard {
            registry: self.registry.clone(),
            workload,
            gateway,
            connected: self.metrics.connected.clone(),
        };
        tracing::info!(%peer, role = %node.role, workload = %node.workload, "proxy connected");
        let name = if node.workload.is_empty() {
            peer.to_string()
        } else {
            node.workload.clone()
        };
        let sync = self.proxies.connect(&name, &node.role, &peer.to_string());
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let stream = ProxyStream {
            svc: self.clone(),
            tx,
            known: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            rejected: BTreeMap::new(),
            answered: Default::default(),
            nonce: 0,
            guard,
            pending,
            last_health: None,
            scope: (node.role == "sidecar").then(|| node.workload.clone()),
            sync,
        };
        self.drain.spawn(stream.run(first, inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct ProxyStream {
    svc: DiscoveryService,
    tx: mpsc::Sender<Result<DeltaResponse, Status>>,
    /// Per subscribed type: name → version the proxy holds once every response in flight
    /// is applied.
    known: BTreeMap<String, BTreeMap<String, String>>,
    /// Responses not yet ACKed or NACKed, by nonce.
    in_flight: BTreeMap<u64, InFlight>,
    /// Per type: name → version the proxy rejected; not sent again.
    rejected: BTreeMap<String, BTreeMap<String, String>>,
    /// Types answered at least once on this stream (the first answer may be empty).
    answered: std::collections::BTreeSet<String>,
    nonce: u64,
    guard: StreamGuard,
    /// A sidecar whose WorkloadEntry was not in config yet: (workload, peer); verified as
    /// soon as config shows the workload with the peer's service account.
    pending: Option<(NamespacedName, SpiffeId)>,
    /// The last health the sidecar reported, applied once verified.
    last_health: Option<HealthReport>,
    /// The sidecar's workload (`namespace/name`), for its own Workload resource.
    scope: Option<String>,
    /// This stream's sync state, for `isthmus status`.
    sync: crate::syncz::ProxyHandle,
}

impl ProxyStream {
    /// Verifies a pending sidecar against the current config.
    fn try_verify(&mut self) {
        let Some((workload, peer)) = &self.pending else {
            return;
        };
        let config = self.svc.registry.config();
        let ok = config.workloads.get(workload).is_some_and(|w| {
            w.service_account == peer.service_account() && w.key.namespace == peer.namespace()
        });
        if ok {
            let workload = workload.clone();
            self.svc.registry.stream_opened(&workload);
            if let Some(h) = &self.last_health {
                self.svc.registry.report_health(&workload, h);
            }
            self.guard.workload = Some(workload);
            self.pending = None;
        }
    }

    async fn run(mut self, first: DeltaRequest, mut inbound: Streaming<DeltaRequest>) {
        let mut snapshots = self.svc.registry.snapshots();
        let mut snapshot = snapshots.borrow_and_update().clone();
        if self.on_request(first, &snapshot).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                // Draining: end the stream; the proxy reconnects to another controller.
                _ = self.svc.drain.draining() => return,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => if self.on_request(req, &snapshot).await.is_err() { return },
                    Ok(None) | Err(_) => break,
                },
                changed = snapshots.changed() => {
                    if changed.is_err() { break }
                    snapshot = snapshots.borrow_and_update().clone();
                    self.try_verify();
                    let types: Vec<String> = self.known.keys().cloned().collect();
                    for t in types {
                        if self.push(&t, &snapshot).await.is_err() { return }
                    }
                }
            }
        }
        tracing::info!(workload = ?self.guard.workload, "proxy disconnected");
    }

    async fn on_request(
        &mut self,
        mut req: DeltaRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), ()> {
        if let Some(health) = req.health.take() {
            match &self.guard.workload {
                Some(w) => self.svc.registry.report_health(w, &health),
                None => {
                    self.last_health = Some(health);
                    self.try_verify();
                }
            }
        }
        if let Some(c) = req.certificate.take() {
            self.sync.certificate(c);
        }
        // Demand counts only from sidecars proven to be a workload of this cluster, and
        // only in bounds: it moves budget between clusters.
        if let (Some(d), Some(_)) = (req.demand.take(), &self.guard.workload) {
            if d.offered_rps.len() <= MAX_DEMAND_KEYS {
                let offered = d
                    .offered_rps
                    .into_iter()
                    .filter(|(k, rps)| k.len() <= 512 && rps.is_finite() && *rps >= 0.0)
                    .map(|(k, rps)| (k, rps.min(MAX_DEMAND_RPS)))
                    .collect();
                self.sync.demand(offered);
            }
        }
        if let (Some(links), Some(gw)) = (req.peer_links.take(), &self.guard.gateway) {
            self.svc.registry.gateway_links(gw, &links.down);
        }
        if req.type_url.is_empty() {
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.on_answer(&req);
            return Ok(());
        }
        // A subscription: the proxy tells what it already holds.
        self.sync.subscribed(&req.type_url);
        self.known
            .insert(req.type_url.clone(), req.initial_resource_versions);
        self.push(&req.type_url, snapshot).await
    }

    /// Responses of `type_url` awaiting an answer.
    fn waiting(&self, type_url: &str) -> usize {
        self.in_flight
            .values()
            .filter(|f| f.type_url == type_url)
            .count()
    }

    /// An ACK settles a response; a NACK puts back what the proxy kept of each rejected
    /// resource and remembers the rejected version.
    fn on_answer(&mut self, req: &DeltaRequest) {
        let Some(sent) = req
            .response_nonce
            .parse::<u64>()
            .ok()
            .and_then(|n| self.in_flight.remove(&n))
        else {
            return;
        };
        let label = TypeLabel {
            type_url: sent.type_url.clone(),
        };
        self.svc
            .metrics
            .answer_seconds
            .get_or_create(&label)
            .observe(sent.sent_at.elapsed().as_secs_f64());
        let waiting = self.waiting(&sent.type_url);
        if req.error_detail.is_empty() {
            self.sync.answered(&sent.type_url, waiting, None);
            return;
        }
        self.sync
            .answered(&sent.type_url, waiting, Some(&req.error_detail));
        self.svc
            .metrics
            .nacks
            .get_or_create(&TypeLabel {
                type_url: sent.type_url.clone(),
            })
            .inc();
        tracing::warn!(type_url = %sent.type_url, workload = ?self.guard.workload, rejected = ?req.rejected_resources, reason = %req.error_detail, "proxy rejected config (NACK)");
        // A proxy that names nothing rejected the response whole.
        let names: Vec<&String> = if req.rejected_resources.is_empty() {
            sent.sent.keys().collect()
        } else {
            req.rejected_resources.iter().collect()
        };
        let known = self.known.entry(sent.type_url.clone()).or_default();
        let rejected = self.rejected.entry(sent.type_url.clone()).or_default();
        for name in names {
            let Some(version) = sent.sent.get(name) else {
                continue;
            };
            // Unless a later response changed it again, the proxy holds its old version.
            if known.get(name) == Some(version) {
                match sent.previous.get(name).cloned().flatten() {
                    Some(old) => known.insert(name.clone(), old),
                    None => known.remove(name),
                };
            }
            rejected.insert(name.clone(), version.clone());
        }
    }

    async fn push(&mut self, type_url: &str, snapshot: &Snapshot) -> Result<(), ()> {
        let empty = BTreeMap::new();
        let all = snapshot.resources.get(type_url).unwrap_or(&empty);
        // A sidecar gets only its own WorkloadEntry, and the services its namespace may
        // see (Istio's exportTo); gateways get every service.
        let scoped: BTreeMap<String, (String, bytes::Bytes)>;
        let current = match (type_url, self.scope.as_deref()) {
            (isthmus_proto::type_url::WORKLOAD, own) => {
                let own = own.unwrap_or_default();
                scoped = match all.get(own) {
                    Some(w) => [(own.to_owned(), w.clone())].into(),
                    // A proxy with no WorkloadEntry still learns what the Sidecar of its
                    // namespace says about hosts outside the registry, and the policies
                    // and telemetry of its namespace and the mesh.
                    None => unlisted_workload(snapshot, own, &self.svc.trust_domain)
                        .into_iter()
                        .collect(),
                };
                &scoped
            }
            // Without exportTo or Sidecars every service is for everyone: nothing to copy.
            (isthmus_proto::type_url::SERVICE, Some(own))
                if !snapshot.export_to.is_empty()
                    || !snapshot.config.sidecars.is_empty()
                    || !snapshot.views.is_empty() =>
            {
                let workload = own
                    .split_once('/')
                    .map(|(ns, name)| NamespacedName::new(ns, name))
                    .unwrap_or_else(|| NamespacedName::new("", own));
                let no_labels = BTreeMap::new();
                let labels = snapshot.labels.get(&workload).unwrap_or(&no_labels);
                let scope = isthmus_core::config::sidecar::scope_for(
                    &snapshot.config.sidecars,
                    &workload.namespace,
                    labels,
                );
                scoped = all
                    .iter()
                    .filter(|(name, _)| {
                        let Some((owner, svc)) = name.split_once('/') else {
                            return true;
                        };
                        let exported = snapshot.export_to.get(*name).is_none_or(|to| {
                            isthmus_core::config::visible(to, owner, &workload.namespace)
                        });
                        let serves = snapshot
                            .serves
                            .get(&workload)
                            .is_some_and(|own| own.contains(*name));
                        exported
                            && (serves
                                || scope.is_none_or(|s| {
                                    let hosts =
                                        snapshot.hosts.get(*name).map(Vec::as_slice).unwrap_or(&[]);
                                    s.allows(&NamespacedName::new(owner, svc), hosts)
                                }))
                    })
                    .map(|(n, v)| {
                        // A VirtualService or DestinationRule exported to some namespaces
                        // only: this namespace's view.
                        let view = snapshot
                            .views
                            .get(n)
                            .and_then(|views| views.for_namespace(&workload.namespace));
                        (n.clone(), view.unwrap_or(v).clone())
                    })
                    .collect();
                &scoped
            }
            _ => all,
        };
        let known = self.known.entry(type_url.to_owned()).or_default();
        let rejected = self.rejected.entry(type_url.to_owned()).or_default();
        let resources: Vec<Resource> = current
            .iter()
            .filter(|(name, (version, _))| {
                known.get(*name) != Some(version) && rejected.get(*name) != Some(version)
            })
            .map(|(name, (version, body))| Resource {
                name: name.clone(),
                version: version.clone(),
                body: body.to_vec(),
            })
            .collect();
        let removed: Vec<String> = known
            .keys()
            .filter(|n| !current.contains_key(*n))
            .cloned()
            .collect();
        rejected.retain(|name, _| current.contains_key(name));
        let first_push = self.answered.insert(type_url.to_owned());
        if resources.is_empty() && removed.is_empty() && !first_push {
            return Ok(());
        }
        let runs = isthmus_core::grpc::chunk_by_size(resources, isthmus_core::grpc::CHUNK_BYTES);
        let last = runs.len() - 1;
        let mut removed = Some(removed);
        for (i, resources) in runs.into_iter().enumerate() {
            let removed = removed.take().unwrap_or_default();
            let mut flight = InFlight {
                type_url: type_url.to_owned(),
                sent_at: std::time::Instant::now(),
                previous: BTreeMap::new(),
                sent: BTreeMap::new(),
            };
            for r in &resources {
                flight.previous.insert(
                    r.name.clone(),
                    known.insert(r.name.clone(), r.version.clone()),
                );
                flight.sent.insert(r.name.clone(), r.version.clone());
            }
            for name in &removed {
                flight.previous.insert(name.clone(), known.remove(name));
            }
            self.nonce += 1;
            self.in_flight.insert(self.nonce, flight);
            while self.in_flight.len() > MAX_IN_FLIGHT {
                self.in_flight.pop_first();
            }
            let resp = DeltaResponse {
                system_version_info: String::new(),
                type_url: type_url.to_owned(),
                resources,
                removed_resources: removed,
                nonce: self.nonce.to_string(),
                more: i < last,
            };
            let label = TypeLabel {
                type_url: type_url.to_owned(),
            };
            self.svc.metrics.pushes.get_or_create(&label).inc();
            let waiting = self
                .in_flight
                .values()
                .filter(|f| f.type_url == type_url)
                .count();
            self.sync.pushed(type_url, waiting);
            let bytes: usize = resp.resources.iter().map(|r| r.body.len()).sum();
            self.svc
                .metrics
                .pushed_bytes
                .get_or_create(&label)
                .inc_by(bytes as u64);
            self.tx.send(Ok(resp)).await.map_err(|_| ())?;
        }
        Ok(())
    }
}

/// Global rate limits one sidecar may report demand for, at most.
const MAX_DEMAND_KEYS: usize = 64;
/// The demand one sidecar may report for a limit, at most (requests per second).
const MAX_DEMAND_RPS: f64 = 1e7;

/// The Workload resource of a sidecar whose workload has no WorkloadEntry, when there is
/// something to tell it: `ALLOW_ANY` from the Sidecar of its namespace (it has no labels for
/// a selector to pick).
fn unlisted_workload(
    snapshot: &Snapshot,
    own: &str,
    trust_domain: &str,
) -> Option<(String, (String, bytes::Bytes))> {
    let (namespace, _) = own.split_once('/')?;
    let none = BTreeMap::new();
    let allow_any =
        isthmus_core::config::sidecar::scope_for(&snapshot.config.sidecars, namespace, &none)
            .is_some_and(|s| s.allow_any);
    let config = &snapshot.config;
    let mut inbound = isthmus_core::config::security::inbound_for(config, namespace, &none, &[]);
    crate::jwks::fill(&snapshot.jwks, &mut inbound);
    isthmus_core::config::security::alias_trust_domains(
        &mut inbound,
        trust_domain,
        &config.mesh.trust_domain_aliases,
    );
    let msg = isthmus_proto::discovery::Workload {
        name: own.to_owned(),
        allow_any,
        inbound: Some(inbound),
        telemetry: isthmus_core::config::telemetry::policy_for(config, namespace, &none, &[]),
        wasm_plugins: isthmus_core::config::wasm_plugin::plugins_for(config, namespace, &none, &[]),
        ..Default::default()
    };
    Some((own.to_owned(), crate::snapshot::encode(&msg)))
}
