//! The sidecar's config store: applies pushed responses (converted first, outside the lock)
//! and publishes the new [`MeshState`] to requests through a `watch`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use isthmus_core::xds::XdsHandler;
use isthmus_proto::discovery::Resource;
use isthmus_proto::type_url;
use prost::Message;
use tokio::sync::watch;

use crate::convert;
use crate::lb::HealthTable;
use crate::state::MeshState;

pub struct Store {
    state: watch::Sender<Arc<MeshState>>,
    health: Arc<HealthTable>,
    own_namespace: String,
    /// Serializes writers; readers never take it.
    write: Mutex<()>,
}

impl Store {
    pub fn new(own_namespace: &str, health: Arc<HealthTable>) -> Self {
        Self {
            state: watch::Sender::new(Arc::default()),
            health,
            own_namespace: own_namespace.to_owned(),
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

impl XdsHandler for Store {
    fn apply(
        &self,
        type_url: &str,
        updated: &[Resource],
        removed: &[String],
    ) -> Result<(), String> {
        match type_url {
            type_url::SERVICE => {
                let converted =
                    convert::services(updated, &self.health).map_err(|e| e.to_string())?;
                let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
                let old = self.current();
                let mut services = old.services.clone();
                for name in removed {
                    services.remove(name);
                }
                services.extend(converted);
                let mut next = MeshState {
                    services,
                    hosts: Default::default(),
                    mesh: old.mesh.clone(),
                    own_labels: old.own_labels.clone(),
                };
                next.index(&self.own_namespace);
                next.attach_health(&self.health);
                self.state.send_replace(Arc::new(next));
                Ok(())
            }
            type_url::MESH => {
                let Some(r) = updated.iter().find(|r| r.name == "mesh") else {
                    return Ok(());
                };
                let (mesh, _bundle) = convert::mesh(&r.name, &r.body).map_err(|e| e.to_string())?;
                let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
                let old = self.current();
                let next = MeshState {
                    services: old.services.clone(),
                    hosts: old.hosts.clone(),
                    mesh,
                    own_labels: old.own_labels.clone(),
                };
                self.state.send_replace(Arc::new(next));
                Ok(())
            }
            type_url::WORKLOAD => {
                let labels = match updated.first() {
                    Some(r) => {
                        isthmus_proto::discovery::Workload::decode(r.body.as_slice())
                            .map_err(|e| format!("resource {}: {e}", r.name))?
                            .labels
                    }
                    None if !removed.is_empty() => BTreeMap::new(),
                    None => return Ok(()),
                };
                let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
                let old = self.current();
                let next = MeshState {
                    services: old.services.clone(),
                    hosts: old.hosts.clone(),
                    mesh: old.mesh.clone(),
                    own_labels: Arc::new(labels),
                };
                self.state.send_replace(Arc::new(next));
                Ok(())
            }
            other => Err(format!("unexpected resource type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            routing_json: String::new(),
        };
        Resource {
            name: format!("demo/{name}"),
            version: "1".into(),
            body: svc.encode_to_vec(),
        }
    }

    #[test]
    fn a_response_with_one_bad_resource_is_rejected_whole_and_the_old_state_stays() {
        let store = Store::new("demo", Arc::default());
        store
            .apply(
                type_url::SERVICE,
                &[service("echo", "127.0.0.1:15008")],
                &[],
            )
            .expect("valid");
        let bad = [
            service("other", "127.0.0.2:15008"),
            service("broken", "not-an-address"),
        ];
        let err = store
            .apply(type_url::SERVICE, &bad, &["demo/echo".into()])
            .expect_err("NACK");
        assert!(
            err.contains("tunnel_address") && err.contains("not-an-address"),
            "{err}"
        );
        let state = store.current();
        assert!(
            state.resolve("echo").is_some(),
            "the accepted service still serves"
        );
        assert!(
            state.resolve("other").is_none(),
            "nothing of the rejected response was applied"
        );
    }

    #[test]
    fn services_resolve_by_every_name_an_app_may_use() {
        let store = Store::new("demo", Arc::default());
        store
            .apply(
                type_url::SERVICE,
                &[service("echo", "127.0.0.1:15008")],
                &[],
            )
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
            .expect("removal");
        assert!(store.current().resolve("echo").is_none());
    }

    #[test]
    fn undecodable_bytes_are_rejected() {
        let store = Store::new("demo", Arc::default());
        let junk = Resource {
            name: "demo/x".into(),
            version: "1".into(),
            body: vec![0xff, 0xff, 0xff],
        };
        assert!(store.apply(type_url::SERVICE, &[junk], &[]).is_err());
        assert!(store.apply("isthmus.io/Unknown", &[], &[]).is_err());
    }
}
