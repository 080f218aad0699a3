//! The sidecar's config store: applies pushed responses (converted first, outside the lock)
//! and publishes the new [`MeshState`] to requests through a `watch`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use isthmus_core::xds::{Rejected, XdsHandler};
use isthmus_proto::discovery::Resource;
use isthmus_proto::type_url;
use prost::Message;
use tokio::sync::watch;

use crate::authz::InboundPolicy;
use crate::convert;
use crate::lb::HealthTable;
use crate::state::MeshState;

pub struct Store {
    state: watch::Sender<Arc<MeshState>>,
    health: Arc<HealthTable>,
    own_namespace: String,
    own: Own,
    /// Serializes writers; readers never take it.
    write: Mutex<()>,
}

/// What a sidecar knows of its own workload before any config: telemetry's description of
/// it is made from this and the labels the controller pushes.
pub struct Own {
    pub pod: String,
    pub id: isthmus_core::identity::SpiffeId,
    pub cluster: String,
    pub workloads: Arc<crate::peer::Workloads>,
}

impl Own {
    /// This workload with `labels`, owned by `owner` (the controller's word, from the pod's
    /// owner references; empty when it has none to give).
    fn describe(
        &self,
        labels: &BTreeMap<String, String>,
        owner: &str,
    ) -> Arc<crate::peer::Workload> {
        let name = if owner.is_empty() { &self.pod } else { owner };
        let w = crate::peer::Workload::own(name, &self.id, &self.cluster, labels);
        self.workloads.own(w)
    }
}

