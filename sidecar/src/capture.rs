//! Transparent capture, as Istio's `istio-iptables` sets it up in a pod: `isthmus iptables`
//! (an init container's step) redirects the pod's outbound TCP to the sidecar's outbound
//! capture port (15001) and its inbound TCP to the inbound capture port (15006). The
//! sidecar then finds where each connection was going with `SO_ORIGINAL_DST`.
//!
//! Rules are nftables, in one table `inet isthmus` (IPv4 and IPv6), applied in one
//! transaction that replaces any earlier version of the table. Where `nft` is absent they
//! are iptables rules in chains `ISTHMUS_*` of the nat table, applied with
//! `iptables-restore`. What is never captured:
//! - the proxy's own traffic (its UID or GID, 1337 by default, as Istio's), so the sidecar's
//!   connections leave the pod and never loop back to it;
//! - loopback destinations;
//! - outbound ports and CIDRs excluded (Istio's `traffic.sidecar.istio.io/excludeOutbound*`
//!   annotations), and everything outside the included ones when those are given
//!   (`includeOutboundIPRanges`, `includeOutboundPorts`);
//! - the sidecar's own inbound ports (15008 tunnel, 15000 admin, 15001/15006 capture,
//!   15020/15021/15090 as Istio reserves them), inbound ports excluded
//!   (`excludeInboundPorts`), and all but the included ones when given
//!   (`includeInboundPorts`).
//!
//! With `--redirect-dns`, the pod's DNS queries (UDP and TCP port 53) to its resolvers
//! (the `nameserver`s of its `resolv.conf`, or any server with `--capture-all-dns`) go to
//! the sidecar's DNS proxy (15053, see `dns.rs`), before any other rule: a resolver on
//! loopback is captured too. The proxy's own queries are not.
//!
//! `--cleanup` removes the table (or chains) again. `--dry-run` prints what would be applied.

use std::net::{IpAddr, SocketAddr};

/// Ports the sidecar itself listens on, never captured inbound.
pub const PROXY_PORTS: &[u16] = &[15000, 15001, 15006, 15008, 15020, 15021, 15090];
/// The nftables table the rules live in.
pub const TABLE: &str = "isthmus";
/// The iptables chains (nat table) where nftables is absent.
const OUT_CHAIN: &str = "ISTHMUS_OUTPUT";
const IN_CHAIN: &str = "ISTHMUS_INBOUND";

/// An IP range, `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP range like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?
        };
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `*` (everything) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope<T> {
    All,
    Only(Vec<T>),
}

/// What to capture, with Istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub include_outbound_cidrs: Scope<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub include_outbound_ports: Scope<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_inbound_ports: Scope<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    /// DNS capture: `None` for none, else the resolvers whose queries are captured.
    pub redirect_dns: Option<Scope<IpAddr>>,
    pub dns_port: u16,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            include_outbound_cidrs: Scope::All,
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_ports: Scope::All,
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: Scope::All,
            exclude_inbound_ports: Vec::new(),
            redirect_dns: None,
            dns_port: 15053,
        }
    }
}

/// Parses a comma-separated list as Istio's annotations write it (`*` for all, empty for
/// none).
pub fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Scope<T>, String> {
    if s.trim() == "*" {
        return Ok(Scope::All);
    }
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<T>()
                .map_err(|_| format!("`{p}` is not a valid {what}"))
        })
        .collect::<Result<Vec<T>, String>>()
        .map(Scope::Only)
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

fn family(cidrs: &[Cidr], v4: bool) -> Vec<Cidr> {
    cidrs
        .iter()
        .copied()
        .filter(|c| c.addr.is_ipv4() == v4)
        .collect()
}

/// The rule that leaves every port but `ports` alone (nothing when all are taken).
fn only_ports(ports: &Scope<u16>) -> Option<String> {
    match ports {
        Scope::All => None,
        Scope::Only(p) if p.is_empty() => Some("return".into()),
        Scope::Only(p) => Some(format!("tcp dport != {} return", set(p))),
    }
}

