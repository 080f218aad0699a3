//! Inbound security policy, as the controller resolved it for this workload: the
//! PeerAuthentication mode of each port (may plaintext come in?) and Istio's
//! AuthorizationPolicy evaluation for every request and connection that comes in.
//!
//! Evaluation order is Istio's: a matching DENY policy denies; with no ALLOW policy,
//! everything else is allowed; with ALLOW policies, only what one of them matches. AUDIT
//! policies are only reported. A policy marked `istio.io/dry-run` is evaluated and
//! reported ("would deny") but never decides.
//!
//! What a request is judged on: the caller's principal (its SPIFFE ID without
//! `spiffe://`, proved by mTLS; none for plaintext), the connection's source address, the
//! destination port (the workload's port), and for HTTP the Host, method, the normalized
//! path (without query) and headers. A connection carrying opaque TCP has no HTTP
//! attributes: as Istio does, an ALLOW rule that needs one matches nothing, and a DENY
//! rule is judged without its HTTP fields (so it denies more, never less).
//!
//! JWT (`requestPrincipals`, `request.auth.*`) is not validated yet: such attributes are
//! absent, so positive matches on them fail and negative ones hold, as for a request
//! without a token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use isthmus_proto::discovery as xds;

/// Istio's string match.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any value that is present.
    Present,
}

impl Matcher {
    fn new(v: &str) -> Self {
        if v == "*" {
            Matcher::Present
        } else if let Some(p) = v.strip_suffix('*') {
            Matcher::Prefix(p.to_owned())
        } else if let Some(s) = v.strip_prefix('*') {
            Matcher::Suffix(s.to_owned())
        } else {
            Matcher::Exact(v.to_owned())
        }
    }

    fn lower(v: &str) -> Self {
        Self::new(&v.to_ascii_lowercase())
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(e) => value == e,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Suffix(s) => value.ends_with(s.as_str()),
            Matcher::Present => !value.is_empty(),
        }
    }
}

/// A positive and a negative list of one attribute: the value must match one of `any`
/// (when given) and none of `none`. An absent value matches no positive list and every
/// negative one.
#[derive(Debug, Clone)]
struct Field<M> {
    any: Vec<M>,
    none: Vec<M>,
}

impl<M> Field<M> {
    fn given(&self) -> bool {
        !self.any.is_empty() || !self.none.is_empty()
    }

    fn test(&self, hit: impl Fn(&M) -> bool, present: bool) -> bool {
        if !present {
            return self.any.is_empty();
        }
        (self.any.is_empty() || self.any.iter().any(&hit)) && !self.none.iter().any(&hit)
    }
}

fn strings(any: &[String], none: &[String], make: fn(&str) -> Matcher) -> Field<Matcher> {
    Field {
        any: any.iter().map(|v| make(v)).collect(),
        none: none.iter().map(|v| make(v)).collect(),
    }
}

fn blocks(list: &[String]) -> Vec<(IpAddr, u8)> {
    list.iter()
        .filter_map(|b| {
            let (ip, bits) = b.split_once('/').unwrap_or((b, ""));
            let ip: IpAddr = ip.parse().ok()?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = if bits.is_empty() {
                max
            } else {
                bits.parse().ok()?
            };
            Some((ip, bits))
        })
        .collect()
}

fn ip_field(any: &[String], none: &[String]) -> Field<(IpAddr, u8)> {
    Field {
        any: blocks(any),
        none: blocks(none),
    }
}

fn port_field(any: &[u32], none: &[u32]) -> Field<u32> {
    Field {
        any: any.to_vec(),
        none: none.to_vec(),
    }
}

#[derive(Debug, Clone)]
struct Source {
    principals: Field<Matcher>,
    request_principals: Field<Matcher>,
    namespaces: Field<Matcher>,
    ip_blocks: Field<(IpAddr, u8)>,
    remote_ip_blocks: Field<(IpAddr, u8)>,
    service_accounts: Field<Matcher>,
}

