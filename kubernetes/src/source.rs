//! Watching the cluster and publishing what it admits.
//!
//! One kube-rs watcher per kind feeds a reflector store. Each one lists its kind, watches
//! from the list's `resourceVersion`, and lists again after a 410 Gone or a broken stream,
//! with backoff while the API server is away. Any event pokes the rebuild loop. The loop
//! lets a burst settle for [`SETTLE`], then rebuilds the config set from the stores: the
//! platform model first, then every mesh config object admitted on its own on top of it.
//! It publishes the set if it changed. A rejected object keeps its last admitted version,
//! as in the file adapter.
//!
//! A mesh kind whose CRD is not installed is not watched, and a warning says so. Install
//! the CRDs (`isthmus install crds`) before the controller starts, or restart the
//! controller after installing them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use isthmus_core::config::watch::{publish, LoadStatus};
use isthmus_core::config::{admit_on, ConfigSet, LastGood, ParsedFiles};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::platform::{self, Objects};
use crate::resources::{self, MeshKind, MESH_KINDS};
use crate::status::Outcome;

/// A burst of events (a Deployment rolling, a namespace applied) is one rebuild.
pub const SETTLE: Duration = Duration::from_millis(20);
/// How often the wait for the first lists says what it still waits for.
const WAIT_REPORT: Duration = Duration::from_secs(10);

/// The cluster as the watchers last saw it.
pub struct Source {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    nodes: Store<Node>,
    /// ConfigMaps of `istio-system`, for Istio's mesh config (`istio`).
    mesh_config: Store<ConfigMap>,
    mesh: Vec<(MeshKind, Store<DynamicObject>)>,
    changed: Arc<Notify>,
    client: kube::Client,
    /// Each mesh object's parse, by where it lives, with the resourceVersion it was parsed
    /// at: a rebuild (most often for a pod or slice change) parses only what changed.
    parsed: std::sync::Mutex<HashMap<String, (Option<String>, ParsedFiles)>>,
    /// The watchers; they stop when the source is dropped.
    _tasks: JoinSet<()>,
}

/// Starts watchers, each into its own store, poking `changed` on every event.
struct Watching {
    tasks: JoinSet<()>,
    changed: Arc<Notify>,
}

impl Watching {
    /// Runs a watcher of `api` into a new store.
    fn store<K>(&mut self, api: Api<K>, dyntype: K::DynamicType, what: String) -> Store<K>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync,
        K: 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
    {
        watch_into(&mut self.tasks, api, dyntype, what, self.changed.clone())
    }
}

fn watch_into<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    dyntype: K::DynamicType,
    what: String,
    changed: Arc<Notify>,
) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default()).default_backoff(),
    );
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        tracing::info!(kind = %what, "watching again");
                        failing = false;
                    }
                    changed.notify_one();
                }
                Err(e) if !failing => {
                    tracing::warn!(kind = %what, error = %e, "watch failed; retrying with backoff");
                    failing = true;
                }
                Err(e) => tracing::debug!(kind = %what, error = %e, "watch failed again"),
            }
        }
    });
    store
}

