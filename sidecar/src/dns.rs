//! The DNS proxy (15053, UDP and TCP), as Istio's DNS proxying: capture sends the pod's
//! DNS queries here (`isthmus iptables --redirect-dns`), and the names of the mesh are
//! answered from the registry the controller pushed, so an app resolves services no
//! cluster DNS knows:
//! - `name.ns.svc.cluster.local`, `name.ns.svc.clusterset.local` (and the shorter forms
//!   the registry knows, and a ServiceEntry's exact hosts): the service's addresses, its
//!   cluster IPs or the virtual IP the controller allocated to a service only other
//!   clusters run (`A`, `AAAA`; the other type is an empty answer, not an error);
//! - a headless Service's name: the addresses of its ready endpoints in this cluster, and
//!   `<endpoint>.name.ns.svc.cluster.local` for each one, named by its EndpointSlice
//!   `hostname` or its dashed address (`10-1-0-5`), as Kubernetes DNS names them;
//! - `_port._tcp.name.ns.svc.cluster.local`: `SRV` records for a named port, with the
//!   targets' addresses in the additional section.
//!
//! Everything else goes to the pod's own resolvers (the `nameserver`s of its
//! `/etc/resolv.conf`, read at start, or `--dns-upstream`) through hickory's resolver,
//! which caches by TTL and retries over TCP; its answer, `NXDOMAIN` included, goes back
//! as it came. The sidecar's own queries leave the pod uncaptured (its UID is excluded),
//! so forwarding never loops. With no upstream, names under the mesh domains that the
//! registry does not know are `NXDOMAIN`, others `SERVFAIL`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::state::{MeshState, Service};

/// TTL of the answers from the registry (Istio's DNS proxy uses the same).
pub const TTL: u32 = 30;
/// The domains the mesh's own names live under.
const MESH_DOMAINS: [&str; 2] = [".svc.cluster.local", ".svc.clusterset.local"];
/// How long a client's TCP connection may sit idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers the queries: the registry, then the upstream resolvers.
pub struct DnsProxy {
    state: watch::Receiver<Arc<MeshState>>,
    upstream: Option<TokioResolver>,
    metrics: Arc<Metrics>,
}

impl DnsProxy {
    /// `upstream`: the resolvers names outside the mesh go to; empty for none.
    pub fn new(
        state: watch::Receiver<Arc<MeshState>>,
        upstream: &[SocketAddr],
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstream = (!upstream.is_empty()).then(|| {
            let servers = upstream
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            let mut opts = ResolverOpts::default();
            // Names arrive fully qualified: no search list, no hosts file, and the
            // whole CNAME chain goes back to the client.
            opts.ndots = 0;
            opts.use_hosts_file = ResolveHosts::Never;
            opts.preserve_intermediates = true;
            opts.timeout = Duration::from_secs(2);
            opts.attempts = 2;
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            );
            *builder.options_mut() = opts;
            builder.build()
        });
        let upstream = match upstream {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "DNS proxy: no upstream resolver; names outside the mesh fail");
                None
            }
            None => None,
        };
        Self {
            state,
            upstream,
            metrics,
        }
    }

    /// Serves queries on `udp` and `tcp` until the task is dropped.
    pub async fn serve(self, udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener) {
        let mut server = hickory_server::Server::new(self);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT, 64 * 1024);
        if let Err(e) = server.block_until_done().await {
            tracing::warn!(error = %e, "DNS proxy stopped");
        }
    }
}

/// The name servers of a `resolv.conf`, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            // An IPv6 link-local address may carry a zone (`fe80::1%eth0`).
            let ip = rest.trim().split('%').next()?;
            ip.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// What the registry says of a name.
#[derive(Debug, PartialEq)]
enum Answer {
    /// A mesh name: these records (none when it has no record of the type asked for).
    Mesh {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// Not a name the registry knows.
    Unknown,
}

/// The address records of `ips` for `name`, of the type asked for.
fn address_records(name: &Name, ips: &[IpAddr], qtype: RecordType) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(name.clone(), TTL, rdata))
        .collect()
}

/// A name under `parent` (one more label in front of it).
fn child(label: &str, parent: &Name) -> Option<Name> {
    Name::from_ascii(label).ok()?.append_domain(parent).ok()
}

