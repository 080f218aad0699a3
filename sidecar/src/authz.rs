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
//! RequestAuthentication: a request's token (from the rule's locations) is validated with
//! the keys of the rule of its issuer (signature, expiry, audience); an invalid one is
//! refused (401), a valid one gives `requestPrincipals` (`iss/sub`) and `request.auth.*`.
//! Without a token those attributes are absent: positive matches on them fail and
//! negative ones hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use isthmus_proto::discovery as xds;

/// Istio's string match (also the header lists of external authorization providers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Matcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// `*`: any value that is present.
    Present,
}

impl Matcher {
    pub(crate) fn new(v: &str) -> Self {
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

    pub(crate) fn matches(&self, value: &str) -> bool {
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
    AuthPrincipal,
    /// `request.auth.audiences` (`aud`), `request.auth.presenter` (`azp`),
    /// `request.auth.claims[...]`: a claim by path.
    AuthClaim(String),
    /// `connection.sni`: not known here.
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
    /// The request's validated JWT (RequestAuthentication), if it carried one.
    pub auth: Option<&'a Authenticated>,
}

/// What a validated JWT proves.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// `iss/sub`, as `requestPrincipals` name it.
    pub principal: String,
    pub claims: serde_json::Value,
}

impl Authenticated {
    /// A claim by path (`groups`, or nested `a][b` as Istio's `claims[a][b]`), as the
    /// strings it holds: a string, each string of a list, a number or boolean as text.
    fn claim(&self, path: &str) -> Vec<String> {
        let mut v = &self.claims;
        for part in path.split("][") {
            match v.get(part) {
                Some(next) => v = next,
                None => return Vec::new(),
            }
        }
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match v {
            serde_json::Value::Array(items) => items.iter().filter_map(text).collect(),
            other => text(other).into_iter().collect(),
        }
    }
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
        // Only a rule that names service accounts pays for building `namespace/account`.
        let sa = if self.service_accounts.given() {
            a.service_account().unwrap_or_default()
        } else {
            String::new()
        };
        self.principals
            .test(|m| m.matches(principal), a.principal.is_some())
            && (!http
                || self.request_principals.test(
                    |m| a.auth.is_some_and(|t| m.matches(&t.principal)),
                    a.auth.is_some(),
                ))
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
            Key::AuthPrincipal => text(a.auth.map(|t| t.principal.as_str())),
            Key::AuthClaim(path) => {
                let values = a.auth.map(|t| t.claim(path)).unwrap_or_default();
                self.strings
                    .test(|m| values.iter().any(|v| m.matches(v)), !values.is_empty())
            }
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
                let http_key = matches!(
                    c.key,
                    Key::Header(_) | Key::AuthPrincipal | Key::AuthClaim(_)
                );
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
        "request.auth.principal" => Key::AuthPrincipal,
        "request.auth.audiences" => Key::AuthClaim("aud".into()),
        "request.auth.presenter" => Key::AuthClaim("azp".into()),
        _ if c.key.starts_with("request.auth.claims[") => {
            Key::AuthClaim(bracketed("request.auth.claims").unwrap_or_default())
        }
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
#[derive(Default)]
pub struct InboundPolicy {
    mtls: Mode,
    port_mtls: HashMap<u16, Mode>,
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
    /// CUSTOM policies, each with its provider (`None`: the mesh config has none of the
    /// name, and the policy denies what it matches).
    custom: Vec<(Policy, Option<Arc<crate::ext_authz::Provider>>)>,
    jwt: Vec<JwtRule>,
}

/// An external authorization to ask for: the provider, and the CUSTOM policy that asks.
pub struct CustomCheck {
    pub policy: Arc<str>,
    pub dry_run: bool,
    pub provider: Arc<crate::ext_authz::Provider>,
}

impl std::fmt::Debug for InboundPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundPolicy")
            .field("mtls", &self.mtls)
            .field("deny", &self.deny.len())
            .field("allow", &self.allow.len())
            .field("jwt", &self.jwt.len())
            .finish()
    }
}

/// Where a token may be.
enum Location {
    Header(http::HeaderName, String),
    Param(String),
    Cookie(String),
}

/// A RequestAuthentication rule, compiled: the issuer's keys decoded once per push.
struct JwtRule {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<(Option<String>, jsonwebtoken::DecodingKey)>,
    from: Vec<Location>,
    forward: bool,
    payload_header: Option<http::HeaderName>,
    claim_headers: Vec<(http::HeaderName, String)>,
}