impl Store {
    pub fn new(own: Own, health: Arc<HealthTable>) -> Self {
        let state = MeshState {
            own: own.describe(&BTreeMap::new(), ""),
            ..Default::default()
        };
        Self {
            state: watch::Sender::new(Arc::new(state)),
            health,
            own_namespace: own.id.namespace().to_owned(),
            own,
            write: Mutex::new(()),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshState>> {
        self.state.subscribe()
    }

    pub fn current(&self) -> Arc<MeshState> {
        self.state.borrow().clone()
    }
}

impl Store {
    /// Publishes the state `change` makes of the current one.
    fn update(&self, change: impl FnOnce(&MeshState) -> MeshState) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let next = change(&self.current());
        self.state.send_replace(Arc::new(next));
    }
}

impl XdsHandler for Store {
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected> {
        match type_url {
            type_url::SERVICE => {
                let (converted, rejected) = Rejected::sort(updated, |r| {
                    convert::service(&r.name, &r.body, &self.health)
                        .map(|s| (r.name.clone(), Arc::new(s)))
                        .map_err(|e| e.to_string())
                });
                self.update(|old| {
                    let mut services = old.services.clone();
                    for name in removed {
                        services.remove(name);
                    }
                    services.extend(converted);
                    // Every field but the services and what `index` derives from them
                    // carries over; named one by one, so a field added to MeshState
                    // cannot be dropped here unnoticed (ALLOW_ANY once was).
                    let MeshState {
                        services: _,
                        hosts: _,
                        wildcards: _,
                        networks: _,
                        pods: _,
                        mesh,
                        own_labels,
                        own,
                        allow_any,
                        inbound,
                        telemetry,
                        wasm_plugins,
                    } = old;
                    let mut next = MeshState {
                        services,
                        hosts: Default::default(),
                        wildcards: Vec::new(),
                        networks: Vec::new(),
                        pods: Default::default(),
                        mesh: mesh.clone(),
                        own_labels: own_labels.clone(),
                        own: own.clone(),
                        allow_any: *allow_any,
                        inbound: inbound.clone(),
                        telemetry: telemetry.clone(),
                        wasm_plugins: wasm_plugins.clone(),
                    };
                    next.index(&self.own_namespace);
                    next.attach_health(&self.health);
                    next
                });
                rejected
            }
            type_url::MESH => {
                let (mut meshes, rejected) = Rejected::sort(updated, |r| {
                    convert::mesh(&r.name, &r.body).map_err(|e| e.to_string())
                });
                if let Some(mesh) = meshes.pop() {
                    self.update(|old| MeshState {
                        mesh,
                        ..old.clone()
                    });
                }
                rejected
            }
            type_url::WORKLOAD => {
                let (mut workloads, rejected) = Rejected::sort(updated, |r| {
                    isthmus_proto::discovery::Workload::decode(r.body.as_slice())
                        .map(|w| {
                            let inbound = InboundPolicy::compile(&w.inbound.unwrap_or_default());
                            let telemetry = w.telemetry.map(Arc::new);
                            let wasm = Arc::new(w.wasm_plugins);
                            (w.labels, w.allow_any, inbound, w.owner, telemetry, wasm)
                        })
                        .map_err(|e| format!("cannot decode: {e}"))
                });
                let (labels, allow_any, inbound, owner, telemetry, wasm_plugins) =
                    match workloads.pop() {
                        Some(own) => own,
                        None if !removed.is_empty() => (
                            BTreeMap::new(),
                            false,
                            InboundPolicy::default(),
                            String::new(),
                            None,
                            Arc::default(),
                        ),
                        None => return rejected,
                    };
                let own = self.own.describe(&labels, &owner);
                self.update(|old| MeshState {
                    own_labels: Arc::new(labels),
                    own,
                    allow_any,
                    inbound: Arc::new(inbound),
                    telemetry,
                    wasm_plugins,
                    ..old.clone()
                });
                rejected
            }
            other => Rejected::all(updated, &format!("unexpected resource type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> Own {
        Own {
            pod: "client".into(),
            id: isthmus_core::identity::SpiffeId::new("cluster.local", "demo", "client"),
            cluster: "east".into(),
            workloads: Arc::default(),
        }
    }
    use isthmus_proto::discovery as xds;

    fn service(name: &str, tunnel: &str) -> Resource {
        let svc = xds::Service {
            namespace: "demo".into(),
            name: name.into(),
            ports: vec![xds::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
                target_port: 8080,
            }],
            endpoints: vec![xds::Endpoint {
                workload: "demo/w".into(),
                tunnel_address: tunnel.into(),
                identity: "spiffe://td/ns/demo/sa/echo".into(),
                healthy: true,
                ..Default::default()
            }],
            remote: vec![],
            routing: None,
            export_to: vec![],
            ..Default::default()
        };
        Resource {
            name: format!("demo/{name}"),
            version: "1".into(),
            body: svc.encode_to_vec(),
        }
    }

    #[test]
    fn a_bad_resource_is_rejected_alone_and_keeps_its_previous_version() {
        let store = Store::new(own(), Arc::default());
        let none = store.apply(
            type_url::SERVICE,
            &[service("echo", "127.0.0.1:15008")],
            &[],
        );
        assert_eq!(none, vec![]);
        let mixed = [
            service("other", "127.0.0.2:15008"),
            service("echo", "not-an-address"),
        ];
        let rejected = store.apply(type_url::SERVICE, &mixed, &[]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].name, "demo/echo");
        assert!(
            rejected[0].reason.contains("tunnel_address")
                && rejected[0].reason.contains("not-an-address"),
            "{rejected:?}"
        );
        let state = store.current();
        let echo = state
            .resolve("echo")
            .expect("the previous echo still serves");
        assert_eq!(
            echo.endpoints[0].tunnel_address.to_string(),
            "127.0.0.1:15008"
        );
        assert!(
            state.resolve("other").is_some(),
            "the good resource of the response was applied"
        );
    }

    #[test]
    fn services_resolve_by_every_name_an_app_may_use() {
        let store = Store::new(own(), Arc::default());
        store
            .apply(
                type_url::SERVICE,
                &[service("echo", "127.0.0.1:15008")],
                &[],
            )
            .is_empty()
            .then_some(())
            .expect("valid");
        let state = store.current();
        for host in [
            "echo",
            "echo.demo",
            "echo.demo.svc",
            "echo.demo.svc.cluster.local",
            "echo.demo.svc.clusterset.local",
        ] {
            assert!(state.resolve(host).is_some(), "{host}");
        }
        assert!(state.resolve("echo.other").is_none());
        store
            .apply(type_url::SERVICE, &[], &["demo/echo".into()])
            .is_empty()
            .then_some(())
            .expect("removal");
        assert!(store.current().resolve("echo").is_none());
    }

    #[test]
    fn undecodable_bytes_are_rejected() {
        let store = Store::new(own(), Arc::default());
        let junk = Resource {
            name: "demo/x".into(),
            version: "1".into(),
            body: vec![0xff, 0xff, 0xff],
        };
        assert_eq!(
            store
                .apply(type_url::SERVICE, std::slice::from_ref(&junk), &[])
                .len(),
            1
        );
        assert_eq!(store.apply("isthmus.io/Unknown", &[junk], &[]).len(), 1);
    }

    #[test]
    fn telemetry_names_the_workload_as_the_controller_does() {
        let store = Store::new(own(), Arc::default());
        // Before any push: the pod's own name.
        assert_eq!(&*store.current().own.name, "client");
        let before = store.current().own.id();
        let push = |owner: &str| {
            let w = xds::Workload {
                name: "demo/client-7f9c8d-x2x4z".into(),
                labels: [("app".to_owned(), "client".to_owned())].into(),
                owner: owner.into(),
                ..Default::default()
            };
            let r = Resource {
                name: w.name.clone(),
                version: "1".into(),
                body: w.encode_to_vec(),
            };
            assert!(store.apply(type_url::WORKLOAD, &[r], &[]).is_empty());
        };
        push("client-v1");
        let own = store.current().own.clone();
        assert_eq!((&*own.name, &*own.app), ("client-v1", "client"));
        assert_ne!(own.id(), before);
        // The same push again keeps the same interned workload (and so the same series).
        push("client-v1");
        assert_eq!(store.current().own.id(), own.id());
    }
}