/// Whether the API server serves `kind`: its CRD is installed. Other failures (the
/// server unreachable) are retried until it answers.
async fn served(client: &kube::Client, kind: &MeshKind) -> bool {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
    let mut backoff = Duration::from_millis(200);
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return true,
            Err(kube::Error::Api(s)) if s.code == 404 => return false,
            Err(e) => {
                tracing::warn!(kind = %kind.resource(), error = %e, "cannot list; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Source {
    /// Starts the watchers and returns once every watched kind has been listed, so the
    /// first config set published is the whole cluster, never a part of it.
    pub async fn start(client: kube::Client) -> anyhow::Result<Self> {
        let mut w = Watching {
            tasks: JoinSet::new(),
            changed: Arc::new(Notify::new()),
        };
        let c = &client;
        let services = w.store(Api::all(c.clone()), (), "Service".into());
        let slices = w.store(Api::all(c.clone()), (), "EndpointSlice".into());
        let pods = w.store(Api::all(c.clone()), (), "Pod".into());
        let nodes = w.store(Api::all(c.clone()), (), "Node".into());
        let mesh_config = w.store(
            Api::namespaced(c.clone(), isthmus_core::config::mesh::NAMESPACE),
            (),
            "ConfigMap".into(),
        );
        let mut mesh = Vec::new();
        for kind in MESH_KINDS {
            if !served(c, kind).await {
                tracing::warn!(
                    kind = %kind.resource(),
                    "not served by this cluster (CRD not installed): objects of this kind are not read; install the CRDs with `isthmus install crds` and restart the controller"
                );
                continue;
            }
            let ar = kind.api_resource();
            let store = w.store(Api::all_with(c.clone(), &ar), ar, kind.resource());
            mesh.push((*kind, store));
        }
        let source = Self {
            services,
            slices,
            pods,
            nodes,
            mesh_config,
            mesh,
            changed: w.changed,
            client,
            parsed: Default::default(),
            _tasks: w.tasks,
        };
        source.wait_listed().await;
        Ok(source)
    }

    async fn wait_listed(&self) {
        let all = futures::future::join_all(
            [
                self.services.wait_until_ready().boxed(),
                self.slices.wait_until_ready().boxed(),
                self.pods.wait_until_ready().boxed(),
                self.nodes.wait_until_ready().boxed(),
                self.mesh_config.wait_until_ready().boxed(),
            ]
            .into_iter()
            .chain(self.mesh.iter().map(|(_, s)| s.wait_until_ready().boxed())),
        );
        let mut all = std::pin::pin!(all);
        while tokio::time::timeout(WAIT_REPORT, &mut all).await.is_err() {
            // The watchers' own warnings say which kind fails and why.
            tracing::warn!("still waiting for the API server's first lists");
        }
    }

    /// The client the watchers use.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Every mesh config object, in a stable order (admission reports a duplicate against
    /// the first it saw).
    fn mesh_objects(&self) -> Vec<(MeshKind, Arc<DynamicObject>)> {
        let mut all = Vec::new();
        for (kind, store) in &self.mesh {
            let mut objects = store.state();
            objects.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name)
                    .cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            all.extend(objects.into_iter().map(|o| (*kind, o)));
        }
        all
    }

    /// The config set the stores hold now: the platform, and the mesh config admitted on
    /// top of it object by object.
    pub fn admit(
        &self,
        last: &mut LastGood,
    ) -> (ConfigSet, Vec<isthmus_core::config::ConfigError>) {
        self.admit_objects(&self.mesh_objects(), last)
    }

    /// [`Source::admit`] with the mesh objects already gathered.
    fn admit_objects(
        &self,
        objects: &[(MeshKind, Arc<DynamicObject>)],
        last: &mut LastGood,
    ) -> (ConfigSet, Vec<isthmus_core::config::ConfigError>) {
        let (services, slices, pods, nodes) = (
            self.services.state(),
            self.slices.state(),
            self.pods.state(),
            self.nodes.state(),
        );
        let platform = platform::platform(&Objects {
            services: &services,
            slices: &slices,
            pods: &pods,
            nodes: &nodes,
        });
        let mut parsed = ParsedFiles::default();
        let mut cache = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = HashMap::with_capacity(objects.len());
        for (kind, obj) in objects {
            let source = resources::source_of(kind, obj);
            let rv = obj.metadata.resource_version.clone();
            let one = match cache.remove(&source) {
                Some((at, one)) if at == rv && rv.is_some() => one,
                _ => resources::parse(kind, obj),
            };
            parsed.extend(&one);
            kept.insert(source, (rv, one));
        }
        // Objects gone from the cluster leave the cache with the old map.
        *cache = kept;
        drop(cache);
        for cm in self.mesh_config.state() {
            let name = cm.metadata.name.as_deref().unwrap_or_default();
            if !isthmus_core::config::mesh::is_mesh_config(name, cm.metadata.namespace.as_deref()) {
                continue;
            }
            let source = format!(
                "configmaps/{}/{name}",
                isthmus_core::config::mesh::NAMESPACE
            );
            let mut cm = (*cm).clone();
            cm.metadata.managed_fields = None;
            match serde_json::to_value(&cm)
                .and_then(|v| serde_yaml_ng::to_value(&v).map_err(serde::ser::Error::custom))
            {
                Ok(v) => parsed.extend(&isthmus_core::config::parse_object(&source, v)),
                Err(e) => parsed.notes.push(format!("{source}: unreadable: {e}")),
            }
        }
        admit_on(&platform, parsed, last)
    }
}

/// Rebuilds and publishes the config set on every change in the cluster, and writes each
/// mesh object's admission result back to it while `leader` says this replica leads,
/// until the receivers are gone.
pub async fn run(
    source: Source,
    mut last_good: LastGood,
    config: watch::Sender<Arc<ConfigSet>>,
    status: watch::Sender<LoadStatus>,
    leader: watch::Receiver<bool>,
) {
    let (outcomes, rx) = watch::channel(Arc::new(Outcome::default()));
    let writer = tokio::spawn(crate::status::run(source.client.clone(), rx, leader));
    let _writer = AbortOnDrop(writer);
    let mut last_rejected: BTreeSet<String> = BTreeSet::new();
    loop {
        if config.is_closed() {
            return;
        }
        let objects = source.mesh_objects();
        let (set, rejected) = source.admit_objects(&objects, &mut last_good);
        let now: BTreeSet<String> = rejected.iter().map(ToString::to_string).collect();
        for e in now.difference(&last_rejected) {
            tracing::warn!(error = %e, "config object rejected; its last admitted version stays");
        }
        last_rejected = now;
        let mut faults = rejected.clone();
        faults.extend(set.warnings.iter().cloned());
        let (services, workloads, n) = (set.services.len(), set.workloads.len(), rejected.len());
        if publish(&config, &status, set, rejected) {
            tracing::debug!(services, workloads, rejected = n, "cluster changed");
        }
        outcomes.send_replace(Arc::new(Outcome { objects, faults }));
        source.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
    }
}

/// Stops a task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
