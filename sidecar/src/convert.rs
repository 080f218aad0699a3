//! Pushed resources into the sidecar's state: decoded and checked outside any lock. This is
//! the NACK boundary: a response with any resource that does not convert is rejected whole
//! and the state that is serving stays.

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_core::identity::SpiffeId;
use isthmus_core::locality::Locality;
use isthmus_proto::discovery as xds;
use prost::Message;

use crate::lb::HealthTable;
use crate::state::{LocalEndpoint, MeshInfo, Port, RemoteCluster, Service};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("resource {name}: cannot decode: {source}")]
    Decode {
        name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("resource {name}: routing: {reason}")]
    Routing { name: String, reason: String },
    #[error("resource {name}: {field}: `{value}` is invalid")]
    Field {
        name: String,
        field: &'static str,
        value: String,
    },
}

fn locality(l: Option<&xds::Locality>) -> Locality {
    l.map(|l| Locality::new(&l.region, &l.zone, &l.subzone))
        .unwrap_or_default()
}

fn field<T: std::str::FromStr>(
    name: &str,
    field: &'static str,
    value: &str,
) -> Result<T, ConvertError> {
    value.parse().map_err(|_| ConvertError::Field {
        name: name.to_owned(),
        field,
        value: value.to_owned(),
    })
}

fn port(name: &str, host: &str, p: &xds::ServicePort) -> Result<Port, ConvertError> {
    let num = |v: u32, f: &'static str| {
        u16::try_from(v).map_err(|_| ConvertError::Field {
            name: name.to_owned(),
            field: f,
            value: v.to_string(),
        })
    };
    let port = num(p.port, "port")?;
    Ok(Port {
        name: p.name.as_str().into(),
        port,
        protocol: p.protocol.as_str().into(),
        target_port: num(p.target_port, "target_port")?,
        authority: Port::authority_of(host, port),
    })
}