#[derive(Debug, Clone)]
struct Operation {
    hosts: Field<Matcher>,
    ports: Field<u32>,
    methods: Field<Matcher>,
    paths: Field<Matcher>,
}

#[derive(Debug, Clone)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    SourceServiceAccount,
    DestinationIp,
    DestinationPort,
    /// `request.auth.*`, `connection.sni`: not known here yet.
    Unknown,
}

#[derive(Debug, Clone)]
struct Condition {
    key: Key,
    strings: Field<Matcher>,
    ips: Field<(IpAddr, u8)>,
}

#[derive(Debug, Clone)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// Whether it names an attribute only HTTP has.
    http_only: bool,
}

#[derive(Debug, Clone)]
struct Policy {
    name: Arc<str>,
    dry_run: bool,
    rules: Vec<Rule>,
}

/// What a request or connection is judged on.
pub struct Attributes<'a> {
    /// `trust-domain/ns/<namespace>/sa/<account>`, proved by mTLS; `None` for plaintext.
    pub principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub http: Option<Http<'a>>,
}

/// The HTTP attributes of a request.
pub struct Http<'a> {
    pub host: &'a str,
    pub method: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    /// The path as an app that is lax about paths may read it (see [`lax_path`]): DENY
    /// rules match it as well, so such an app cannot be reached around them.
    pub lax_path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// `path` (normalized already) decoded further (`%2F`, `%5C`), with doubled slashes
/// merged, and in lower case: what a case-insensitive app that decodes slashes sees.
/// `/x%2F..%2FADMIN` and `//Admin` both read `/admin`.
pub fn lax_path(path: &str) -> String {
    let mode = isthmus_core::path::Normalization::DecodeAndMergeSlashes;
    match isthmus_core::path::normalize(path, mode) {
        Ok(Some(p)) => p.to_ascii_lowercase(),
        _ => path.to_ascii_lowercase(),
    }
}

impl Attributes<'_> {
    fn namespace(&self) -> Option<&str> {
        let rest = self.principal?.split_once("/ns/")?.1;
        Some(rest.split_once("/sa/")?.0)
    }

    /// `namespace/account`.
    fn service_account(&self) -> Option<String> {
        let rest = self.principal?.split_once("/ns/")?.1;
        let (ns, sa) = rest.split_once("/sa/")?;
        Some(format!("{ns}/{sa}"))
    }
}

fn within(ip: IpAddr, blocks: &(IpAddr, u8)) -> bool {
    crate::state::within(ip, blocks.0, blocks.1)
}

impl Source {
    fn matches(&self, a: &Attributes<'_>, http: bool) -> bool {
        let principal = a.principal.unwrap_or_default();
        let ns = a.namespace().unwrap_or_default();
        let sa = a.service_account().unwrap_or_default();
        self.principals
            .test(|m| m.matches(principal), a.principal.is_some())
            && (!http || self.request_principals.test(|_| false, false))
            && self
                .namespaces
                .test(|m| m.matches(ns), a.principal.is_some())
            && self
                .service_accounts
                .test(|m| m.matches(&sa), a.principal.is_some())
            && self.ip_blocks.test(|b| within(a.source_ip, b), true)
            && self.remote_ip_blocks.test(|b| within(a.source_ip, b), true)
    }
}

impl Operation {
    /// `deny`: a DENY rule, which matches the lax form of the path too.
    fn matches(&self, a: &Attributes<'_>, http: bool, deny: bool) -> bool {
        if !self
            .ports
            .test(|p| *p == u32::from(a.destination_port), true)
        {
            return false;
        }
        if !http {
            return true;
        }
        let Some(h) = &a.http else {
            return false;
        };
        let host = h.host.to_ascii_lowercase();
        let bare = host
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host.as_str(), |(name, _)| name);
        self.hosts
            .test(|m| m.matches(&host) || m.matches(bare), true)
            && self.methods.test(|m| m.matches(h.method), true)
            && self.paths.test(
                |m| m.matches(h.path) || (deny && m.matches(h.lax_path)),
                true,
            )
    }
}