/// Whether `name` is in the clusterset domain, whose headless names span every cluster
/// (the Multi-Cluster Services DNS spec); `cluster.local` names this cluster's alone.
fn clusterset(name: &str) -> bool {
    name.ends_with(".svc.clusterset.local")
}

/// The endpoints of a headless service, each with its DNS label relative to the
/// service's name: here `db-0` (its hostname, else its dashed address), and with
/// `everywhere`, in other clusters `db-0.west` at the virtual IP the controller gave it.
fn endpoint_labels(svc: &Service, everywhere: bool) -> Vec<(String, IpAddr)> {
    let mut out: Vec<(String, IpAddr)> = Vec::new();
    if svc.headless {
        out.extend(svc.endpoints.iter().map(|e| {
            let ip = e.tunnel_address.ip();
            (
                isthmus_core::config::endpoint_label(e.hostname.as_deref(), ip),
                ip,
            )
        }));
    }
    if everywhere {
        for rc in &svc.remote {
            out.extend(
                rc.endpoints
                    .iter()
                    .map(|(ep, vip)| (format!("{ep}.{}", rc.cluster), *vip)),
            );
        }
    }
    out
}

/// The addresses a service's name resolves to: a headless one's endpoints (with
/// `everywhere`, those of other clusters too, so a service headless only elsewhere lists
/// them), else its cluster IPs or virtual IP (host addresses only: a ServiceEntry's CIDR
/// is no answer).
fn service_ips(svc: &Service, everywhere: bool) -> Vec<IpAddr> {
    let endpoints = endpoint_labels(svc, everywhere);
    if svc.headless || !endpoints.is_empty() {
        return endpoints.into_iter().map(|(_, ip)| ip).collect();
    }
    svc.addresses
        .iter()
        .filter(|a| is_host(a))
        .map(|(ip, _)| *ip)
        .collect()
}

/// Whether an address range is one address (a ServiceEntry's CIDR is no DNS answer).
fn is_host((ip, bits): &(IpAddr, u8)) -> bool {
    u32::from(*bits) == if ip.is_ipv4() { 32 } else { 128 }
}

/// A service the registry knows by this exact name and that has an address to answer
/// with (a service outside the mesh without addresses is the upstream's to answer).
fn named<'a>(state: &'a MeshState, name: &str) -> Option<&'a Arc<Service>> {
    let svc = state.services.get(state.hosts.get(name)?)?;
    (svc.headless || svc.addresses.iter().any(is_host)).then_some(svc)
}

const NO_RECORDS: Answer = Answer::Mesh {
    answers: Vec::new(),
    additionals: Vec::new(),
};

/// Answers `qname` (lower case, fully qualified) from the registry.
fn answer(state: &MeshState, qname: &Name, qtype: RecordType) -> Answer {
    let text = qname.to_ascii();
    let text = text.trim_end_matches('.');
    if let Some(svc) = named(state, text) {
        return Answer::Mesh {
            answers: address_records(qname, &service_ips(svc, clusterset(text)), qtype),
            additionals: Vec::new(),
        };
    }
    let Some((first, rest)) = text.split_once('.') else {
        return Answer::Unknown;
    };
    // `_port._tcp.<service>`: the named port, as SRV.
    if let Some(port_name) = first.strip_prefix('_') {
        let Some((proto, service_name)) = rest.split_once('.') else {
            return Answer::Unknown;
        };
        let Some(svc) = named(state, service_name) else {
            return Answer::Unknown;
        };
        let target = qname.base_name().base_name();
        let port = svc.ports.iter().find(|p| &*p.name == port_name);
        let (Some(port), "_tcp", RecordType::SRV) = (port, proto, qtype) else {
            // The service exists; it has no such port, or no records of that type.
            return NO_RECORDS;
        };
        let srv = |target: Name, port: u16| {
            Record::from_rdata(
                qname.clone(),
                TTL,
                RData::SRV(SRV::new(0, 100, port, target)),
            )
        };
        let mut additionals = Vec::new();
        let mut answers = Vec::new();
        let endpoints = endpoint_labels(svc, clusterset(service_name));
        if svc.headless || !endpoints.is_empty() {
            for (label, ip) in endpoints {
                let Some(name) = child(&label, &target) else {
                    continue;
                };
                answers.push(srv(name.clone(), port.target_port));
                for t in [RecordType::A, RecordType::AAAA] {
                    additionals.extend(address_records(&name, &[ip], t));
                }
            }
        } else {
            let ips = service_ips(svc, false);
            for t in [RecordType::A, RecordType::AAAA] {
                additionals.extend(address_records(&target, &ips, t));
            }
            answers.push(srv(target, port.port));
        }
        return Answer::Mesh {
            answers,
            additionals,
        };
    }
    // `<endpoint>.<headless service>`, or `<endpoint>.<cluster>.<service>` for an
    // endpoint in another cluster.
    let mut candidates = vec![(first.to_owned(), rest)];
    if let Some((cluster, service_name)) = rest.split_once('.') {
        candidates.push((format!("{first}.{cluster}"), service_name));
    }
    for (label, service_name) in candidates {
        let Some(svc) = named(state, service_name) else {
            continue;
        };
        let ips: Vec<IpAddr> = endpoint_labels(svc, clusterset(service_name))
            .into_iter()
            .filter(|(l, _)| *l == label)
            .map(|(_, ip)| ip)
            .collect();
        if !ips.is_empty() {
            return Answer::Mesh {
                answers: address_records(qname, &ips, qtype),
                additionals: Vec::new(),
            };
        }
    }
    Answer::Unknown
}

