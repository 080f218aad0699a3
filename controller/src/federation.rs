//! The controller's link to the federation: one mTLS stream that sends this cluster's
//! exports and receives the merged global registry, both as the whole state first and then
//! as deltas (only the services that changed), in messages of bounded size. The last
//! registry is kept on disk, so a controller restarted while the federation is down still
//! routes across clusters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_core::backoff::Backoff;
use isthmus_core::grpc::{chunk_by_size, CHUNK_BYTES, MAX_MESSAGE_BYTES};
use isthmus_core::tls::{PeerPolicy, TlsIdentity, ALPN_H2};
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::{
    ClusterExports, ExportUpdate, ExportedService, Gateway, GatewayLinks, GatewaySet,
    GlobalRegistry, GlobalService, LimitDemand, LimitDemands, RegistryMeta, RegistryUpdate,
    TrustReport,
};
use prost::Message;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

const REGISTRY_FILE: &str = "global-registry.pb";
const EXPORT_QUEUE: usize = 16;
/// At most one write of the state file per this interval (a quiet change is written at once).
const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// Services one registry batch may carry (a bound on what the federation makes us buffer).
const MAX_BATCH_SERVICES: usize = 200_000;

/// A service's key in the registry maps: `namespace/name`.
fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The merged registry as this cluster sees it: every other cluster's exports.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Global {
    pub version: u64,
    /// By `namespace/name`.
    pub services: BTreeMap<String, Arc<GlobalService>>,
    pub meta: Arc<RegistryMeta>,
    /// Since when (Unix seconds) the federation is unreachable, so that every entry of
    /// other clusters is as of then; `None` while linked. Not kept on disk.
    pub federation_down_since: Option<u64>,
}

impl Global {
    fn encode(&self) -> Vec<u8> {
        GlobalRegistry {
            version: self.version,
            services: self.services.values().map(|s| (**s).clone()).collect(),
            meta: Some((*self.meta).clone()),
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let r = GlobalRegistry::decode(bytes).ok()?;
        Some(Self {
            version: r.version,
            services: r
                .services
                .into_iter()
                .map(|s| (service_key(&s.namespace, &s.name), Arc::new(s)))
                .collect(),
            meta: Arc::new(r.meta.unwrap_or_default()),
            federation_down_since: None,
        })
    }

    /// Applies one whole batch from the federation.
    fn apply(&mut self, batch: Vec<RegistryUpdate>) {
        for update in batch {
            if update.reset {
                self.services.clear();
                self.meta = Arc::default();
            }
            self.version = update.version;
            for key in update.withdrawn {
                self.services.remove(&key);
            }
            for bytes in update.upserted {
                match GlobalService::decode(bytes) {
                    Ok(s) => {
                        self.services
                            .insert(service_key(&s.namespace, &s.name), Arc::new(s));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a service from the federation does not decode; skipped")
                    }
                }
            }
            if let Some(meta) = update.meta {
                self.meta = Arc::new(meta);
            }
        }
    }
}

/// The latest global registry, kept on disk.
pub struct GlobalState {
    tx: watch::Sender<Arc<Global>>,
    path: PathBuf,
    dirty: Arc<Notify>,
    link: std::sync::Mutex<LinkStatus>,
    metrics: LinkMetrics,
}

/// Whether the federation is reachable, since when, and when its registry last came: what
/// `isthmus status`, the config dump and the metrics say of how fresh the cross-cluster
/// entries are.
#[derive(Clone, Copy, Debug)]
pub struct LinkStatus {
    pub connected: bool,
    /// When `connected` last changed (the controller's start, before the first attempt).
    pub since: std::time::SystemTime,
    /// When the last registry update was applied; `None` before any in this process.
    pub last_update: Option<std::time::SystemTime>,
    /// The federation address of the open (or last) stream.
    pub address: Option<SocketAddr>,
}

#[derive(Clone, Default)]
struct LinkMetrics {
    connected: prometheus_client::metrics::gauge::Gauge,
    since: prometheus_client::metrics::gauge::Gauge,
    last_update: prometheus_client::metrics::gauge::Gauge,
}

use isthmus_core::admin::unix_seconds;

impl GlobalState {
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(REGISTRY_FILE);
        let initial = std::fs::read(&path)
            .ok()
            .and_then(|b| Global::decode(&b))
            .unwrap_or_default();
        if initial.version > 0 {
            tracing::info!(
                version = initial.version,
                services = initial.services.len(),
                "loaded the last global registry from disk"
            );
        }
        let now = std::time::SystemTime::now();
        let metrics = LinkMetrics::default();
        metrics.since.set(unix_seconds(now) as i64);
        let initial = Global {
            federation_down_since: Some(unix_seconds(now)),
            ..initial
        };
        Self {
            tx: watch::Sender::new(Arc::new(initial)),
            path,
            dirty: Arc::default(),
            link: std::sync::Mutex::new(LinkStatus {
                connected: false,
                since: now,
                last_update: None,
                address: None,
            }),
            metrics,
        }
    }