impl Condition {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let text = |v: Option<&str>| {
            self.strings
                .test(|m| v.is_some_and(|v| m.matches(v)), v.is_some())
        };
        match &self.key {
            Key::Header(name) => {
                let values: Vec<&str> = a
                    .http
                    .as_ref()
                    .map(|h| {
                        h.headers
                            .get_all(name)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                let present = !values.is_empty();
                self.strings
                    .test(|m| values.iter().any(|v| m.matches(v)), present)
            }
            Key::SourceIp | Key::RemoteIp => self.ips.test(|b| within(a.source_ip, b), true),
            Key::DestinationIp => {
                let ip = a.destination_ip;
                self.ips
                    .test(|b| ip.is_some_and(|ip| within(ip, b)), ip.is_some())
            }
            Key::DestinationPort => text(Some(&a.destination_port.to_string())),
            Key::SourceNamespace => text(a.namespace()),
            Key::SourcePrincipal => text(a.principal),
            Key::SourceServiceAccount => text(a.service_account().as_deref()),
            Key::Unknown => text(None),
        }
    }
}

impl Rule {
    /// Whether the rule matches; `http` says whether HTTP attributes count (they do not
    /// for a DENY rule judging opaque TCP).
    fn matches(&self, a: &Attributes<'_>, http: bool, deny: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a, http)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a, http, deny)))
            && self.when.iter().all(|c| {
                let http_key = matches!(c.key, Key::Header(_));
                (http_key && !http) || c.matches(a)
            })
    }
}

impl Policy {
    /// Whether the policy matches; for opaque TCP, `strict` (ALLOW, AUDIT) rules with HTTP
    /// fields match nothing, and the others (DENY) are judged without them.
    fn matches(&self, a: &Attributes<'_>, strict: bool) -> bool {
        let tcp = a.http.is_none();
        self.rules.iter().any(|r| match (tcp, r.http_only, strict) {
            (true, true, true) => false,
            (true, _, _) => r.matches(a, false, !strict),
            (false, _, _) => r.matches(a, true, !strict),
        })
    }
}

fn source(s: &xds::AuthzSource) -> Source {
    Source {
        principals: strings(&s.principals, &s.not_principals, Matcher::new),
        request_principals: strings(
            &s.request_principals,
            &s.not_request_principals,
            Matcher::new,
        ),
        namespaces: strings(&s.namespaces, &s.not_namespaces, Matcher::new),
        ip_blocks: ip_field(&s.ip_blocks, &s.not_ip_blocks),
        remote_ip_blocks: ip_field(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
        service_accounts: strings(&s.service_accounts, &s.not_service_accounts, Matcher::new),
    }
}

fn operation(o: &xds::AuthzOperation) -> Operation {
    Operation {
        hosts: strings(&o.hosts, &o.not_hosts, Matcher::lower),
        ports: port_field(&o.ports, &o.not_ports),
        methods: strings(&o.methods, &o.not_methods, Matcher::new),
        paths: strings(&o.paths, &o.not_paths, Matcher::new),
    }
}

fn condition(c: &xds::AuthzCondition) -> Condition {
    let bracketed = |prefix: &str| {
        c.key
            .strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')
            .map(str::to_owned)
    };
    let key = match c.key.as_str() {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "source.serviceAccount" => Key::SourceServiceAccount,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        _ => match bracketed("request.headers")
            .and_then(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
        {
            Some(h) => Key::Header(h),
            None => Key::Unknown,
        },
    };
    Condition {
        key,
        strings: strings(&c.values, &c.not_values, Matcher::new),
        ips: ip_field(&c.values, &c.not_values),
    }
}

fn rule(r: &xds::AuthzRule) -> Rule {
    let from: Vec<Source> = r.from.iter().map(source).collect();
    let to: Vec<Operation> = r.to.iter().map(operation).collect();
    let when: Vec<Condition> = r.when.iter().map(condition).collect();
    let http_only = from.iter().any(|s| s.request_principals.given())
        || to
            .iter()
            .any(|o| o.hosts.given() || o.methods.given() || o.paths.given())
        || r.when.iter().any(|c| c.key.starts_with("request."));
    Rule {
        from,
        to,
        when,
        http_only,
    }
}

/// The outcome for one request or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by this DENY policy, or (`None`) by matching no ALLOW policy.
    Deny(Option<Arc<str>>),
}

/// The workload's inbound policy, compiled.
#[derive(Debug, Default)]
pub struct InboundPolicy {
    mtls: Mode,
    port_mtls: HashMap<u16, Mode>,
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
}

/// Whether plaintext may come in (PeerAuthentication).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Permissive,
    Strict,
    Disable,
}

fn mode(m: i32) -> Mode {
    match xds::MtlsMode::try_from(m) {
        Ok(xds::MtlsMode::Strict) => Mode::Strict,
        Ok(xds::MtlsMode::Disable) => Mode::Disable,
        _ => Mode::Permissive,
    }
}

impl InboundPolicy {
    pub fn compile(p: &xds::InboundPolicy) -> Self {
        let mut out = InboundPolicy {
            mtls: mode(p.mtls),
            port_mtls: p
                .port_mtls
                .iter()
                .filter_map(|(port, m)| Some((u16::try_from(*port).ok()?, mode(*m))))
                .collect(),
            ..Default::default()
        };
        for a in &p.authorization {
            let policy = Policy {
                name: a.name.as_str().into(),
                dry_run: a.dry_run,
                rules: a.rules.iter().map(rule).collect(),
            };
            match xds::AuthzAction::try_from(a.action) {
                Ok(xds::AuthzAction::Allow) => out.allow.push(policy),
                Ok(xds::AuthzAction::Audit) => out.audit.push(policy),
                // DENY, and CUSTOM (refused at admission until ext_authz lands): a policy
                // this sidecar cannot evaluate fails closed.
                _ => out.deny.push(policy),
            }
        }
        out
    }

