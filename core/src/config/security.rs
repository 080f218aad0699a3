//! Istio's security kinds (`security.istio.io/v1` and `v1beta1`): `PeerAuthentication`,
//! `RequestAuthentication` and `AuthorizationPolicy`, checked with Istio's rules and
//! resolved per workload into the `InboundPolicy` its sidecar enforces.
//!
//! Scope, as Istio's:
//! - PeerAuthentication: one with a `selector` picking the workload, else its namespace's
//!   without selector, else the root namespace's without selector (mesh-wide). A mode of
//!   `UNSET` inherits from the next scope out; with nothing set, `PERMISSIVE`.
//!   `portLevelMtls` (selector required) overrides the mode per workload port.
//! - AuthorizationPolicy: every policy of the root namespace (mesh-wide, its selector
//!   matched against workloads of any namespace) and every policy of the workload's own
//!   namespace whose selector picks it (none: all of the namespace), or whose `targetRefs`
//!   name a Service it serves.
//!
//! Action `CUSTOM` (external authorization) names an extension provider of the mesh config;
//! the provider travels with the policy to the sidecar, which calls it.
//! RequestAuthentication applies as AuthorizationPolicy does (root namespace, namespace,
//! selector or targetRefs); its keys are given inline (`jwks`), or fetched by the
//! controller from `jwksUri` or the issuer's OpenID discovery document.

use std::collections::BTreeMap;

use isthmus_proto::discovery as xds;
use serde::Deserialize;

use super::selects as picks;
use super::sidecar::ROOT_NAMESPACE;
use super::validate::Checker;
use super::{Code, NamespacedName};