    /// Registers the link's metrics (`federation_connected`, `federation_since_...`,
    /// `federation_last_update_...`) in the controller's registry.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = &self.metrics;
        registry.register(
            "federation_connected",
            "1 while the stream to the federation is up",
            m.connected.clone(),
        );
        registry.register(
            "federation_state_since_timestamp_seconds",
            "when the stream to the federation last went up or down",
            m.since.clone(),
        );
        registry.register(
            "federation_last_update_timestamp_seconds",
            "when the last global registry update came from the federation",
            m.last_update.clone(),
        );
    }

    pub fn link(&self) -> LinkStatus {
        *self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link, for `/config_dump`: `stale_since` names when cross-cluster entries
    /// stopped being kept current.
    pub fn dump(&self) -> serde_json::Value {
        let l = self.link();
        serde_json::json!({
            "connected": l.connected,
            "since_unix": unix_seconds(l.since),
            "last_update_unix": l.last_update.map(unix_seconds),
            "stale_since_unix": (!l.connected).then(|| unix_seconds(l.since)),
            "address": l.address.map(|a| a.to_string()),
            "clusters_stale_since_unix": self.tx.borrow().meta.stale_since_unix,
        })
    }

    fn set_connected(&self, connected: bool) {
        let mut l = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if l.connected != connected {
            l.connected = connected;
            l.since = std::time::SystemTime::now();
            self.metrics.connected.set(i64::from(connected));
            self.metrics.since.set(unix_seconds(l.since) as i64);
            let down = (!connected).then(|| unix_seconds(l.since));
            self.tx
                .send_modify(|g| Arc::make_mut(g).federation_down_since = down);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Global>> {
        self.tx.subscribe()
    }

    fn apply(&self, batch: Vec<RegistryUpdate>) {
        // Marked first: whoever wakes on the new registry sees it as heard in this run.
        let now = std::time::SystemTime::now();
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_update = Some(now);
        self.metrics.last_update.set(unix_seconds(now) as i64);
        self.tx.send_modify(|g| Arc::make_mut(g).apply(batch));
        self.dirty.notify_one();
    }

    /// Keeps the registry on disk, written behind changes; runs until dropped.
    pub async fn persist(self: Arc<Self>) {
        let (path, dirty) = (self.path.clone(), self.dirty.clone());
        isthmus_core::fsutil::write_behind(path, PERSIST_INTERVAL, dirty, move || {
            self.tx.borrow().encode()
        })
        .await
    }
}

/// One batch of export messages: `upserted` in chunks, the rest in the first message.
fn export_batch(
    cluster: &str,
    reset: bool,
    upserted: Vec<ExportedService>,
    withdrawn: Vec<String>,
    gateways: Option<Vec<Gateway>>,
    (mut trust, mut links, mut limits): (
        Option<TrustReport>,
        Option<GatewayLinks>,
        Option<LimitDemands>,
    ),
) -> Vec<ExportUpdate> {
    let runs = chunk_by_size(upserted, CHUNK_BYTES);
    let last = runs.len() - 1;
    let (mut withdrawn, mut gateways) = (Some(withdrawn), gateways);
    runs.into_iter()
        .enumerate()
        .map(|(i, run)| ExportUpdate {
            cluster: cluster.to_owned(),
            reset,
            upserted: run,
            withdrawn: withdrawn.take().unwrap_or_default(),
            gateways: gateways.take().map(|gateways| GatewaySet { gateways }),
            trust: trust.take(),
            links: links.take(),
            limits: limits.take(),
            more: i < last,
        })
        .collect()
}

/// What the federation has been sent on this stream, to send only what changes.
#[derive(Default)]
struct Sent {
    services: BTreeMap<String, ExportedService>,
    gateways: Vec<Gateway>,
    trust: TrustReport,
    links: BTreeMap<String, u64>,
    limits: Limits,
}

/// Each global rate limit's budget and demand in this cluster, by key.
pub type Limits = BTreeMap<String, LimitDemand>;

/// What the controller reports besides its exports, each as it changes.
#[derive(Clone)]
pub struct Reports {
    pub trust: watch::Receiver<TrustReport>,
    pub links: watch::Receiver<BTreeMap<String, u64>>,
    pub limits: watch::Receiver<Limits>,
}

/// The reports as they stand now.
struct Current<'a> {
    trust: &'a TrustReport,
    links: &'a BTreeMap<String, u64>,
    limits: &'a Limits,
}

impl Sent {
    /// The whole export, as the first batch of a stream.
    fn reset(
        &mut self,
        cluster: &str,
        exports: &ClusterExports,
        now: Current<'_>,
    ) -> Vec<ExportUpdate> {
        let Current {
            trust,
            links,
            limits,
        } = now;
        self.trust = trust.clone();
        self.links = links.clone();
        self.limits = limits.clone();
        self.services = exports
            .services
            .iter()
            .map(|s| (service_key(&s.namespace, &s.name), s.clone()))
            .collect();
        self.gateways = exports.gateways.clone();
        export_batch(
            cluster,
            true,
            exports.services.clone(),
            Vec::new(),
            Some(exports.gateways.clone()),
            (
                Some(trust.clone()),
                Some(GatewayLinks {
                    unreachable_since_unix: links.clone().into_iter().collect(),
                }),
                Some(LimitDemands {
                    by_key: limits.clone().into_iter().collect(),
                }),
            ),
        )
    }

    /// The reports that changed since last sent, in one message; `None` when none did.
    fn reports(&mut self, cluster: &str, now: Current<'_>) -> Option<ExportUpdate> {
        let trust = (*now.trust != self.trust).then(|| now.trust.clone());
        let links = (*now.links != self.links).then(|| now.links.clone());
        let limits = (*now.limits != self.limits).then(|| now.limits.clone());
        if trust.is_none() && links.is_none() && limits.is_none() {
            return None;
        }
        if let Some(t) = &trust {
            self.trust = t.clone();
        }
        if let Some(l) = &links {
            self.links = l.clone();
        }
        if let Some(l) = &limits {
            self.limits = l.clone();
        }
        let links = links.map(|l| GatewayLinks {
            unreachable_since_unix: l.into_iter().collect(),
        });
        let limits = limits.map(|l| LimitDemands {
            by_key: l.into_iter().collect(),
        });
        export_batch(
            cluster,
            false,
            Vec::new(),
            Vec::new(),
            None,
            (trust, links, limits),
        )
        .pop()
    }

    /// What changed since the last batch; `None` when nothing did.
    fn delta(&mut self, cluster: &str, exports: &ClusterExports) -> Option<Vec<ExportUpdate>> {
        let mut current: BTreeMap<String, &ExportedService> = BTreeMap::new();
        for s in &exports.services {
            current.insert(service_key(&s.namespace, &s.name), s);
        }
        let upserted: Vec<ExportedService> = current
            .iter()
            .filter(|(k, s)| self.services.get(*k) != Some(**s))
            .map(|(_, s)| (*s).clone())
            .collect();
        let withdrawn: Vec<String> = self
            .services
            .keys()
            .filter(|k| !current.contains_key(*k))
            .cloned()
            .collect();
        let gateways = (exports.gateways != self.gateways).then(|| exports.gateways.clone());
        if upserted.is_empty() && withdrawn.is_empty() && gateways.is_none() {
            return None;
        }
        for k in &withdrawn {
            self.services.remove(k);
        }
        for s in &upserted {
            self.services
                .insert(service_key(&s.namespace, &s.name), s.clone());
        }
        if let Some(g) = &gateways {
            self.gateways = g.clone();
        }
        Some(export_batch(
            cluster,
            false,
            upserted,
            withdrawn,
            gateways,
            (None, None, None),
        ))
    }
}

pub struct Link {
    /// The federation's addresses, tried in turn (see `Config::federation_addrs`).
    pub addresses: Vec<SocketAddr>,
    pub cluster: String,
    pub identity: TlsIdentity,
    pub federation: PeerPolicy,
}

impl Link {
    pub async fn run(
        self,
        exports: watch::Receiver<Arc<ClusterExports>>,
        reports: Reports,
        global: Arc<GlobalState>,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        // The address in use: kept while it works, the next one's turn when it fails.
        let mut turn = 0usize;
        loop {
            let address = self.addresses[turn % self.addresses.len()];
            let started = Instant::now();
            let err = self
                .session(address, exports.clone(), reports.clone(), &global)
                .await;
            global.set_connected(false);
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            tracing::warn!(federation = %address, error = %err, "federation stream lost; serving the last global registry");
            turn += 1;
            // A round of every address, then the backoff.
            if turn.is_multiple_of(self.addresses.len()) {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }

    async fn session(
        &self,
        address: SocketAddr,
        mut exports: watch::Receiver<Arc<ClusterExports>>,
        reports: Reports,
        global: &GlobalState,
    ) -> tonic::Status {
        let Reports {
            mut trust,
            mut links,
            mut limits,
        } = reports;
        let channel = isthmus_core::grpc::tls_channel(
            address,
            self.identity
                .client_config(self.federation.clone(), &[ALPN_H2]),
        );
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
        let mut sent = Sent::default();
        let first = sent.reset(
            &self.cluster,
            &exports.borrow_and_update(),
            Current {
                trust: &trust.borrow_and_update(),
                links: &links.borrow_and_update(),
                limits: &limits.borrow_and_update(),
            },
        );
        let outbound = tokio_stream::iter(first).chain(ReceiverStream::new(rx));
        let mut inbound = match client.exchange(outbound).await {
            Ok(r) => r.into_inner(),
            Err(s) => return s,
        };
        tracing::info!(federation = %address, cluster = %self.cluster, "connected to the federation");
        global
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .address = Some(address);
        global.set_connected(true);
        // Exports go out from their own task, so a large batch either way never leaves both
        // ends waiting for the other to read.
        let cluster = self.cluster.clone();
        let mut exporting = tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    changed = exports.changed() => {
                        if changed.is_err() { break }
                        let current = exports.borrow_and_update().clone();
                        sent.delta(&cluster, &current).unwrap_or_default()
                    }
                    changed = trust.changed() => {
                        if changed.is_err() { break }
                        Vec::new()
                    }
                    changed = links.changed() => {
                        if changed.is_err() { break }
                        Vec::new()
                    }
                    changed = limits.changed() => {
                        if changed.is_err() { break }
                        Vec::new()
                    }
                };
                let (t, l, d) = (
                    trust.borrow_and_update().clone(),
                    links.borrow_and_update().clone(),
                    limits.borrow_and_update().clone(),
                );
                let report = sent.reports(
                    &cluster,
                    Current {
                        trust: &t,
                        links: &l,
                        limits: &d,
                    },
                );
                for m in batch.into_iter().chain(report) {
                    if tx.send(m).await.is_err() {
                        return tonic::Status::unavailable("export stream closed");
                    }
                }
            }
            tonic::Status::cancelled("controller shutting down")
        });
        let _abort = AbortOnDrop(exporting.abort_handle());
        let mut batch: Vec<RegistryUpdate> = Vec::new();
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(update)) => {
                        let more = update.more;
                        batch.push(update);
                        if more {
                            if batch.iter().map(|u| u.upserted.len()).sum::<usize>() > MAX_BATCH_SERVICES {
                                return tonic::Status::resource_exhausted("registry batch too large");
                            }
                            continue;
                        }
                        let batch = std::mem::take(&mut batch);
                        tracing::debug!(version = batch[0].version, messages = batch.len(), reset = batch[0].reset, "global registry update");
                        if let Some(meta) = batch.iter().find_map(|u| u.meta.as_ref()) {
                            for c in &meta.conflicts {
                                tracing::warn!(conflict = %c, "global registry conflict");
                            }
                        }
                        global.apply(batch);
                    }
                    Ok(None) => return tonic::Status::unavailable("federation closed the stream"),
                    Err(s) => return s,
                },
                ended = &mut exporting => {
                    return ended.unwrap_or_else(|e| tonic::Status::internal(format!("export task: {e}")));
                }
            }
        }
    }
}