    /// Whether plaintext may reach `port` of the workload.
    pub fn plaintext_allowed(&self, port: u16) -> bool {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls) != Mode::Strict
    }

    /// Whether any AuthorizationPolicy applies (requests skip the evaluation otherwise).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Judges a request or connection; dry-run and AUDIT outcomes are logged here.
    pub fn check(&self, a: &Attributes<'_>) -> Verdict {
        for p in &self.audit {
            if p.matches(a, true) {
                tracing::info!(target: "authz", policy = %p.name, principal = a.principal.unwrap_or("-"), source = %a.source_ip, "audited");
            }
        }
        for p in self.deny.iter().filter(|p| p.matches(a, false)) {
            if p.dry_run {
                tracing::info!(target: "authz", policy = %p.name, principal = a.principal.unwrap_or("-"), source = %a.source_ip, "dry run: would deny");
                continue;
            }
            return Verdict::Deny(Some(p.name.clone()));
        }
        let (dry, enforced): (Vec<&Policy>, Vec<&Policy>) =
            self.allow.iter().partition(|p| p.dry_run);
        if !dry.is_empty() {
            let allowed = dry.iter().any(|p| p.matches(a, true));
            tracing::info!(target: "authz", policies = %dry.iter().map(|p| &*p.name).collect::<Vec<_>>().join(","), principal = a.principal.unwrap_or("-"), source = %a.source_ip, "dry run: would {}", if allowed { "allow" } else { "deny" });
        }
        if enforced.is_empty() || enforced.iter().any(|p| p.matches(a, true)) {
            Verdict::Allow
        } else {
            Verdict::Deny(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        name: &str,
        action: xds::AuthzAction,
        rules: Vec<xds::AuthzRule>,
    ) -> xds::AuthorizationPolicy {
        xds::AuthorizationPolicy {
            name: name.into(),
            action: action as i32,
            rules,
            ..Default::default()
        }
    }

    fn get(path: &str) -> (http::HeaderMap, String) {
        (http::HeaderMap::new(), path.to_owned())
    }

    fn attrs<'a>(
        principal: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        headers: &'a http::HeaderMap,
    ) -> Attributes<'a> {
        Attributes {
            principal,
            source_ip: "10.1.0.7".parse().expect("ip"),
            destination_ip: None,
            destination_port: 8080,
            http: Some(Http {
                host: "httpbin.demo.svc.cluster.local:8000",
                method,
                path,
                lax_path: Box::leak(lax_path(path).into_boxed_str()),
                headers,
            }),
        }
    }