/// The annotation that makes a policy report instead of enforce.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `selector: {matchLabels: ...}`, as the security kinds write it.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorSpec {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<SelectorSpec>,
    pub mtls: Option<MtlsSpec>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<u32, MtlsSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsSpec {
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<SelectorSpec>,
    pub target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    pub action: Option<String>,
    pub provider: Option<ProviderSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRefSpec {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderSpec {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FromSpec {
    pub source: Option<SourceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ToSpec {
    pub operation: Option<OperationSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    pub selector: Option<SelectorSpec>,
    pub target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRuleSpec {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtHeaderSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClaimToHeaderSpec {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

/// An admitted RequestAuthentication.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthnScope {
    pub key: NamespacedName,
    pub selector: BTreeMap<String, String>,
    pub services: Vec<NamespacedName>,
    pub rules: Vec<xds::JwtRule>,
}

/// An admitted PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthn {
    pub key: NamespacedName,
    /// Empty: every workload of its namespace (or, in the root namespace, the mesh).
    pub selector: BTreeMap<String, String>,
    pub mode: xds::MtlsMode,
    pub ports: BTreeMap<u32, xds::MtlsMode>,
}

/// An admitted AuthorizationPolicy: whom it applies to, and what the sidecar enforces.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthzScope {
    pub key: NamespacedName,
    pub selector: BTreeMap<String, String>,
    /// `targetRefs` to Services of the policy's namespace.
    pub services: Vec<NamespacedName>,
    pub policy: xds::AuthorizationPolicy,
}

fn mtls_mode(c: &mut Checker<'_>, field: &str, spec: Option<&MtlsSpec>) -> xds::MtlsMode {
    match spec.and_then(|m| m.mode.as_deref()).unwrap_or("UNSET") {
        "UNSET" => xds::MtlsMode::Unset,
        "PERMISSIVE" => xds::MtlsMode::Permissive,
        "STRICT" => xds::MtlsMode::Strict,
        "DISABLE" => xds::MtlsMode::Disable,
        other => {
            c.fail(
                Code::InvalidValue,
                field,
                format!("`{other}` is not one of UNSET, PERMISSIVE, STRICT, DISABLE"),
            );
            xds::MtlsMode::Unset
        }
    }
}

fn selector_of(spec: Option<&SelectorSpec>) -> BTreeMap<String, String> {
    spec.map(|s| s.match_labels.clone()).unwrap_or_default()
}

/// Checks a PeerAuthentication.
pub(super) fn peer_authentication(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &PeerAuthenticationSpec,
) -> PeerAuthn {
    let selector = selector_of(spec.selector.as_ref());
    if !spec.port_level_mtls.is_empty() && selector.is_empty() {
        c.fail(
            Code::InvalidValue,
            "spec.portLevelMtls",
            "portLevelMtls requires a selector (it names ports of the selected workloads)",
        );
    }
    let mode = mtls_mode(c, "spec.mtls.mode", spec.mtls.as_ref());
    let mut ports = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls.{port}");
        if !(1..=65535).contains(port) {
            c.fail(
                Code::InvalidValue,
                &field,
                format!("{port} is not a port number (1-65535)"),
            );
            continue;
        }
        let m = mtls_mode(c, &format!("{field}.mode"), Some(m));
        ports.insert(*port, m);
    }
    PeerAuthn {
        key: key.clone(),
        selector,
        mode,
        ports,
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`. A `*` anywhere else is an
/// error, as Istio's validation says.
fn check_values(c: &mut Checker<'_>, field: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        let inner = v.trim_start_matches('*').trim_end_matches('*');
        if v.is_empty() {
            c.fail(
                Code::InvalidValue,
                format!("{field}[{i}]"),
                "an empty value matches nothing; use `*` for any value",
            );
        } else if inner.contains('*') || (v.len() > 1 && v.starts_with('*') && v.ends_with('*')) {
            c.fail(
                Code::InvalidValue,
                format!("{field}[{i}]"),
                format!("`{v}`: `*` may only start or end a value (prefix*, *suffix, or *)"),
            );
        }
    }
}

fn check_blocks(c: &mut Checker<'_>, field: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        let (ip, bits) = v.split_once('/').unwrap_or((v, ""));
        let ok = match ip.parse::<std::net::IpAddr>() {
            Ok(addr) => {
                bits.is_empty()
                    || bits
                        .parse::<u8>()
                        .is_ok_and(|b| b <= if addr.is_ipv4() { 32 } else { 128 })
            }
            Err(_) => false,
        };
        if !ok {
            c.fail(
                Code::InvalidValue,
                format!("{field}[{i}]"),
                format!("`{v}` is not an IP address or CIDR range"),
            );
        }
    }
}

fn check_ports(c: &mut Checker<'_>, field: &str, values: &[String]) -> Vec<u32> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match v.parse::<u16>() {
            Ok(p) if p > 0 => Some(u32::from(p)),
            _ => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}[{i}]"),
                    format!("`{v}` is not a port number (1-65535)"),
                );
                None
            }
        })
        .collect()
}

/// The `when` keys Istio defines, as prefixes for the bracketed ones.
fn known_key(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .is_some_and(|r| r.len() > 1 && r.ends_with(']'))
    };
    EXACT.contains(&key) || bracketed("request.headers") || bracketed("request.auth.claims")
}

fn source(c: &mut Checker<'_>, field: &str, s: &SourceSpec) -> xds::AuthzSource {
    for (name, values) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
    ] {
        check_values(c, &format!("{field}.{name}"), values);
    }
    for (name, values) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        check_blocks(c, &format!("{field}.{name}"), values);
    }
    let accounts = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let others = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if accounts && others {
        c.fail(
            Code::InvalidValue,
            format!("{field}.serviceAccounts"),
            "serviceAccounts cannot be used together with principals or namespaces",
        );
    }
    for (name, values) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        for (i, v) in values.iter().enumerate() {
            let ok = v
                .split_once('/')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !v.contains('*'));
            if !ok {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.{name}[{i}]"),
                    format!("`{v}` is not namespace/service-account"),
                );
            }
        }
    }
    xds::AuthzSource {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        request_principals: s.request_principals.clone(),
        not_request_principals: s.not_request_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        ip_blocks: s.ip_blocks.clone(),
        not_ip_blocks: s.not_ip_blocks.clone(),
        remote_ip_blocks: s.remote_ip_blocks.clone(),
        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
        service_accounts: s.service_accounts.clone(),
        not_service_accounts: s.not_service_accounts.clone(),
    }
}

fn operation(c: &mut Checker<'_>, field: &str, o: &OperationSpec) -> xds::AuthzOperation {
    for (name, values) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        check_values(c, &format!("{field}.{name}"), values);
    }
    for (name, values) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, v) in values.iter().enumerate() {
            if v.contains('{') {
                c.fail(
                    Code::Schema,
                    format!("{field}.{name}[{i}]"),
                    format!("`{v}`: path templates ({{*}}, {{**}}) are not supported yet"),
                );
            }
        }
    }
    xds::AuthzOperation {
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
        ports: check_ports(c, &format!("{field}.ports"), &o.ports),
        not_ports: check_ports(c, &format!("{field}.notPorts"), &o.not_ports),
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: o.paths.clone(),
        not_paths: o.not_paths.clone(),
    }
}

/// Checks the `what` of each entry of a list (`from[].source`, `to[].operation`), an
/// entry without one being a fault.
fn each<'s, S: 's, T>(
    c: &mut Checker<'_>,
    field: &str,
    what: &str,
    items: impl Iterator<Item = Option<&'s S>>,
    check: fn(&mut Checker<'_>, &str, &S) -> T,
) -> Vec<T> {
    let mut out = Vec::new();
    for (j, item) in items.enumerate() {
        let at = format!("{field}[{j}].{what}");
        match item {
            Some(s) => out.push(check(c, &at, s)),
            None => c.fail(Code::Missing, at, format!("an entry needs a {what}")),
        }
    }
    out
}

/// The Services `targetRefs` (and the older `targetRef`) name; faults for kinds other
/// than Service, other namespaces, and a selector given too.
/// Whom a policy picks: its `selector` labels, and the Services its `targetRefs` name
/// (checked as [`target_services`] does).
pub(super) fn picked(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    selector: &Option<SelectorSpec>,
    target_refs: &[TargetRefSpec],
    target_ref: &Option<TargetRefSpec>,
) -> (BTreeMap<String, String>, Vec<NamespacedName>) {
    let selector = selector_of(selector.as_ref());
    let services = target_services(c, key, &selector, target_refs, target_ref);
    (selector, services)
}

pub(super) fn target_services(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    selector: &BTreeMap<String, String>,
    target_refs: &[TargetRefSpec],
    target_ref: &Option<TargetRefSpec>,
) -> Vec<NamespacedName> {
    let mut refs = target_refs.to_vec();
    refs.extend(target_ref.clone());
    if !refs.is_empty() && !selector.is_empty() {
        c.fail(
            Code::InvalidValue,
            "spec.targetRefs",
            "targetRefs and selector cannot both be set",
        );
    }
    let mut services = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        if r.kind != "Service" || !r.group.is_empty() {
            c.fail(
                Code::Schema,
                &field,
                format!(
                    "targetRefs to {} `{}` are not supported yet; only Service (group \"\")",
                    r.kind, r.group
                ),
            );
            continue;
        }
        if r.namespace.as_deref().is_some_and(|ns| ns != key.namespace) {
            c.fail(
                Code::InvalidValue,
                format!("{field}.namespace"),
                "a targetRef names an object of the policy's own namespace",
            );
            continue;
        }
        services.push(NamespacedName::new(&key.namespace, &r.name));
    }
    services
}

/// Checks an AuthorizationPolicy.
pub(super) fn authorization_policy(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    annotations: &BTreeMap<String, String>,
    spec: &AuthorizationPolicySpec,
) -> AuthzScope {
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => xds::AuthzAction::Allow,
        "DENY" => xds::AuthzAction::Deny,
        "AUDIT" => xds::AuthzAction::Audit,
        "CUSTOM" => xds::AuthzAction::Custom,
        other => {
            c.fail(
                Code::InvalidValue,
                "spec.action",
                format!("`{other}` is not one of ALLOW, DENY, AUDIT, CUSTOM"),
            );
            xds::AuthzAction::Allow
        }
    };
    let provider = spec.provider.as_ref().map(|p| p.name.clone());
    match (action, &provider) {
        (xds::AuthzAction::Custom, None) => c.fail(
            Code::Missing,
            "spec.provider",
            "a CUSTOM policy names its extension provider",
        ),
        (xds::AuthzAction::Custom, Some(_)) => {}
        (_, Some(_)) => c.fail(
            Code::InvalidValue,
            "spec.provider",
            "a provider is only for action CUSTOM",
        ),
        _ => {}
    }
    let (selector, services) = picked(c, key, &spec.selector, &spec.target_refs, &spec.target_ref);
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let from = each(
            c,
            &format!("{field}.from"),
            "source",
            r.from.iter().map(|f| f.source.as_ref()),
            source,
        );
        let to = each(
            c,
            &format!("{field}.to"),
            "operation",
            r.to.iter().map(|t| t.operation.as_ref()),
            operation,
        );
        let mut when = Vec::new();
        for (j, w) in r.when.iter().enumerate() {
            let wf = format!("{field}.when[{j}]");
            if !known_key(&w.key) {
                c.fail(
                    Code::InvalidValue,
                    format!("{wf}.key"),
                    format!("`{}` is not a condition key Istio defines", w.key),
                );
            }
            if w.values.is_empty() && w.not_values.is_empty() {
                c.fail(Code::Missing, &wf, "a condition needs values or notValues");
            }
            if matches!(w.key.as_str(), "source.ip" | "remote.ip" | "destination.ip") {
                check_blocks(c, &format!("{wf}.values"), &w.values);
                check_blocks(c, &format!("{wf}.notValues"), &w.not_values);
            }
            if w.key == "destination.port" {
                check_ports(c, &format!("{wf}.values"), &w.values);
                check_ports(c, &format!("{wf}.notValues"), &w.not_values);
            }
            when.push(xds::AuthzCondition {
                key: w.key.clone(),
                values: w.values.clone(),
                not_values: w.not_values.clone(),
            });
        }
        rules.push(xds::AuthzRule { from, to, when });
    }
    let dry_run = annotations
        .get(DRY_RUN_ANNOTATION)
        .is_some_and(|v| v == "true");
    AuthzScope {
        key: key.clone(),
        selector,
        services,
        policy: xds::AuthorizationPolicy {
            name: key.to_string(),
            action: action as i32,
            dry_run,
            rules,
            provider: provider.unwrap_or_default(),
            ext_authz: None,
        },
    }
}

/// Checks a RequestAuthentication. Keys given by `jwksUri`, or by neither `jwks` nor
/// `jwksUri` with an issuer URL (OpenID discovery, as Istio does), are fetched by the
/// controller, which fills `jwks` in before the push.
pub(super) fn request_authentication(
    c: &mut Checker<'_>,
    key: &NamespacedName,
    spec: &RequestAuthenticationSpec,
) -> AuthnScope {
    let (selector, services) = picked(c, key, &spec.selector, &spec.target_refs, &spec.target_ref);
    let mut rules = Vec::new();
    for (i, r) in spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{i}]");
        if r.issuer.is_empty() {
            c.fail(
                Code::Missing,
                format!("{field}.issuer"),
                "a JWT rule names its issuer",
            );
        }
        let fetch_timeout_ms = match r.timeout.as_deref().map(super::istio::parse_duration_ms) {
            None => 0,
            Some(Some(ms)) if ms > 0 => u32::try_from(ms).unwrap_or(u32::MAX),
            Some(_) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.timeout"),
                    "not a positive duration like 5s or 500ms",
                );
                0
            }
        };
        // The keys: inline, fetched from jwksUri, or found by the issuer's OpenID discovery.
        let (jwks, jwks_uri, openid_discovery) = match (&r.jwks, &r.jwks_uri) {
            (Some(_), Some(_)) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.jwksUri"),
                    "jwks and jwksUri cannot both be set",
                );
                continue;
            }
            (None, Some(uri)) if !crate::fetch::is_http_url(uri) => {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.jwksUri"),
                    format!("`{uri}` is not an http or https URL"),
                );
                continue;
            }
            (None, Some(uri)) => (String::new(), uri.clone(), false),
            (None, None) if crate::fetch::is_http_url(&r.issuer) => (
                String::new(),
                format!(
                    "{}/.well-known/openid-configuration",
                    r.issuer.trim_end_matches('/')
                ),
                true,
            ),
            (None, None) => {
                c.fail(
                    Code::Missing,
                    format!("{field}.jwks"),
                    "a JWT rule needs the issuer's keys: `jwks`, `jwksUri`, or an issuer URL \
                     that serves OpenID discovery",
                );
                continue;
            }
            (Some(jwks), None) => {
                let keys = serde_json::from_str::<serde_json::Value>(jwks)
                    .ok()
                    .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
                if keys.is_none_or(|n| n == 0) {
                    c.fail(
                        Code::InvalidValue,
                        format!("{field}.jwks"),
                        "not a JSON Web Key Set with keys (`{\"keys\": [...]}`)",
                    );
                    continue;
                }
                (jwks.clone(), String::new(), false)
            }
        };
        for (j, h) in r.from_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                c.fail(
                    Code::InvalidValue,
                    format!("{field}.fromHeaders[{j}].name"),
                    format!("`{}` is not a header name", h.name),
                );
            }
        }
        let header_fields = r
            .output_payload_to_header
            .iter()
            .map(|h| (format!("{field}.outputPayloadToHeader"), h))
            .chain(r.output_claim_to_headers.iter().enumerate().map(|(j, h)| {
                (
                    format!("{field}.outputClaimToHeaders[{j}].header"),
                    &h.header,
                )
            }));
        for (f, h) in header_fields {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                c.fail(Code::InvalidValue, f, format!("`{h}` is not a header name"));
            }
        }
        rules.push(xds::JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks,
            jwks_uri,
            openid_discovery,
            fetch_timeout_ms,
            from_headers: r
                .from_headers
                .iter()
                .map(|h| xds::JwtHeader {
                    name: h.name.clone(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            from_params: r.from_params.clone(),
            from_cookies: r.from_cookies.clone(),
            forward_original_token: r.forward_original_token,
            output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|h| xds::JwtClaimHeader {
                    header: h.header.clone(),
                    claim: h.claim.clone(),
                })
                .collect(),
        });
    }
    AuthnScope {
        key: key.clone(),
        selector,
        services,
        rules,
    }
}