/// The cluster's trust report, kept current as proxies report their certificates and the
/// controller's trust changes (coalesced over a short window); runs until the controller
/// stops.
pub async fn report_trust(
    proxies: Arc<crate::syncz::Proxies>,
    trust: crate::trust::Trust,
    tx: watch::Sender<TrustReport>,
) {
    let (mut changes, mut issuing) = (proxies.changes(), trust.subscribe());
    loop {
        let next = proxies.trust_report(&trust.current());
        tx.send_if_modified(|cur| {
            let changed = *cur != next;
            *cur = next;
            changed
        });
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = issuing.changed() => if r.is_err() { return },
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        changes.borrow_and_update();
        issuing.borrow_and_update();
    }
}

/// How long a proxy's demand report counts: three of its one-second reports.
const DEMAND_FRESH: Duration = Duration::from_secs(3);

/// Keeps `tx` holding this cluster's budget and demand for each global rate limit its
/// proxies enforce, summed from their reports every second. Demand is rounded to a tenth
/// of a request per second, so that a steady load sends nothing new.
pub async fn report_limits(
    proxies: Arc<crate::syncz::Proxies>,
    snapshots: watch::Receiver<Arc<crate::snapshot::Snapshot>>,
    tx: watch::Sender<Limits>,
) {
    loop {
        let budgets: BTreeMap<String, u32> = snapshots
            .borrow()
            .config
            .routing
            .iter()
            .flat_map(|(svc, r)| {
                r.global_rate_limits.iter().map(move |l| {
                    (
                        format!("{}/{}/{}", svc.namespace, svc.name, l.name),
                        l.requests_per_second,
                    )
                })
            })
            .collect();
        let next: Limits = proxies
            .demand(DEMAND_FRESH)
            .into_iter()
            .filter_map(|(key, rps)| {
                let budget = *budgets.get(&key)?;
                Some((
                    key,
                    LimitDemand {
                        budget_rps: budget,
                        demand_rps: (rps * 10.0).round() / 10.0,
                    },
                ))
            })
            .collect();
        tx.send_if_modified(|cur| {
            let changed = *cur != next;
            *cur = next;
            changed
        });
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Stops a task when its owner ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