    const SLEEP: Option<&str> = Some("cluster.local/ns/demo/sa/sleep");

    #[test]
    fn istio_s_order_deny_then_allow_and_allow_nothing() {
        let (h, _) = get("/");
        // No policy: allowed. `spec: {}` ALLOW: nothing is.
        assert_eq!(
            InboundPolicy::default().check(&attrs(SLEEP, "GET", "/", &h)),
            Verdict::Allow
        );
        let nothing = InboundPolicy::compile(&xds::InboundPolicy {
            authorization: vec![policy(
                "demo/allow-nothing",
                xds::AuthzAction::Allow,
                vec![],
            )],
            ..Default::default()
        });
        assert_eq!(
            nothing.check(&attrs(SLEEP, "GET", "/", &h)),
            Verdict::Deny(None)
        );
        // ALLOW GET for sleep, DENY /admin* for anyone: DENY wins.
        let p = InboundPolicy::compile(&xds::InboundPolicy {
            authorization: vec![
                policy(
                    "demo/viewer",
                    xds::AuthzAction::Allow,
                    vec![xds::AuthzRule {
                        from: vec![xds::AuthzSource {
                            principals: vec!["cluster.local/ns/demo/sa/sleep".into()],
                            ..Default::default()
                        }],
                        to: vec![xds::AuthzOperation {
                            methods: vec!["GET".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
                policy(
                    "demo/no-admin",
                    xds::AuthzAction::Deny,
                    vec![xds::AuthzRule {
                        to: vec![xds::AuthzOperation {
                            paths: vec!["/admin*".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
            ],
            ..Default::default()
        });
        assert_eq!(p.check(&attrs(SLEEP, "GET", "/ip", &h)), Verdict::Allow);
        assert_eq!(
            p.check(&attrs(SLEEP, "POST", "/ip", &h)),
            Verdict::Deny(None)
        );
        assert_eq!(
            p.check(&attrs(
                Some("cluster.local/ns/demo/sa/other"),
                "GET",
                "/ip",
                &h
            )),
            Verdict::Deny(None)
        );
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/admin/x", &h)),
            Verdict::Deny(Some("demo/no-admin".into()))
        );
        // What a lax app would read as /admin is denied too (the inbound side resolved
        // `..` and `%2e` already).
        for sneaky in ["/ADMIN", "//admin", "/x%2F..%2Fadmin", "/Admin%2fx"] {
            assert_eq!(
                p.check(&attrs(SLEEP, "GET", sneaky, &h)),
                Verdict::Deny(Some("demo/no-admin".into())),
                "{sneaky}"
            );
        }
        assert_eq!(
            p.check(&attrs(None, "GET", "/ip", &h)),
            Verdict::Deny(None),
            "plaintext has no principal"
        );
    }

    #[test]
    fn tcp_is_judged_on_tcp_fields_as_istio_does() {
        let p = InboundPolicy::compile(&xds::InboundPolicy {
            authorization: vec![
                policy(
                    "demo/allow-9000",
                    xds::AuthzAction::Allow,
                    vec![
                        xds::AuthzRule {
                            to: vec![xds::AuthzOperation {
                                ports: vec![9000],
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                        // An HTTP field: for TCP this ALLOW rule matches nothing.
                        xds::AuthzRule {
                            to: vec![xds::AuthzOperation {
                                ports: vec![9001],
                                methods: vec!["GET".into()],
                                ..Default::default()
                            }],
                            ..Default::default()
                        },
                    ],
                ),
                // An HTTP field in a DENY rule: for TCP it is ignored, so port 9002 is denied.
                policy(
                    "demo/deny-9002",
                    xds::AuthzAction::Deny,
                    vec![xds::AuthzRule {
                        to: vec![xds::AuthzOperation {
                            ports: vec![9002],
                            methods: vec!["GET".into()],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                ),
            ],
            ..Default::default()
        });
        let tcp = |port: u16| Attributes {
            principal: SLEEP,
            source_ip: "10.1.0.7".parse().expect("ip"),
            destination_ip: None,
            destination_port: port,
            http: None,
        };
        assert_eq!(p.check(&tcp(9000)), Verdict::Allow);
        assert_eq!(p.check(&tcp(9001)), Verdict::Deny(None));
        assert_eq!(
            p.check(&tcp(9002)),
            Verdict::Deny(Some("demo/deny-9002".into()))
        );
    }

    #[test]
    fn values_match_by_prefix_suffix_presence_and_negation() {
        let mut h = http::HeaderMap::new();
        h.insert("x-token", "admin".parse().expect("value"));
        let p = InboundPolicy::compile(&xds::InboundPolicy {
            authorization: vec![policy(
                "demo/p",
                xds::AuthzAction::Allow,
                vec![xds::AuthzRule {
                    from: vec![xds::AuthzSource {
                        namespaces: vec!["de*".into()],
                        not_ip_blocks: vec!["10.9.0.0/16".into()],
                        ..Default::default()
                    }],
                    to: vec![xds::AuthzOperation {
                        hosts: vec!["HTTPBIN.demo.svc.cluster.local".into()],
                        paths: vec!["*.html".into(), "/headers".into()],
                        not_methods: vec!["DELETE".into()],
                        ..Default::default()
                    }],
                    when: vec![xds::AuthzCondition {
                        key: "request.headers[X-Token]".into(),
                        values: vec!["*".into()],
                        ..Default::default()
                    }],
                }],
            )],
            ..Default::default()
        });
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/index.html", &h)),
            Verdict::Allow,
            "host without its port, case-insensitive"
        );
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/headers", &h)),
            Verdict::Allow
        );
        assert_eq!(
            p.check(&attrs(SLEEP, "DELETE", "/headers", &h)),
            Verdict::Deny(None)
        );
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/ip", &h)),
            Verdict::Deny(None)
        );
        let none = http::HeaderMap::new();
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/headers", &none)),
            Verdict::Deny(None),
            "header required"
        );
    }

    #[test]
    fn dry_run_policies_never_decide_and_strict_refuses_plaintext() {
        let (h, _) = get("/");
        let mut deny = policy(
            "demo/dry",
            xds::AuthzAction::Deny,
            vec![xds::AuthzRule::default()],
        );
        deny.dry_run = true;
        let mut allow = policy("demo/dry-allow", xds::AuthzAction::Allow, vec![]);
        allow.dry_run = true;
        let p = InboundPolicy::compile(&xds::InboundPolicy {
            mtls: xds::MtlsMode::Strict as i32,
            port_mtls: [(8081, xds::MtlsMode::Permissive as i32)].into(),
            authorization: vec![deny, allow],
        });
        assert_eq!(p.check(&attrs(SLEEP, "GET", "/", &h)), Verdict::Allow);
        assert!(!p.plaintext_allowed(8080));
        assert!(p.plaintext_allowed(8081));
        assert!(
            InboundPolicy::default().plaintext_allowed(8080),
            "PERMISSIVE by default"
        );
    }
}