/// The SOA that makes an empty or negative answer of ours cacheable for [`TTL`].
fn soa(qname: &Name) -> Record {
    let zone = if qname.to_ascii().ends_with(".clusterset.local.") {
        "clusterset.local."
    } else {
        "cluster.local."
    };
    let zone = Name::from_ascii(zone).expect("a valid name");
    let mname = child("ns.dns", &zone).unwrap_or_else(|| zone.clone());
    let rname = child("hostmaster", &zone).unwrap_or_else(|| zone.clone());
    Record::from_rdata(
        zone,
        TTL,
        RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL)),
    )
}

fn in_mesh_domain(qname: &Name) -> bool {
    let text = qname.to_ascii();
    let text = text.trim_end_matches('.');
    MESH_DOMAINS.iter().any(|d| text.ends_with(d))
}

#[async_trait::async_trait]
impl RequestHandler for DnsProxy {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut response_edns = None;
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e.set_version(0);
            response_edns = Some(e);
        }
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let query = match (request.metadata.op_code, request.queries.queries()) {
            (OpCode::Query, [query]) => query,
            (OpCode::Query, _) => {
                self.metrics.dns("refused");
                return send(
                    &mut response_handle,
                    builder.error_msg(&request.metadata, ResponseCode::FormErr),
                    &request.metadata,
                )
                .await;
            }
            _ => {
                self.metrics.dns("refused");
                return send(
                    &mut response_handle,
                    builder.error_msg(&request.metadata, ResponseCode::NotImp),
                    &request.metadata,
                )
                .await;
            }
        };
        let qname: Name = query.name().into();
        let qtype = query.query_type();
        let state = self.state.borrow().clone();
        match answer(&state, &qname, qtype) {
            Answer::Mesh {
                answers,
                additionals,
            } => {
                self.metrics.dns("mesh");
                metadata.authoritative = true;
                let negative = answers.is_empty().then(|| soa(&qname));
                let response =
                    builder.build(metadata, &answers, &[], negative.iter(), &additionals);
                send(&mut response_handle, response, &request.metadata).await
            }
            Answer::Unknown => {
                let Some(upstream) = &self.upstream else {
                    let (code, what) = if in_mesh_domain(&qname) {
                        (ResponseCode::NXDomain, "nxdomain")
                    } else {
                        (ResponseCode::ServFail, "upstream_failure")
                    };
                    self.metrics.dns(what);
                    metadata.response_code = code;
                    let negative = (code == ResponseCode::NXDomain).then(|| soa(&qname));
                    let response = builder.build(metadata, &[], &[], negative.iter(), &[]);
                    return send(&mut response_handle, response, &request.metadata).await;
                };
                match upstream.lookup(qname.clone(), qtype).await {
                    Ok(lookup) => {
                        self.metrics.dns("forwarded");
                        let response = builder.build(
                            metadata,
                            lookup.answers(),
                            lookup.authorities(),
                            &[],
                            lookup.additionals(),
                        );
                        send(&mut response_handle, response, &request.metadata).await
                    }
                    Err(e) if e.is_no_records_found() => {
                        self.metrics.dns("forwarded");
                        metadata.response_code = if e.is_nx_domain() {
                            ResponseCode::NXDomain
                        } else {
                            ResponseCode::NoError
                        };
                        let soa = e.into_soa().map(|s| s.into_record_of_rdata());
                        let response = builder.build(metadata, &[], &[], soa.iter(), &[]);
                        send(&mut response_handle, response, &request.metadata).await
                    }
                    Err(e) => {
                        self.metrics.dns("upstream_failure");
                        tracing::debug!(name = %qname, error = %e, "DNS proxy: upstream failed");
                        metadata.response_code = ResponseCode::ServFail;
                        let response = builder.build(metadata, &[], &[], &[], &[]);
                        send(&mut response_handle, response, &request.metadata).await
                    }
                }
            }
        }
    }
}