impl Rules {
    /// The nftables ruleset, one transaction: the table is created if absent, deleted, and
    /// defined again, so applying twice leaves one copy.
    pub fn nft(&self) -> String {
        let mut out = vec![
            format!("meta skuid {} return", self.proxy_uid),
            format!("meta skgid {} return", self.proxy_gid),
        ];
        match &self.redirect_dns {
            None => {}
            Some(Scope::All) => out.push(format!(
                "meta l4proto {{ udp, tcp }} th dport 53 redirect to :{}",
                self.dns_port
            )),
            Some(Scope::Only(servers)) => {
                for (v4, kw) in [(true, "ip"), (false, "ip6")] {
                    let servers: Vec<&IpAddr> =
                        servers.iter().filter(|s| s.is_ipv4() == v4).collect();
                    if !servers.is_empty() {
                        out.push(format!(
                            "{kw} daddr {} meta l4proto {{ udp, tcp }} th dport 53 redirect to :{}",
                            set(&servers),
                            self.dns_port
                        ));
                    }
                }
            }
        }
        out.extend([
            "meta l4proto != tcp return".to_owned(),
            "ip daddr 127.0.0.0/8 return".into(),
            "ip6 daddr ::1 return".into(),
        ]);
        if !self.exclude_outbound_ports.is_empty() {
            out.push(format!(
                "tcp dport {} return",
                set(&self.exclude_outbound_ports)
            ));
        }
        for (v4, kw) in [(true, "ip"), (false, "ip6")] {
            let excluded = family(&self.exclude_outbound_cidrs, v4);
            if !excluded.is_empty() {
                out.push(format!("{kw} daddr {} return", set(&excluded)));
            }
        }
        if let Scope::Only(included) = &self.include_outbound_cidrs {
            for (v4, kw, nfproto) in [(true, "ip", "ipv4"), (false, "ip6", "ipv6")] {
                let inc = family(included, v4);
                out.push(if inc.is_empty() {
                    format!("meta nfproto {nfproto} return")
                } else {
                    format!("{kw} daddr != {} return", set(&inc))
                });
            }
        }
        out.extend(only_ports(&self.include_outbound_ports));
        out.push(format!(
            "meta l4proto tcp redirect to :{}",
            self.outbound_port
        ));
        let mut inbound = vec![
            "meta l4proto != tcp return".to_owned(),
            format!("tcp dport {} return", set(&self.inbound_skipped())),
        ];
        inbound.extend(only_ports(&self.include_inbound_ports));
        inbound.push(format!(
            "meta l4proto tcp redirect to :{}",
            self.inbound_port
        ));
        let rules = |lines: Vec<String>| format!("        {}", lines.join("\n        "));
        format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n    chain output {{\n        type nat hook output priority -100; policy accept;\n{}\n    }}\n    chain prerouting {{\n        type nat hook prerouting priority -100; policy accept;\n{}\n    }}\n}}\n",
            rules(out),
            rules(inbound)
        )
    }

    fn inbound_skipped(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = PROXY_PORTS.to_vec();
        ports.extend(&self.exclude_inbound_ports);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The same rules for `iptables-restore` (IPv4; `ip6tables-restore` takes the same with
    /// the IPv6 ranges), for hosts without nftables.
    pub fn iptables(&self, v4: bool) -> String {
        let loopback = if v4 { "127.0.0.0/8" } else { "::1/128" };
        let mut lines = vec![
            "*nat".to_owned(),
            format!(":{OUT_CHAIN} - [0:0]"),
            format!(":{IN_CHAIN} - [0:0]"),
            format!("-A OUTPUT -j {OUT_CHAIN}"),
            format!("-A PREROUTING -p tcp -j {IN_CHAIN}"),
            format!(
                "-A {OUT_CHAIN} -m owner --uid-owner {} -j RETURN",
                self.proxy_uid
            ),
            format!(
                "-A {OUT_CHAIN} -m owner --gid-owner {} -j RETURN",
                self.proxy_gid
            ),
        ];
        let dns_servers: Vec<Option<IpAddr>> = match &self.redirect_dns {
            None => Vec::new(),
            Some(Scope::All) => vec![None],
            Some(Scope::Only(s)) => s
                .iter()
                .filter(|s| s.is_ipv4() == v4)
                .copied()
                .map(Some)
                .collect(),
        };
        for server in dns_servers {
            for proto in ["udp", "tcp"] {
                let d = server.map(|s| format!(" -d {s}")).unwrap_or_default();
                lines.push(format!(
                    "-A {OUT_CHAIN} -p {proto}{d} --dport 53 -j REDIRECT --to-ports {}",
                    self.dns_port
                ));
            }
        }
        lines.push(format!("-A {OUT_CHAIN} ! -p tcp -j RETURN"));
        lines.push(format!("-A {OUT_CHAIN} -d {loopback} -j RETURN"));
        for p in &self.exclude_outbound_ports {
            lines.push(format!("-A {OUT_CHAIN} -p tcp --dport {p} -j RETURN"));
        }
        for c in family(&self.exclude_outbound_cidrs, v4) {
            lines.push(format!("-A {OUT_CHAIN} -d {c} -j RETURN"));
        }
        // iptables has no "not in a set": one REDIRECT per included range and port.
        let cidrs: Vec<Option<Cidr>> = match &self.include_outbound_cidrs {
            Scope::All => vec![None],
            Scope::Only(c) => family(c, v4).into_iter().map(Some).collect(),
        };
        for c in &cidrs {
            for p in scoped(&self.include_outbound_ports) {
                let d = c.map(|c| format!(" -d {c}")).unwrap_or_default();
                let dport = p.map(|p| format!(" --dport {p}")).unwrap_or_default();
                lines.push(format!(
                    "-A {OUT_CHAIN} -p tcp{d}{dport} -j REDIRECT --to-ports {}",
                    self.outbound_port
                ));
            }
        }
        for p in self.inbound_skipped() {
            lines.push(format!("-A {IN_CHAIN} -p tcp --dport {p} -j RETURN"));
        }
        for p in scoped(&self.include_inbound_ports) {
            let dport = p.map(|p| format!(" --dport {p}")).unwrap_or_default();
            lines.push(format!(
                "-A {IN_CHAIN} -p tcp{dport} -j REDIRECT --to-ports {}",
                self.inbound_port
            ));
        }
        lines.push("COMMIT".into());
        lines.join("\n") + "\n"
    }
}

/// Each port of an inclusion list, or one `None` standing for all of them.
fn scoped(ports: &Scope<u16>) -> Vec<Option<u16>> {
    match ports {
        Scope::All => vec![None],
        Scope::Only(p) => p.iter().copied().map(Some).collect(),
    }
}

/// Where a connection accepted on a capture listener was going (`SO_ORIGINAL_DST`);
/// `None` when it was made to the listener itself.
pub fn original_destination(tcp: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let local = tcp.local_addr().ok()?;
    let original = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (original != local).then_some(original)
}

/// The inbound capture listener (15006): a plaintext connection from outside the mesh
/// (a kubelet probe, a caller without a sidecar) goes on to the port it was going to, if
/// the workload's PeerAuthentication lets plaintext reach that port (not `STRICT`). With no
/// policy that applies it is spliced as bytes. Where AuthorizationPolicies (or a
/// RequestAuthentication) apply, HTTP to the app's port is served request by request and
/// each request judged on its method, path and headers, as Istio judges plaintext HTTP;
/// anything else is judged as a connection from a caller with no identity. Mesh callers
/// come over mTLS on 15008, which capture leaves alone.
pub async fn inbound(
    listener: tokio::net::TcpListener,
    ctx: std::sync::Arc<crate::inbound::InboundCtx>,
    drain: isthmus_core::drain::Drain,
) {
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let Some(original) = original_destination(&tcp) else {
            tracing::debug!(%remote, "connection made to the capture port itself; closed");
            continue;
        };
        let policy = ctx.state.borrow().inbound.clone();
        if !policy.plaintext_allowed(original.port()) {
            ctx.metrics.denied("PeerAuthentication STRICT");
            tracing::info!(target: "authz", %remote, port = original.port(), "plaintext refused: PeerAuthentication is STRICT");
            continue;
        }
        let judged = !policy.is_empty() || policy.has_jwt();
        let to_app = ctx.app.is_some_and(|a| a.port() == original.port());
        let ctx = ctx.clone();
        drain.spawn(async move {
            if judged && to_app && crate::outbound::sniff_http(&tcp).await {
                return crate::inbound::serve_plaintext(ctx, tcp, remote, original).await;
            }
            let attributes = crate::authz::Attributes {
                principal: None,
                source_ip: remote.ip(),
                destination_ip: Some(original.ip()),
                destination_port: original.port(),
                http: None,
                auth: None,
            };
            if crate::inbound::authorize(&policy, &ctx.metrics, &attributes).is_err() {
                return;
            }
            let meter = ctx.plaintext_meter(original.port());
            splice_to(meter.io(tcp), remote, original).await
        });
    }
}