/// Istio's `trustDomainAliases`: every principal of `policy`'s AuthorizationPolicies that
/// names `trust_domain` or one of `aliases` (`td/ns/x/sa/y`, also as a `prefix*`) is
/// matched under each of them, so a policy written for an old trust domain keeps matching
/// callers certified under the new one, and the other way round.
pub fn alias_trust_domains(
    policy: &mut xds::InboundPolicy,
    trust_domain: &str,
    aliases: &[String],
) {
    if aliases.is_empty() {
        return;
    }
    let domains: Vec<&str> = std::iter::once(trust_domain)
        .chain(aliases.iter().map(String::as_str))
        .collect();
    let expand = |values: &mut Vec<String>| {
        let mut out: Vec<String> = Vec::with_capacity(values.len());
        for v in values.iter() {
            let rest = domains
                .iter()
                .find_map(|d| v.strip_prefix(d).and_then(|r| r.strip_prefix('/')));
            match rest {
                Some(rest) => {
                    for d in &domains {
                        let aliased = format!("{d}/{rest}");
                        if !out.contains(&aliased) {
                            out.push(aliased);
                        }
                    }
                }
                None if !out.contains(v) => out.push(v.clone()),
                None => {}
            }
        }
        *values = out;
    };
    for rule in policy
        .authorization
        .iter_mut()
        .flat_map(|a| a.rules.iter_mut())
    {
        for source in &mut rule.from {
            expand(&mut source.principals);
            expand(&mut source.not_principals);
        }
        for c in rule.when.iter_mut().filter(|c| c.key == "source.principal") {
            expand(&mut c.values);
            expand(&mut c.not_values);
        }
    }
}