pub fn service(name: &str, body: &[u8], health: &HealthTable) -> Result<Service, ConvertError> {
    let msg = xds::Service::decode(body).map_err(|source| ConvertError::Decode {
        name: name.to_owned(),
        source,
    })?;
    let routing =
        match msg.routing {
            None => None,
            Some(wire) => {
                let r = isthmus_core::routing::ServiceRouting::try_from(wire).map_err(|e| {
                    ConvertError::Routing {
                        name: name.to_owned(),
                        reason: e.to_string(),
                    }
                })?;
                let service = format!("{}/{}", msg.namespace, msg.name);
                let compiled = crate::routing_table::CompiledRouting::compile(r, &service)
                    .map_err(|reason| ConvertError::Routing {
                        name: name.to_owned(),
                        reason,
                    })?;
                Some(Arc::new(compiled))
            }
        };
    let mut endpoints = Vec::new();
    for ep in msg.endpoints.iter().filter(|e| e.healthy) {
        let tunnel_address = field(name, "endpoint.tunnel_address", &ep.tunnel_address)?;
        endpoints.push(LocalEndpoint {
            workload: ep.workload.clone(),
            tunnel_address,
            identity: field(name, "endpoint.identity", &ep.identity)?,
            locality: locality(ep.locality.as_ref()),
            labels: ep.labels.clone(),
            health: health.get(&ep.tunnel_address),
            // A name that is no DNS label is no name of the endpoint.
            hostname: isthmus_core::config::is_dns_label(&ep.hostname)
                .then(|| ep.hostname.as_str().into()),
        });
    }
    let mut remote = Vec::new();
    for rc in &msg.remote {
        let healthy: Vec<&xds::LocalityCount> =
            rc.localities.iter().filter(|l| l.healthy > 0).collect();
        let Some(first) = healthy.first() else {
            continue;
        };
        let identities = rc
            .identities
            .iter()
            .map(|i| field(name, "remote.identities", i))
            .collect::<Result<Vec<SpiffeId>, _>>()?;
        remote.push(RemoteCluster {
            cluster: rc.cluster.as_str().into(),
            locality: locality(first.locality.as_ref()),
            identities,
            // Judged per service: one service failing in a cluster says nothing of the others.
            health: health.get(&format!(
                "cluster:{}/{}/{}",
                rc.cluster, msg.namespace, msg.name
            )),
            label_sets: healthy.iter().map(|l| l.labels.clone()).collect(),
            endpoints: rc
                .endpoints
                .iter()
                .filter(|(ep, _)| isthmus_core::config::is_dns_label(ep))
                .map(|(ep, vip)| {
                    let vip = vip.parse().map_err(|_| ConvertError::Field {
                        name: name.to_owned(),
                        field: "remote.endpoints",
                        value: vip.clone(),
                    })?;
                    Ok((ep.as_str().into(), vip))
                })
                .collect::<Result<_, ConvertError>>()?,
            endpoint: None,
        });
    }
    let addresses = msg
        .addresses
        .iter()
        .map(|a| network(name, a))
        .collect::<Result<Vec<_>, _>>()?;
    let external = match &msg.external {
        None => None,
        Some(e) => Some(isthmus_core::config::External {
            resolution: isthmus_core::config::Resolution::parse(&e.resolution).ok_or_else(
                || ConvertError::Field {
                    name: name.to_owned(),
                    field: "external.resolution",
                    value: e.resolution.clone(),
                },
            )?,
            endpoints: e
                .endpoints
                .iter()
                .map(|ep| {
                    let ports = ep
                        .ports
                        .iter()
                        .map(|(n, p)| {
                            u16::try_from(*p).map(|p| (n.clone(), p)).map_err(|_| {
                                ConvertError::Field {
                                    name: name.to_owned(),
                                    field: "external.endpoints.ports",
                                    value: p.to_string(),
                                }
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    Ok(isthmus_core::config::ExternalEndpoint {
                        address: ep.address.clone(),
                        ports,
                    })
                })
                .collect::<Result<_, ConvertError>>()?,
        }),
    };
    let host = Service::name_of(&msg.hosts, &msg.name, &msg.namespace);
    Ok(Service {
        hosts: msg.hosts.clone(),
        addresses,
        external,
        namespace: msg.namespace.clone(),
        name: msg.name.clone(),
        ports: msg
            .ports
            .iter()
            .map(|p| port(name, &host, p))
            .collect::<Result<_, _>>()?,
        endpoints,
        workloads: msg.endpoints.iter().map(|e| e.workload.clone()).collect(),
        unhealthy: msg
            .endpoints
            .iter()
            .filter(|e| !e.healthy)
            .map(|e| (e.workload.clone(), e.health_detail.clone()))
            .collect(),
        remote,
        cursor: Default::default(),
        routing,
        named: crate::metrics::DestinationService::new(host.clone(), &msg.name, &msg.namespace),
        host,
        headless: msg.headless,
    })
}

/// An IP address or CIDR, as (network, prefix length).
fn network(name: &str, value: &str) -> Result<(std::net::IpAddr, u8), ConvertError> {
    let bad = || ConvertError::Field {
        name: name.to_owned(),
        field: "addresses",
        value: value.to_owned(),
    };
    let (ip, bits) = match value.split_once('/') {
        Some((ip, bits)) => (ip, Some(bits)),
        None => (value, None),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
        None => max,
    };
    Ok((ip, bits))
}

pub fn mesh(name: &str, body: &[u8]) -> Result<MeshInfo, ConvertError> {
    let msg = xds::Mesh::decode(body).map_err(|source| ConvertError::Decode {
        name: name.to_owned(),
        source,
    })?;
    let gateway = if msg.gateway_address.is_empty() {
        None
    } else {
        Some((
            field(name, "gateway_address", &msg.gateway_address)?,
            field(name, "gateway_identity", &msg.gateway_identity)?,
        ))
    };
    let mut failover: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &msg.failover {
        failover
            .entry(f.from.clone())
            .or_default()
            .push(f.to.clone());
    }
    // The trust bundle and CA fingerprint are taken by `proxy_trust::FollowTrust`.
    Ok(MeshInfo {
        cluster: msg.cluster.into(),
        gateway,
        failover,
        federation_stale_since: (msg.federation_stale_since_unix > 0)
            .then_some(msg.federation_stale_since_unix),
        cluster_stale_since: msg.cluster_stale_since_unix.into_iter().collect(),
        unreachable: msg.unreachable_since_unix.into_iter().collect(),
        limit_shares: msg
            .limit_shares
            .into_iter()
            .filter(|(_, rps)| rps.is_finite() && *rps >= 0.0)
            .collect(),
    })
}
