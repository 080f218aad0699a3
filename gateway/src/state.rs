//! The gateway's config: local endpoints of each service (for streams arriving from peer
//! gateways) and the peer gateways of other clusters, as pushed by the controller.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use isthmus_core::identity::SpiffeId;
use isthmus_core::xds::{Rejected, XdsHandler};
use isthmus_proto::discovery::{self as xds, Resource};
use isthmus_proto::type_url;
use prost::Message;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Peer {
    pub address: SocketAddr,
    pub identity: SpiffeId,
}

/// A healthy local endpoint.
#[derive(Debug)]
pub struct LocalEndpoint {
    /// Its sidecar's tunnel address.
    pub address: SocketAddr,
    /// Its labels, for subsets.
    pub labels: BTreeMap<String, String>,
    /// Its DNS label under a headless service (hostname, or dashed address), for streams
    /// that name one endpoint.
    pub name: String,
}

#[derive(Debug, Default)]
pub struct GatewayState {
    /// `namespace/name` → healthy local endpoints.
    pub services: BTreeMap<String, Arc<Vec<LocalEndpoint>>>,
    pub peers: BTreeMap<String, Peer>,
}

pub struct Store {
    state: watch::Sender<Arc<GatewayState>>,
    write: Mutex<()>,
}

fn invalid(name: &str, what: &str, value: &str) -> String {
    format!("resource {name}: {what} `{value}` is invalid")
}

fn service(r: &Resource) -> Result<(String, Arc<Vec<LocalEndpoint>>), String> {
    let svc =
        xds::Service::decode(r.body.as_slice()).map_err(|e| format!("resource {}: {e}", r.name))?;
    let eps = svc
        .endpoints
        .iter()
        .filter(|e| e.healthy)
        .map(|e| {
            let address: SocketAddr = e
                .tunnel_address
                .parse()
                .map_err(|_| invalid(&r.name, "tunnel_address", &e.tunnel_address))?;
            Ok(LocalEndpoint {
                address,
                labels: e.labels.clone(),
                name: isthmus_core::config::endpoint_label(Some(&e.hostname), address.ip()),
            })
        })
        .collect::<Result<Vec<LocalEndpoint>, String>>()?;
    Ok((r.name.clone(), Arc::new(eps)))
}

fn peer(r: &Resource) -> Result<(String, Peer), String> {
    let p =
        xds::Peer::decode(r.body.as_slice()).map_err(|e| format!("resource {}: {e}", r.name))?;
    let address = p
        .address
        .parse()
        .map_err(|_| invalid(&r.name, "address", &p.address))?;
    let identity = p
        .identity
        .parse()
        .map_err(|_| invalid(&r.name, "identity", &p.identity))?;
    Ok((p.cluster, Peer { address, identity }))
}

impl Store {
    pub fn new() -> Self {
        Self {
            state: watch::Sender::new(Arc::default()),
            write: Mutex::new(()),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<GatewayState>> {
        self.state.subscribe()
    }

    pub fn current(&self) -> Arc<GatewayState> {
        self.state.borrow().clone()
    }
}

impl XdsHandler for Store {
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.current();
        let mut next = GatewayState {
            services: old.services.clone(),
            peers: old.peers.clone(),
        };
        let rejected = match type_url {
            type_url::SERVICE => {
                let (converted, rejected) = Rejected::sort(updated, service);
                for name in removed {
                    next.services.remove(name);
                }
                next.services.extend(converted);
                rejected
            }
            type_url::PEER => {
                let (converted, rejected) = Rejected::sort(updated, peer);
                for name in removed {
                    next.peers.remove(name);
                }
                next.peers.extend(converted);
                rejected
            }
            type_url::MESH => return Vec::new(),
            other => return Rejected::all(updated, &format!("unexpected resource type {other}")),
        };
        self.state.send_replace(Arc::new(next));
        rejected
    }
}