/// What PeerAuthentication, RequestAuthentication and AuthorizationPolicy say of traffic
/// to a workload of `namespace` with `labels`, serving `services`.
pub fn inbound_for(
    set: &super::ConfigSet,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    services: &[NamespacedName],
) -> xds::InboundPolicy {
    let peer = &set.peer_authentications;
    // Root-namespace objects apply mesh-wide, the namespace's own to its workloads; by
    // selector, or by the Services they target.
    let applies = |ns: &str, selector: &BTreeMap<String, String>, targets: &[NamespacedName]| {
        if !targets.is_empty() {
            return ns == namespace && targets.iter().any(|s| services.contains(s));
        }
        (ns == namespace || ns == ROOT_NAMESPACE) && picks(selector, labels)
    };
    let find = |ns: &str, selected: bool| {
        peer.values().find(|p| {
            p.key.namespace == ns
                && if selected {
                    !p.selector.is_empty() && picks(&p.selector, labels)
                } else {
                    p.selector.is_empty()
                }
        })
    };
    let workload = find(namespace, true);
    let chain = [
        workload,
        find(namespace, false),
        find(ROOT_NAMESPACE, false),
    ];
    let inherited = |from: usize| {
        chain[from..]
            .iter()
            .flatten()
            .map(|p| p.mode)
            .find(|m| *m != xds::MtlsMode::Unset)
            .unwrap_or(xds::MtlsMode::Permissive)
    };
    let mtls = inherited(0);
    let port_mtls = workload
        .map(|p| {
            p.ports
                .iter()
                .map(|(port, m)| {
                    let m = if *m == xds::MtlsMode::Unset { mtls } else { *m };
                    (*port, m as i32)
                })
                .collect()
        })
        .unwrap_or_default();
    let authorization = set
        .authorization_policies
        .values()
        .filter(|a| applies(&a.key.namespace, &a.selector, &a.services))
        .map(|a| {
            let mut policy = a.policy.clone();
            if !policy.provider.is_empty() {
                policy.ext_authz = set.mesh.ext_authz.get(&policy.provider).cloned();
            }
            policy
        })
        .collect();
    let jwt = set
        .request_authentications
        .values()
        .filter(|a| applies(&a.key.namespace, &a.selector, &a.services))
        .flat_map(|a| a.rules.iter().cloned())
        .collect();
    xds::InboundPolicy {
        mtls: mtls as i32,
        port_mtls,
        authorization,
        jwt,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load::load_files, SourceFile};
    use super::*;

    fn load(yaml: &str) -> Result<super::super::ConfigSet, super::super::ConfigErrors> {
        load_files(&[SourceFile {
            name: "policy.yaml".into(),
            contents: yaml.into(),
        }])
    }

    fn first_error(yaml: &str) -> super::super::ConfigError {
        load(yaml).expect_err("invalid").0.remove(0)
    }

    #[test]
    fn peer_authentication_inherits_from_workload_to_namespace_to_mesh() {
        let set = load("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: legacy}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: legacy}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: UNSET}\n  portLevelMtls: {5432: {mode: DISABLE}, 9090: {mode: UNSET}}\n").expect("valid");
        let at = |ns: &str, app: &str| {
            inbound_for(&set, ns, &[("app".to_owned(), app.to_owned())].into(), &[])
        };
        assert_eq!(
            at("demo", "web").mtls,
            xds::MtlsMode::Strict as i32,
            "mesh-wide"
        );
        assert_eq!(
            at("legacy", "web").mtls,
            xds::MtlsMode::Permissive as i32,
            "namespace"
        );
        let db = at("legacy", "db");
        assert_eq!(db.mtls, xds::MtlsMode::Permissive as i32, "UNSET inherits");
        assert_eq!(db.port_mtls[&5432], xds::MtlsMode::Disable as i32);
        assert_eq!(db.port_mtls[&9090], xds::MtlsMode::Permissive as i32);
        let none = inbound_for(&Default::default(), "x", &BTreeMap::new(), &[]);
        assert_eq!(none.mtls, xds::MtlsMode::Permissive as i32, "the default");
    }

    #[test]
    fn authorization_policies_apply_by_namespace_selector_root_and_target() {
        let set = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: demo}\nspec: {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: viewer, namespace: demo, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  selector: {matchLabels: {app: productpage}}\n  action: ALLOW\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: global-deny, namespace: istio-system}\nspec:\n  action: DENY\n  rules: [{from: [{source: {notNamespaces: [demo]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-service, namespace: demo}\nspec:\n  targetRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/productpage]}}]}]\n").expect("valid");
        let names = |app: &str, services: &[NamespacedName]| {
            let mut n: Vec<String> = inbound_for(
                &set,
                "demo",
                &[("app".to_owned(), app.to_owned())].into(),
                services,
            )
            .authorization
            .into_iter()
            .map(|p| p.name)
            .collect();
            n.sort();
            n
        };
        assert_eq!(
            names("productpage", &[]),
            [
                "demo/allow-nothing",
                "demo/viewer",
                "istio-system/global-deny"
            ]
        );
        assert_eq!(
            names("reviews", &[NamespacedName::new("demo", "reviews")]),
            [
                "demo/allow-nothing",
                "demo/by-service",
                "istio-system/global-deny"
            ]
        );
        let viewer = &set.authorization_policies[&NamespacedName::new("demo", "viewer")];
        assert!(viewer.policy.dry_run);
    }

    #[test]
    fn istio_s_validation_rules_are_enforced_by_field() {
        for (spec, field, says) in [
            (
                "spec:\n  portLevelMtls: {8080: {mode: DISABLE}}\n",
                "spec.portLevelMtls",
                "selector",
            ),
            ("spec: {mtls: {mode: strict}}\n", "spec.mtls.mode", "STRICT"),
        ] {
            let e = first_error(&format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: demo}}\n{spec}"));
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        for (spec, field, says) in [
            ("spec: {action: CUSTOM}\n", "spec.provider", "provider"),
            ("spec: {action: DENY, provider: {name: x}}\n", "spec.provider", "CUSTOM"),
            ("spec: {action: MAYBE}\n", "spec.action", "ALLOW"),
            ("spec:\n  rules: [{from: [{}]}]\n", "spec.rules[0].from[0].source", "needs a source"),
            ("spec:\n  rules: [{from: [{source: {principals: [a], serviceAccounts: [ns/sa]}}]}]\n", "spec.rules[0].from[0].source.serviceAccounts", "principals"),
            ("spec:\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n", "spec.rules[0].from[0].source.ipBlocks[0]", "CIDR"),
            ("spec:\n  rules: [{to: [{operation: {paths: [/a*b]}}]}]\n", "spec.rules[0].to[0].operation.paths[0]", "prefix"),
            ("spec:\n  rules: [{to: [{operation: {ports: [\"http\"]}}]}]\n", "spec.rules[0].to[0].operation.ports[0]", "port"),
            ("spec:\n  rules: [{when: [{key: request.colour, values: [red]}]}]\n", "spec.rules[0].when[0].key", "condition key"),
            ("spec:\n  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, name: a}]\n", "spec.targetRefs", "both"),
        ] {
            let e = first_error(&format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: demo}}\n{spec}"));
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let keys = r#"'{"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}]}'"#;
        for (rule, field, says) in [
            (
                format!("{{jwks: {keys}}}"),
                "spec.jwtRules[0].issuer",
                "issuer",
            ),
            (
                "{issuer: a, jwksUri: \"example.com/jwks\"}".to_owned(),
                "spec.jwtRules[0].jwksUri",
                "not an http or https URL",
            ),
            (
                format!("{{issuer: a, jwks: {keys}, jwksUri: \"https://example.com/jwks\"}}"),
                "spec.jwtRules[0].jwksUri",
                "cannot both",
            ),
            (
                "{issuer: a, jwksUri: \"https://example.com/jwks\", timeout: 5x}".to_owned(),
                "spec.jwtRules[0].timeout",
                "duration",
            ),
            (
                "{issuer: a}".to_owned(),
                "spec.jwtRules[0].jwks",
                "OpenID discovery",
            ),
            (
                "{issuer: a, jwks: '{}'}".to_owned(),
                "spec.jwtRules[0].jwks",
                "JSON Web Key Set",
            ),
            (
                format!("{{issuer: a, jwks: {keys}, fromHeaders: [{{name: \"bad header\"}}]}}"),
                "spec.jwtRules[0].fromHeaders[0].name",
                "header name",
            ),
        ] {
            let e = first_error(&format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: demo}}\nspec:\n  jwtRules: [{rule}]\n"));
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let ok = load(&format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  jwtRules: [{{issuer: a, jwks: {keys}}}]\n")).expect("valid");
        let inbound = inbound_for(
            &ok,
            "demo",
            &[("app".to_owned(), "a".to_owned())].into(),
            &[],
        );
        assert_eq!(inbound.jwt.len(), 1);
        assert!(inbound_for(&ok, "demo", &BTreeMap::new(), &[])
            .jwt
            .is_empty());
    }

    #[test]
    fn principals_of_a_trust_domain_alias_match_under_every_one() {
        let set = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  rules:\n  - from: [{source: {principals: [old.example/ns/demo/sa/sleep, other.example/ns/x/sa/y], notPrincipals: ['cluster.local/ns/bad/*']}}]\n    when: [{key: source.principal, values: [old.example/ns/demo/sa/sleep]}]\n").expect("valid");
        let mut inbound = inbound_for(&set, "demo", &BTreeMap::new(), &[]);
        alias_trust_domains(&mut inbound, "cluster.local", &["old.example".to_owned()]);
        let rule = &inbound.authorization[0].rules[0];
        assert_eq!(
            rule.from[0].principals,
            [
                "cluster.local/ns/demo/sa/sleep",
                "old.example/ns/demo/sa/sleep",
                "other.example/ns/x/sa/y"
            ]
        );
        assert_eq!(
            rule.from[0].not_principals,
            ["cluster.local/ns/bad/*", "old.example/ns/bad/*"]
        );
        assert_eq!(rule.when[0].values.len(), 2);
    }

    #[test]
    fn remote_keys_are_left_for_the_controller_to_fetch() {
        let set = load("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: demo}\nspec:\n  jwtRules:\n  - {issuer: a, jwksUri: \"https://keys.example.com/jwks.json\", timeout: 2s}\n  - {issuer: \"https://accounts.example.com/\"}\n").expect("valid");
        let rules = inbound_for(&set, "demo", &BTreeMap::new(), &[]).jwt;
        let by_issuer = |i: &str| rules.iter().find(|r| r.issuer == i).expect("rule");
        let uri = by_issuer("a");
        assert_eq!(uri.jwks, "");
        assert_eq!(uri.jwks_uri, "https://keys.example.com/jwks.json");
        assert!(!uri.openid_discovery);
        assert_eq!(uri.fetch_timeout_ms, 2000);
        let discovered = by_issuer("https://accounts.example.com/");
        assert_eq!(
            discovered.jwks_uri,
            "https://accounts.example.com/.well-known/openid-configuration"
        );
        assert!(discovered.openid_discovery);
    }
}