fn jwt_rule(r: &xds::JwtRule) -> JwtRule {
    let keys = serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(&r.jwks)
        .map(|set| {
            set.keys
                .iter()
                .filter_map(|k| {
                    let key = jsonwebtoken::DecodingKey::from_jwk(k).ok()?;
                    Some((k.common.key_id.clone(), key))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut from: Vec<Location> = r
        .from_headers
        .iter()
        .filter_map(|h| {
            let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?;
            Some(Location::Header(name, h.prefix.clone()))
        })
        .chain(r.from_params.iter().map(|p| Location::Param(p.clone())))
        .chain(r.from_cookies.iter().map(|c| Location::Cookie(c.clone())))
        .collect();
    if from.is_empty() {
        // Istio's defaults.
        from.push(Location::Header(
            http::header::AUTHORIZATION,
            "Bearer ".into(),
        ));
        from.push(Location::Param("access_token".into()));
    }
    let header = |h: &str| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok();
    JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        keys,
        from,
        forward: r.forward_original_token,
        payload_header: Some(r.output_payload_to_header.as_str())
            .filter(|h| !h.is_empty())
            .and_then(header),
        claim_headers: r
            .output_claim_to_headers
            .iter()
            .filter_map(|c| Some((header(&c.header)?, c.claim.clone())))
            .collect(),
    }
}

/// A token found in a request: where, and the token.
fn find_token(loc: &Location, parts: &http::request::Parts) -> Option<String> {
    match loc {
        Location::Header(name, prefix) => parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix(prefix.as_str()))
            .map(|t| t.trim().to_owned()),
        Location::Param(p) => parts.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k == p)
                .map(|(_, v)| v.to_owned())
        }),
        Location::Cookie(c) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| kv.trim().strip_prefix(c.as_str())?.strip_prefix('='))
            .map(str::to_owned),
    }
}

/// The `iss` a token claims, read before its signature is checked (to pick the rule).
fn claimed_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v.get("iss")?.as_str()?.to_owned())
}