/// Sends a response; a client gone before it is answered counts as served.
async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "DNS proxy: the answer could not be sent");
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata,
                counts: Default::default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LocalEndpoint, Port};
    use isthmus_core::identity::SpiffeId;

    fn endpoint(ip: &str, hostname: Option<&str>) -> LocalEndpoint {
        LocalEndpoint {
            workload: format!("demo/{ip}"),
            tunnel_address: format!("{ip}:15008").parse().expect("address"),
            identity: SpiffeId::new("cluster.local", "demo", "db"),
            locality: Default::default(),
            labels: Default::default(),
            health: crate::lb::HealthTable::default().get(ip),
            hostname: hostname.map(Into::into),
        }
    }

    fn service(name: &str, addresses: &[&str], headless: bool, eps: Vec<LocalEndpoint>) -> Service {
        let host = Service::name_of(&[], name, "demo");
        Service {
            namespace: "demo".into(),
            name: name.into(),
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: "http".into(),
                target_port: 8080,
                authority: Port::authority_of(&host, 80),
            }],
            endpoints: eps,
            workloads: Vec::new(),
            unhealthy: Vec::new(),
            remote: Vec::new(),
            cursor: Default::default(),
            routing: None,
            hosts: Vec::new(),
            addresses: addresses
                .iter()
                .map(|a| {
                    let ip: IpAddr = a.parse().expect("ip");
                    (ip, if ip.is_ipv4() { 32 } else { 128 })
                })
                .collect(),
            external: None,
            named: crate::metrics::DestinationService::new(host.clone(), name, "demo"),
            host,
            headless,
        }
    }

    fn mesh() -> MeshState {
        let mut state = MeshState::default();
        for svc in [
            service("echo", &["10.96.0.20", "fd00::20"], false, vec![]),
            // Only other clusters run it: the controller gave it a virtual IP.
            service("hello", &["240.240.7.9"], false, vec![]),
            service(
                "db",
                &[],
                true,
                vec![
                    endpoint("10.1.0.5", Some("db-0")),
                    endpoint("10.1.0.6", None),
                ],
            ),
        ] {
            let mut svc = svc;
            if svc.name == "db" {
                // Its endpoint db-1 runs in west, known here by a virtual IP.
                svc.remote.push(crate::state::RemoteCluster {
                    cluster: "west".into(),
                    locality: Default::default(),
                    identities: Vec::new(),
                    health: crate::lb::HealthTable::default().get("west"),
                    label_sets: Vec::new(),
                    endpoints: vec![("db-1".into(), "240.240.9.9".parse().expect("ip"))],
                    endpoint: None,
                });
            }
            state
                .services
                .insert(format!("demo/{}", svc.name), Arc::new(svc));
        }
        state.index("demo");
        state
    }

    fn ask(state: &MeshState, name: &str, t: RecordType) -> Option<Vec<String>> {
        match answer(state, &Name::from_ascii(name).expect("name"), t) {
            Answer::Mesh { answers, .. } => {
                Some(answers.iter().map(|r| r.data.to_string()).collect())
            }
            Answer::Unknown => None,
        }
    }

    #[test]
    fn service_names_resolve_to_their_cluster_or_virtual_ips() {
        let state = mesh();
        for name in [
            "echo.demo.svc.cluster.local.",
            "echo.demo.svc.clusterset.local.",
        ] {
            assert_eq!(
                ask(&state, name, RecordType::A),
                Some(vec!["10.96.0.20".into()])
            );
            assert_eq!(
                ask(&state, name, RecordType::AAAA),
                Some(vec!["fd00::20".into()])
            );
        }
        assert_eq!(
            ask(&state, "hello.demo.svc.cluster.local.", RecordType::A),
            Some(vec!["240.240.7.9".into()])
        );
        // The name exists, it has no IPv6 address and no TXT: an empty answer, not NXDOMAIN.
        assert_eq!(
            ask(&state, "hello.demo.svc.cluster.local.", RecordType::AAAA),
            Some(vec![])
        );
        assert_eq!(
            ask(&state, "echo.demo.svc.cluster.local.", RecordType::TXT),
            Some(vec![])
        );
        // Not the mesh's to answer: the upstream's.
        assert_eq!(
            ask(&state, "nosuch.demo.svc.cluster.local.", RecordType::A),
            None
        );
        assert_eq!(ask(&state, "example.com.", RecordType::A), None);
        assert!(in_mesh_domain(
            &Name::from_ascii("nosuch.demo.svc.cluster.local.").expect("name")
        ));
        assert!(!in_mesh_domain(
            &Name::from_ascii("example.com.").expect("name")
        ));
    }

    #[test]
    fn a_headless_service_resolves_to_its_endpoints_and_names_each_one() {
        let state = mesh();
        let mut all = ask(&state, "db.demo.svc.cluster.local.", RecordType::A).expect("known");
        all.sort();
        assert_eq!(all, vec!["10.1.0.5", "10.1.0.6"]);
        assert_eq!(
            ask(&state, "db-0.db.demo.svc.cluster.local.", RecordType::A),
            Some(vec!["10.1.0.5".into()])
        );
        assert_eq!(
            ask(&state, "10-1-0-6.db.demo.svc.cluster.local.", RecordType::A),
            Some(vec!["10.1.0.6".into()])
        );
        assert_eq!(
            ask(&state, "db-9.db.demo.svc.cluster.local.", RecordType::A),
            None
        );
        // A connection to one of those addresses (at the target port) reaches that endpoint
        // only.
        let pinned = state
            .resolve_ip("10.1.0.6".parse().expect("ip"))
            .expect("the endpoint's address is known");
        assert_eq!(pinned.endpoints.len(), 1);
        assert_eq!(
            pinned.endpoints[0].tunnel_address.to_string(),
            "10.1.0.6:15008"
        );
        assert!(pinned.port(Some(8080)).is_some() && pinned.port(Some(80)).is_none());
        // Across clusters (the clusterset domain): every cluster's endpoints, and each by
        // `<endpoint>.<cluster>.<service>`, at the virtual IP that reaches only it.
        let mut everywhere =
            ask(&state, "db.demo.svc.clusterset.local.", RecordType::A).expect("known");
        everywhere.sort();
        assert_eq!(everywhere, vec!["10.1.0.5", "10.1.0.6", "240.240.9.9"]);
        assert_eq!(
            ask(
                &state,
                "db-1.west.db.demo.svc.clusterset.local.",
                RecordType::A
            ),
            Some(vec!["240.240.9.9".into()])
        );
        let remote = state
            .resolve_ip("240.240.9.9".parse().expect("ip"))
            .expect("the virtual IP is known");
        assert!(remote.endpoints.is_empty());
        assert_eq!(remote.remote.len(), 1);
        assert_eq!(remote.remote[0].endpoint.as_deref(), Some("db-1"));
        // A name under a service with a cluster IP is no endpoint's.
        assert_eq!(
            ask(&state, "x.echo.demo.svc.cluster.local.", RecordType::A),
            None
        );
    }

    #[test]
    fn srv_names_a_port_and_its_targets() {
        let state = mesh();
        let name = Name::from_ascii("_http._tcp.echo.demo.svc.cluster.local.").expect("name");
        let Answer::Mesh {
            answers,
            additionals,
        } = answer(&state, &name, RecordType::SRV)
        else {
            panic!("a mesh name");
        };
        assert_eq!(
            answers
                .iter()
                .map(|r| r.data.to_string())
                .collect::<Vec<_>>(),
            vec!["0 100 80 echo.demo.svc.cluster.local."]
        );
        assert_eq!(additionals.len(), 2, "its A and AAAA: {additionals:?}");
        let mut headless = ask(
            &state,
            "_http._tcp.db.demo.svc.cluster.local.",
            RecordType::SRV,
        )
        .expect("known");
        headless.sort();
        assert_eq!(
            headless,
            vec![
                "0 100 8080 10-1-0-6.db.demo.svc.cluster.local.",
                "0 100 8080 db-0.db.demo.svc.cluster.local.",
            ]
        );
        assert_eq!(
            ask(
                &state,
                "_grpc._tcp.echo.demo.svc.cluster.local.",
                RecordType::SRV
            ),
            Some(vec![]),
            "no such port: an empty answer"
        );
    }

    /// A resolver asking the proxy at `udp` / `tcp`, over the protocol given.
    fn client(udp: SocketAddr, tcp: SocketAddr, over_tcp: bool) -> TokioResolver {
        use hickory_resolver::config::ConnectionConfig;
        let connection = if over_tcp {
            let mut c = ConnectionConfig::tcp();
            c.port = tcp.port();
            c
        } else {
            let mut c = ConnectionConfig::udp();
            c.port = udp.port();
            c
        };
        let server = NameServerConfig::new(udp.ip(), true, vec![connection]);
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![server]),
            TokioRuntimeProvider::default(),
        );
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.options_mut().attempts = 1;
        builder.options_mut().cache_size = 0;
        builder.build().expect("a resolver")
    }

    #[tokio::test]
    async fn garbage_and_silence_harm_no_other_client() {
        use tokio::io::AsyncWriteExt;
        let (_tx, rx) = watch::channel(Arc::new(mesh()));
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("udp");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("tcp");
        let (udp_addr, tcp_addr) = (
            udp.local_addr().expect("addr"),
            tcp.local_addr().expect("addr"),
        );
        let metrics = Arc::new(Metrics::default());
        let server = tokio::spawn(DnsProxy::new(rx, &[], metrics.clone()).serve(udp, tcp));

        // A hostile client: short, oversized and lying packets over UDP; over TCP a length
        // that promises more than comes, a connection that says nothing, and noise.
        let bad = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("udp");
        let mut lying = vec![0u8; 12];
        lying[5] = 100; // a header claiming 100 questions, with none
        for packet in [vec![0u8], vec![0xffu8; 4000], lying] {
            bad.send_to(&packet, udp_addr).await.expect("sent");
        }
        let mut promise = tokio::net::TcpStream::connect(tcp_addr).await.expect("tcp");
        promise
            .write_all(&[0xff, 0xff, 1, 2, 3])
            .await
            .expect("written");
        let _silent = tokio::net::TcpStream::connect(tcp_addr).await.expect("tcp");
        let mut noise = tokio::net::TcpStream::connect(tcp_addr).await.expect("tcp");
        noise
            .write_all(&[0, 4, 0xde, 0xad, 0xbe, 0xef])
            .await
            .expect("written");

        // Everyone else is answered, over both protocols.
        for over_tcp in [false, true] {
            let r = client(udp_addr, tcp_addr, over_tcp);
            let ips: Vec<IpAddr> = r
                .lookup_ip("echo.demo.svc.cluster.local.")
                .await
                .expect("answered")
                .iter()
                .collect();
            assert!(ips.contains(&"10.96.0.20".parse().expect("ip")), "{ips:?}");
            // A mesh name the registry does not know, with no upstream: NXDOMAIN.
            let e = r
                .lookup_ip("nosuch.demo.svc.cluster.local.")
                .await
                .expect_err("no such name");
            assert!(e.is_nx_domain(), "{e}");
            // Anything else, with no upstream: a failure, not a made-up answer.
            let e = r.lookup_ip("example.com.").await.expect_err("no upstream");
            assert!(!e.is_no_records_found(), "SERVFAIL, not an answer: {e}");
        }
        assert!(!server.is_finished(), "the proxy still serves");
        server.abort();
    }

    #[test]
    fn resolv_conf_nameservers_are_read_as_a_resolver_reads_them() {
        let conf = "# generated\nsearch demo.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().expect("addr"),
                "[fe80::1]:53".parse().expect("addr"),
            ]
        );
    }
}