/// Splices a captured connection to where it was going. The sidecar's own connection is
/// not captured again: its UID is excluded.
async fn splice_to<S>(mut tcp: S, remote: SocketAddr, original: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::net::TcpStream::connect(original).await {
        Ok(mut app) => {
            let _ = app.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tcp, &mut app).await;
        }
        Err(e) => {
            tracing::debug!(%remote, %original, error = %e, "captured inbound: the app refused")
        }
    }
}

/// What removes the rules: the nftables table, or the iptables chains.
pub fn nft_cleanup() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

pub fn iptables_cleanup() -> String {
    format!("*nat\n-D OUTPUT -j {OUT_CHAIN}\n-D PREROUTING -p tcp -j {IN_CHAIN}\n-F {OUT_CHAIN}\n-F {IN_CHAIN}\n-X {OUT_CHAIN}\n-X {IN_CHAIN}\nCOMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_redirect_everything_but_the_proxy_and_loopback() {
        let nft = Rules::default().nft();
        assert!(nft.starts_with("table inet isthmus\ndelete table inet isthmus\n"));
        for line in [
            "meta skuid 1337 return",
            "meta skgid 1337 return",
            "ip daddr 127.0.0.0/8 return",
            "meta l4proto tcp redirect to :15001",
            "tcp dport { 15000, 15001, 15006, 15008, 15020, 15021, 15090 } return",
            "meta l4proto tcp redirect to :15006",
        ] {
            assert!(nft.contains(line), "{line} missing in\n{nft}");
        }
        // The proxy's exclusion comes before the redirect.
        assert!(
            nft.find("skuid").expect("uid") < nft.find("redirect to :15001").expect("redirect")
        );
    }

    #[test]
    fn istio_annotations_become_exclusions_and_inclusions() {
        let rules = Rules {
            exclude_outbound_ports: vec![3306, 6379],
            exclude_outbound_cidrs: vec![
                "10.0.0.0/8".parse().expect("cidr"),
                "fd00::/8".parse().expect("cidr"),
            ],
            include_outbound_cidrs: parse_list("10.96.0.0/12", "IP range").expect("list"),
            include_inbound_ports: parse_list("8080, 9090", "port").expect("list"),
            exclude_inbound_ports: vec![9000],
            ..Rules::default()
        };
        let nft = rules.nft();
        for line in [
            "tcp dport { 3306, 6379 } return",
            "ip daddr { 10.0.0.0/8 } return",
            "ip6 daddr { fd00::/8 } return",
            "ip daddr != { 10.96.0.0/12 } return",
            "meta nfproto ipv6 return",
            "tcp dport { 9000, 15000, 15001, 15006, 15008, 15020, 15021, 15090 } return",
            "tcp dport != { 8080, 9090 } return",
        ] {
            assert!(nft.contains(line), "{line} missing in\n{nft}");
        }
        let ipt = rules.iptables(true);
        for line in [
            "-A ISTHMUS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTHMUS_OUTPUT -p tcp --dport 3306 -j RETURN",
            "-A ISTHMUS_OUTPUT -d 10.0.0.0/8 -j RETURN",
            "-A ISTHMUS_OUTPUT -p tcp -d 10.96.0.0/12 -j REDIRECT --to-ports 15001",
            "-A ISTHMUS_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
        ] {
            assert!(ipt.contains(line), "{line} missing in\n{ipt}");
        }
        assert!(
            !ipt.contains("fd00::/8"),
            "IPv6 ranges stay out of the IPv4 rules"
        );
    }

    #[test]
    fn dns_to_the_pod_s_resolvers_goes_to_the_dns_proxy_before_anything_is_excluded() {
        let rules = Rules {
            redirect_dns: Some(Scope::Only(vec![
                "10.96.0.10".parse().expect("ip"),
                "fd00::a".parse().expect("ip"),
            ])),
            ..Rules::default()
        };
        let nft = rules.nft();
        let dns =
            "ip daddr { 10.96.0.10 } meta l4proto { udp, tcp } th dport 53 redirect to :15053";
        assert!(nft.contains(dns), "{nft}");
        assert!(nft.contains(
            "ip6 daddr { fd00::a } meta l4proto { udp, tcp } th dport 53 redirect to :15053"
        ));
        // The proxy's own queries leave; the rule comes before the loopback and non-TCP
        // exclusions, so a resolver on 127.0.0.53 is captured too.
        let at = |l: &str| {
            nft.find(l)
                .unwrap_or_else(|| panic!("{l} missing in\n{nft}"))
        };
        assert!(at("meta skuid 1337 return") < at(dns));
        assert!(at(dns) < at("meta l4proto != tcp return"));
        assert!(at(dns) < at("ip daddr 127.0.0.0/8 return"));
        let ipt = rules.iptables(true);
        for line in [
            "-A OUTPUT -j ISTHMUS_OUTPUT",
            "-A ISTHMUS_OUTPUT -p udp -d 10.96.0.10 --dport 53 -j REDIRECT --to-ports 15053",
            "-A ISTHMUS_OUTPUT -p tcp -d 10.96.0.10 --dport 53 -j REDIRECT --to-ports 15053",
            "-A ISTHMUS_OUTPUT ! -p tcp -j RETURN",
        ] {
            assert!(ipt.contains(line), "{line} missing in\n{ipt}");
        }
        assert!(!ipt.contains("fd00::a"));
        let all = Rules {
            redirect_dns: Some(Scope::All),
            ..Rules::default()
        };
        assert!(all
            .nft()
            .contains("meta l4proto { udp, tcp } th dport 53 redirect to :15053"));
        assert!(
            !Rules::default().nft().contains("dport 53"),
            "off unless asked"
        );
    }

    #[test]
    fn bad_lists_are_refused_by_value() {
        assert_eq!(
            parse_list::<Cidr>("10.0.0.0/33", "IP range"),
            Err("`10.0.0.0/33` is not a valid IP range".into())
        );
        assert_eq!(
            parse_list::<u16>("80, http", "port"),
            Err("`http` is not a valid port".into())
        );
        assert_eq!(parse_list::<u16>("*", "port"), Ok(Scope::All));
        assert_eq!(parse_list::<u16>("", "port"), Ok(Scope::Only(Vec::new())));
    }
}