impl JwtRule {
    fn validate(&self, token: &str) -> Result<serde_json::Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        let mut validation = jsonwebtoken::Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.required_spec_claims.clear();
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        let candidates = self
            .keys
            .iter()
            .filter(|(kid, _)| header.kid.is_none() || kid.is_none() || *kid == header.kid);
        let mut last = "no key of the issuer matches the token".to_owned();
        for (_, key) in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
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
            jwt: p.jwt.iter().map(jwt_rule).collect(),
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
                Ok(xds::AuthzAction::Custom) => {
                    let provider = a
                        .ext_authz
                        .as_ref()
                        .map(|p| Arc::new(crate::ext_authz::Provider::compile(p)));
                    out.custom.push((policy, provider));
                }
                // DENY, and an action this sidecar does not know: fails closed.
                _ => out.deny.push(policy),
            }
        }
        out
    }

    /// Whether plaintext may reach `port` of the workload.
    pub fn plaintext_allowed(&self, port: u16) -> bool {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls) != Mode::Strict
    }

    /// Whether a RequestAuthentication applies: requests are looked at for a token.
    pub fn has_jwt(&self) -> bool {
        !self.jwt.is_empty()
    }

    /// Finds the request's token and validates it with the rule of its issuer: `Ok(None)`
    /// when it carries none, an error (401) when it carries one that does not validate.
    /// The token leaves the request unless the rule forwards it; the rule's payload and
    /// claim headers are set (and any the app sent are replaced).
    pub fn authenticate(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<Option<Authenticated>, String> {
        let found = self.jwt.iter().find_map(|rule| {
            rule.from
                .iter()
                .find_map(|loc| Some((loc, find_token(loc, parts)?)))
        });
        for rule in &self.jwt {
            for h in rule
                .payload_header
                .iter()
                .chain(rule.claim_headers.iter().map(|(h, _)| h))
            {
                parts.headers.remove(h);
            }
        }
        let Some((_, token)) = found else {
            return Ok(None);
        };
        let issuer = claimed_issuer(&token).ok_or("the token is not a JWT")?;
        let rule = self
            .jwt
            .iter()
            .find(|r| r.issuer == issuer)
            .ok_or_else(|| format!("issuer `{issuer}` is not configured"))?;
        let claims = rule.validate(&token)?;
        if !rule.forward {
            for loc in &rule.from {
                if let Location::Header(name, _) = loc {
                    parts.headers.remove(name);
                }
            }
        }
        if let Some(h) = &rule.payload_header {
            if let Some(v) = token
                .split('.')
                .nth(1)
                .and_then(|p| http::HeaderValue::from_str(p).ok())
            {
                parts.headers.insert(h.clone(), v);
            }
        }
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        let auth = Authenticated {
            principal: format!("{issuer}/{sub}"),
            claims,
        };
        for (h, claim) in &rule.claim_headers {
            if let Some(v) = auth
                .claim(claim)
                .first()
                .and_then(|v| http::HeaderValue::from_str(v).ok())
            {
                parts.headers.insert(h.clone(), v);
            }
        }
        Ok(Some(auth))
    }

    /// Whether any AuthorizationPolicy applies (requests skip the evaluation otherwise).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
            && self.custom.is_empty()
    }

    /// Whether a CUSTOM policy applies (requests are then matched against it first).
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty()
    }

    /// The external authorizations a request (or connection) must pass: one per provider
    /// whose CUSTOM policy matches it. `Err(policy)`: a matching CUSTOM policy names a
    /// provider the mesh config lacks, and denies (unless it is a dry run).
    pub fn custom_checks(&self, a: &Attributes<'_>) -> Result<Vec<CustomCheck>, Arc<str>> {
        let mut out: Vec<CustomCheck> = Vec::new();
        for (policy, provider) in self.custom.iter().filter(|(p, _)| p.matches(a, true)) {
            let Some(provider) = provider else {
                if policy.dry_run {
                    tracing::info!(target: "authz", policy = %policy.name, "dry run: would deny (no such extension provider)");
                    continue;
                }
                return Err(policy.name.clone());
            };
            if !out.iter().any(|c| c.provider.name == provider.name) {
                out.push(CustomCheck {
                    policy: policy.name.clone(),
                    dry_run: policy.dry_run,
                    provider: provider.clone(),
                });
            }
        }
        Ok(out)
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
            auth: None,
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
            auth: None,
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
            jwt: vec![],
        });
        assert_eq!(p.check(&attrs(SLEEP, "GET", "/", &h)), Verdict::Allow);
        assert!(!p.plaintext_allowed(8080));
        assert!(p.plaintext_allowed(8081));
        assert!(
            InboundPolicy::default().plaintext_allowed(8080),
            "PERMISSIVE by default"
        );
    }

    /// A P-256 key pair: the issuer's JWKS, and a signer of tokens.
    fn issuer_keys() -> (String, jsonwebtoken::EncodingKey) {
        use base64::Engine;
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("a key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("a key pair");
        let public = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": b64(&public[1..33]), "y": b64(&public[33..65])}]});
        (
            jwks.to_string(),
            jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
    }

    fn token(key: &jsonwebtoken::EncodingKey, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, key).expect("signed")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    fn request_with(auth: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().uri("/ip");
        if let Some(t) = auth {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn tokens_are_validated_by_their_issuer_s_keys() {
        let (jwks, key) = issuer_keys();
        let p = InboundPolicy::compile(&xds::InboundPolicy {
            jwt: vec![xds::JwtRule {
                issuer: "https://issuer.example".into(),
                audiences: vec!["httpbin".into()],
                jwks,
                output_claim_to_headers: vec![xds::JwtClaimHeader {
                    header: "x-user-group".into(),
                    claim: "groups".into(),
                }],
                ..Default::default()
            }],
            authorization: vec![policy(
                "demo/require-jwt",
                xds::AuthzAction::Allow,
                vec![xds::AuthzRule {
                    from: vec![xds::AuthzSource {
                        request_principals: vec!["https://issuer.example/*".into()],
                        ..Default::default()
                    }],
                    when: vec![xds::AuthzCondition {
                        key: "request.auth.claims[groups]".into(),
                        values: vec!["group1".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            )],
            ..Default::default()
        });
        let good = token(
            &key,
            serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "aud": "httpbin", "exp": now() + 600, "groups": ["group1", "group2"]}),
        );
        let mut parts = request_with(Some(&good));
        parts
            .headers
            .insert("x-user-group", "forged".parse().expect("value"));
        let auth = p.authenticate(&mut parts).expect("valid").expect("a token");
        assert_eq!(auth.principal, "https://issuer.example/alice");
        assert!(
            parts.headers.get("authorization").is_none(),
            "not forwarded by default"
        );
        assert_eq!(
            parts.headers["x-user-group"], "group1",
            "the claim, never what the app sent"
        );
        let h = http::HeaderMap::new();
        let mut a = attrs(SLEEP, "GET", "/ip", &h);
        a.auth = Some(&auth);
        assert_eq!(p.check(&a), Verdict::Allow);
        // Without a token: let in by authentication, refused by the policy.
        assert!(p
            .authenticate(&mut request_with(None))
            .expect("no token")
            .is_none());
        assert_eq!(
            p.check(&attrs(SLEEP, "GET", "/ip", &h)),
            Verdict::Deny(None)
        );
        // Expired, for another audience, from an unknown issuer, tampered: refused.
        for (bad, why) in [
            (
                token(
                    &key,
                    serde_json::json!({"iss": "https://issuer.example", "sub": "a", "aud": "httpbin", "exp": now() - 600}),
                ),
                "expired",
            ),
            (
                token(
                    &key,
                    serde_json::json!({"iss": "https://issuer.example", "sub": "a", "aud": "other", "exp": now() + 600}),
                ),
                "audience",
            ),
            (
                token(
                    &key,
                    serde_json::json!({"iss": "https://elsewhere.example", "sub": "a", "exp": now() + 600}),
                ),
                "issuer",
            ),
            (format!("{}x", &good[..good.len() - 1]), "signature"),
            ("not-a-jwt".to_owned(), "shape"),
        ] {
            assert!(
                p.authenticate(&mut request_with(Some(&bad))).is_err(),
                "{why}"
            );
        }
    }
}
