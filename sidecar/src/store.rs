//! The sidecar's config store: applies pushed responses (converted first, outside the lock)
//! and publishes the new [`MeshState`] to requests through a `watch`.

use std::sync::{Arc, Mutex};

use isthmus_core::xds::XdsHandler;
use isthmus_proto::discovery::Resource;
use isthmus_proto::type_url;
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
                };
                self.state.send_replace(Arc::new(next));
                Ok(())
            }
            other => Err(format!("unexpected resource type {other}")),
        }
    }
}
