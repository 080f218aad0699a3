//! Attaching Istio's routing objects to the services they name: each VirtualService,
//! DestinationRule and LocalRateLimit, checked on its own by the validator, becomes part of
//! its service's [`crate::routing::ServiceRouting`]. References are resolved here: a name
//! that matches no Service (yet) is a warning and applies once the Service exists; a second
//! object for the same service is refused.

use super::istio;
use super::kinds::LocalRateLimitSpec;
use super::validate::{resolve_host, Checker, Document, DocumentBody};
use super::{Code, ConfigError, ConfigSet, NamespacedName};

/// Whether a rate limit's or health check's `targetRef` names a Service (faulted by name
/// if not).
pub(super) fn targets_service(c: &mut Checker<'_>, target: &super::kinds::TargetRefSpec) -> bool {
    if target.kind == "Service" {
        return true;
    }
    c.fail(
        Code::InvalidValue,
        "spec.targetRef.kind",
        format!("only a Service can be targeted, not a `{}`", target.kind),
    );
    false
}

/// The Service a rate limit's or health check's `targetRef` names in `namespace`, if it
/// exists (faulted by name if not).
pub(super) fn limited_service(
    c: &mut Checker<'_>,
    set: &ConfigSet,
    namespace: &str,
    target: &super::kinds::TargetRefSpec,
) -> Option<NamespacedName> {
    let name = NamespacedName::new(namespace, &target.name);
    if set.services.contains_key(&name) {
        return Some(name);
    }
    c.fail(
        Code::Reference,
        "spec.targetRef.name",
        format!("no Service {name}"),
    );
    None
}

fn rate_limit(c: &mut Checker<'_>, spec: &LocalRateLimitSpec) -> Option<crate::routing::RateLimit> {
    targets_service(c, &spec.target_ref);
    let tokens = u32::try_from(spec.tokens_per_interval)
        .ok()
        .filter(|t| *t > 0);
    if tokens.is_none() {
        c.fail(
            Code::InvalidValue,
            "spec.tokensPerInterval",
            format!("{} is not a positive token count", spec.tokens_per_interval),
        );
    }
    let interval_ms = super::istio::parse_duration_ms(&spec.interval).filter(|ms| *ms > 0);
    if interval_ms.is_none() {
        c.fail(
            Code::InvalidValue,
            "spec.interval",
            format!(
                "`{}` is not a positive duration like 1s or 100ms",
                spec.interval
            ),
        );
    }
    let burst = match spec.burst {
        None => tokens,
        Some(b) => {
            let b = u32::try_from(b).ok().filter(|b| *b > 0);
            if b.is_none() {
                c.fail(
                    Code::InvalidValue,
                    "spec.burst",
                    "burst must be a positive token count",
                );
            }
            b
        }
    };
    Some(crate::routing::RateLimit {
        route: spec.route.clone(),
        tokens: tokens?,
        interval_ms: interval_ms?,
        burst: burst?,
        per_caller: spec.per_caller,
    })
}

/// Resolves VirtualServices and DestinationRules against the services and attaches them.
/// Resolves every VirtualService, DestinationRule and LocalRateLimit to the service it
/// names and attaches it there.
pub(super) fn attach(docs: &[Document], set: &mut ConfigSet, errors: &mut Vec<ConfigError>) {
    super::health_check::attach(docs, set, errors);
    for doc in docs {
        let DocumentBody::GlobalRateLimit(spec) = &doc.body else {
            continue;
        };
        let ns = doc.namespace();
        let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
        if !targets_service(&mut c, &spec.target_ref) {
            continue;
        }
        let Some(budget) = u32::try_from(spec.requests_per_second)
            .ok()
            .filter(|b| *b > 0)
        else {
            c.fail(
                Code::InvalidValue,
                "spec.requestsPerSecond",
                format!(
                    "{} is not a positive request rate",
                    spec.requests_per_second
                ),
            );
            continue;
        };
        let Some(target) = limited_service(&mut c, set, &ns, &spec.target_ref) else {
            continue;
        };
        set.routing
            .entry(target)
            .or_default()
            .global_rate_limits
            .push(crate::routing::GlobalRateLimit {
                name: doc.metadata.name.clone(),
                route: spec.route.clone(),
                requests_per_second: budget,
            });
    }
    for doc in docs {
        let DocumentBody::LocalRateLimit(spec) = &doc.body else {
            continue;
        };
        let ns = doc.namespace();
        let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
        let Some(target) = limited_service(&mut c, set, &ns, &spec.target_ref) else {
            continue;
        };
        if let Some(limit) = rate_limit(&mut c, spec) {
            set.routing
                .entry(target)
                .or_default()
                .rate_limits
                .push(limit);
        }
    }
    for doc in docs {
        let DocumentBody::DestinationRule(spec) = &doc.body else {
            continue;
        };
        let ns = doc.namespace();
        let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
        let before = c.mark();
        let (host, subsets, lb) = istio::destination_rule(&mut c, spec);
        let export_to = super::validate::export_to_list(&mut c, "spec.exportTo", &spec.export_to);
        if c.rejected_since(before) {
            continue; // rejected: applies nothing
        }
        let Some(target) = routed_service(&mut c, set, &host, &ns, "spec.host") else {
            continue;
        };
        let internal = set
            .services
            .get(&target)
            .is_some_and(|s| s.external.is_none());
        let modes = std::iter::once(&lb)
            .chain(subsets.iter().map(|s| &s.policy))
            .flat_map(|p| std::iter::once(p).chain(p.ports.iter().map(|(_, p)| p)))
            .filter_map(|p| p.tls.as_ref())
            .any(|t| t.mode != crate::routing::TlsMode::IstioMutual);
        if internal && modes {
            c.fail(
                Code::Ignored,
                "spec.trafficPolicy.tls",
                format!("{target} is in the mesh: sidecars always reach it with the mesh's mutual TLS, so `tls` other than ISTIO_MUTUAL changes nothing (it is for MESH_EXTERNAL hosts)"),
            );
        }
        let r = set.routing.entry(target.clone()).or_default();
        if !r.subsets.is_empty() || !r.policy.is_empty() {
            c.fail(
                Code::Duplicate,
                "spec.host",
                format!("another DestinationRule already applies to {target}"),
            );
            continue;
        }
        r.subsets = subsets;
        r.policy = lb;
        if !export_to.is_empty() {
            r.destination_rule_scope = Some(crate::routing::Scope {
                namespace: ns.clone(),
                export_to,
            });
        }
    }
    for doc in docs {
        let DocumentBody::VirtualService(spec) = &doc.body else {
            continue;
        };
        let ns = doc.namespace();
        let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
        let before = c.mark();
        let Some(mut vs) = istio::virtual_service(&mut c, spec) else {
            continue;
        };
        resolve_destinations(&mut c, &ns, &mut vs, set);
        super::validate::export_to_list(&mut c, "spec.exportTo", &spec.export_to);
        if c.rejected_since(before) {
            continue; // rejected: applies nothing
        }
        for (i, host) in vs.hosts.iter().enumerate() {
            let Some(target) = routed_service(&mut c, set, host, &ns, &format!("spec.hosts[{i}]"))
            else {
                continue;
            };
            let r = set.routing.entry(target.clone()).or_default();
            if !r.http.is_empty() {
                c.fail(
                    Code::Duplicate,
                    format!("spec.hosts[{i}]"),
                    format!("another VirtualService already routes {target}"),
                );
                continue;
            }
            r.http = vs.http.clone();
            r.tcp = vs.tcp.clone();
            if !spec.export_to.is_empty() {
                r.virtual_service_scope = Some(crate::routing::Scope {
                    namespace: ns.clone(),
                    export_to: spec.export_to.clone(),
                });
            }
        }
    }
    for doc in docs {
        let (route, target) = match &doc.body {
            DocumentBody::LocalRateLimit(spec) => (&spec.route, &spec.target_ref),
            DocumentBody::GlobalRateLimit(spec) => (&spec.route, &spec.target_ref),
            _ => continue,
        };
        let Some(route) = route else { continue };
        let ns = doc.namespace();
        let target = NamespacedName::new(&ns, &target.name);
        let known = set
            .routing
            .get(&target)
            .is_some_and(|r| r.http.iter().any(|h| &h.name == route));
        if set.services.contains_key(&target) && !known {
            let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
            c.fail(
                Code::Reference,
                "spec.route",
                format!("no VirtualService route named `{route}` routes {target}"),
            );
        }
    }
}

/// The service a VirtualService or DestinationRule host names. A Kubernetes name with no
/// Service in this cluster's config is a warning, and the routing is kept: the service may
/// run only in other clusters, and this cluster's callers route to it all the same.
fn routed_service(
    c: &mut Checker<'_>,
    set: &ConfigSet,
    host: &str,
    ns: &str,
    field: &str,
) -> Option<NamespacedName> {
    if let Some(target) = set.service_for_host(host, ns) {
        return Some(target);
    }
    let remote = resolve_host(host, ns);
    c.fail(
        Code::Reference,
        field,
        match &remote {
            Some(_) => format!("no Service named `{host}` in this cluster's config; the routing applies if another cluster exports it"),
            None => format!("no Service named `{host}`"),
        },
    );
    remote
}

fn resolve_destinations(
    c: &mut Checker<'_>,
    ns: &str,
    vs: &mut istio::ParsedVirtualService,
    set: &ConfigSet,
) {
    for (i, route) in vs.tcp.iter_mut().enumerate() {
        for (j, d) in route.destinations.iter_mut().enumerate() {
            resolve_destination(
                c,
                ns,
                &format!("spec.tcp[{i}].route[{j}].destination"),
                d,
                set,
            );
        }
    }
    for (i, route) in vs.http.iter_mut().enumerate() {
        if let crate::routing::RouteAction::Route(dests) = &mut route.action {
            for (j, d) in dests.iter_mut().enumerate() {
                resolve_destination(
                    c,
                    ns,
                    &format!("spec.http[{i}].route[{j}].destination"),
                    d,
                    set,
                );
            }
        }
        if let Some(m) = &mut route.mirror {
            resolve_destination(
                c,
                ns,
                &format!("spec.http[{i}].mirror"),
                &mut m.destination,
                set,
            );
        }
    }
}

/// Resolves a destination's host to `namespace/name` and checks its subset and port.
fn resolve_destination(
    c: &mut Checker<'_>,
    ns: &str,
    field: &str,
    d: &mut crate::routing::Destination,
    set: &ConfigSet,
) {
    let Some(key) = set
        .service_for_host(&d.service, ns)
        .or_else(|| resolve_host(&d.service, ns))
    else {
        c.fail(
            Code::InvalidValue,
            format!("{field}.host"),
            format!("`{}` is not a service host", d.service),
        );
        return;
    };
    if !set.services.contains_key(&key) {
        // A reference, not a fault of this object: objects arrive in any order. Until the
        // Service exists, requests routed here get 503.
        c.fail(
            Code::Reference,
            format!("{field}.host"),
            format!("no Service named `{}` in this cluster's config; requests routed to it get 503 unless another cluster exports it", d.service),
        );
        d.service = key.to_string();
        return;
    }
    if let Some(subset) = &d.subset {
        let known = set
            .routing
            .get(&key)
            .is_some_and(|r| r.subsets.iter().any(|s| &s.name == subset));
        if !known {
            c.fail(
                Code::Reference,
                format!("{field}.subset"),
                format!("no DestinationRule for {key} defines subset `{subset}`"),
            );
        }
    }
    if let Some(port) = d.port {
        if !set.services[&key].ports.iter().any(|p| p.port == port) {
            c.fail(
                Code::Reference,
                format!("{field}.port.number"),
                format!("{key} has no port {port}"),
            );
        }
    }
    d.service = key.to_string();
}

#[cfg(test)]
mod routing_tests {
    use super::super::{load::load_files, SourceFile};
    use super::super::{Code, ConfigError, ConfigSet, NamespacedName};

    const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

    fn with_vs(http: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        let vs = format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  hosts: [reviews]\n  http:\n{http}");
        load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: format!("{BASE}{vs}"),
        }])
        .map_err(|e| e.0)
    }

    #[test]
    fn a_valid_virtual_service_attaches_to_its_service() {
        let set = with_vs("  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 75}\n    - {destination: {host: reviews, subset: v2}, weight: 25}\n    timeout: 1.5s\n    retries: {attempts: 2, retryOn: 'gateway-error,unavailable'}\n").expect("valid");
        let r = &set.routing[&NamespacedName::new("demo", "reviews")];
        assert_eq!(r.http.len(), 2);
        assert_eq!(r.subsets.len(), 2);
        assert_eq!(
            r.policy.load_balancer,
            Some(crate::routing::LoadBalancer::LeastRequest)
        );
        assert_eq!(r.http[1].timeout_ms, Some(1500));
        let crate::routing::RouteAction::Route(d) = &r.http[1].action else {
            panic!("route")
        };
        assert_eq!(d[0].service, "demo/reviews");
    }

    /// The first fault of a rejected object, or else the first warning.
    fn first(http: &str) -> ConfigError {
        match with_vs(http) {
            Err(mut e) => e.remove(0),
            Ok(set) => set.warnings.first().cloned().expect("a fault or a warning"),
        }
    }

    #[test]
    fn unsupported_istio_fields_are_named_not_ignored() {
        let e = first("  - route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: reviews}}]\n");
        assert_eq!(
            (e.field.as_str(), e.code),
            ("spec.http[0].mirrors", Code::Schema)
        );
        assert!(e.message.contains("not supported yet"), "{}", e.message);
        let e = first("  - route: [{destination: {host: reviews}}]\n    bogus: 1\n");
        assert_eq!(e.field, "spec.http[0].bogus");
    }

    #[test]
    fn weights_subsets_hosts_and_regexes_are_checked() {
        let e = first("  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 70}\n    - {destination: {host: reviews, subset: v2}, weight: 20}\n");
        assert!(
            e.field == "spec.http[0].route" && e.message.contains("add up to 90"),
            "{e}"
        );
        let e = first("  - route: [{destination: {host: reviews, subset: v3}}]\n");
        assert_eq!(
            (e.field.as_str(), e.code),
            ("spec.http[0].route[0].destination.subset", Code::Reference)
        );
        let e = first("  - route: [{destination: {host: ratings}}]\n");
        assert!(e.message.contains("no Service named `ratings`"), "{e}");
        let e = first("  - match: [{uri: {regex: '(unclosed'}}]\n    route: [{destination: {host: reviews}}]\n");
        assert_eq!(e.field, "spec.http[0].match[0].uri.regex");
        let e = first("  - route: [{destination: {host: reviews}}]\n    timeout: soon\n");
        assert_eq!(e.field, "spec.http[0].timeout");
        let e = first("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, retryOn: 'sometimes'}\n");
        assert!(
            e.message.contains("`sometimes` is not a retry condition"),
            "{e}"
        );
        let e = first(
            "  - fault: {abort: {grpcStatus: NOPE}}\n    route: [{destination: {host: reviews}}]\n",
        );
        assert_eq!(e.field, "spec.http[0].fault.abort.grpcStatus");
    }

    #[test]
    fn deprecated_fields_istio_still_accepts_are_mapped_with_a_warning() {
        let base = BASE.replace(
            "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            "trafficPolicy: {outlierDetection: {consecutiveErrors: 3}}",
        );
        let vs = "---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: reviews, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n    mirror: {host: reviews, subset: v2}\n    mirrorPercent: 40\n";
        let set = load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: format!("{base}{vs}"),
        }])
        .expect("accepted");
        let r = &set.routing[&NamespacedName::new("demo", "reviews")];
        let outlier = r.policy.outlier.as_ref().expect("outlier detection");
        assert_eq!(
            (outlier.consecutive_gateway, outlier.consecutive_5xx),
            (Some(3), None),
            "gateway errors only, as Istio maps it"
        );
        assert_eq!(r.http[0].mirror.as_ref().map(|m| m.percentage), Some(40.0));
        let fields: Vec<(&str, Code)> = set
            .warnings
            .iter()
            .map(|w| (w.field.as_str(), w.code))
            .collect();
        assert_eq!(
            fields,
            vec![
                (
                    "spec.trafficPolicy.outlierDetection.consecutiveErrors",
                    Code::Deprecated
                ),
                ("spec.http[0].mirrorPercent", Code::Deprecated),
            ]
        );
    }

    #[test]
    fn unsupported_destination_rule_policies_are_named() {
        let dr = BASE.replace(
            "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            "trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 1s}}}}",
        );
        let e = load_files(&[SourceFile {
            name: "r.yaml".into(),
            contents: dr,
        }])
        .expect_err("unsupported")
        .0
        .remove(0);
        assert_eq!(
            e.field,
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive"
        );
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::super::{load::load_files, SourceFile};
    use super::super::{ConfigError, ConfigSet, NamespacedName};

    /// A Service `demo/reviews` and an object of `kind` named `l` with `spec`.
    fn load_as(kind: &str, spec: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: demo}}\nspec: {{selector: {{app: reviews}}, ports: [{{port: 80}}]}}\n---\napiVersion: isthmus.io/v1alpha1\nkind: {kind}\nmetadata: {{name: l, namespace: demo}}\nspec:\n{spec}");
        load_files(&[SourceFile {
            name: "l.yaml".into(),
            contents: yaml,
        }])
        .map_err(|e| e.0)
    }

    fn load(spec: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        load_as("LocalRateLimit", spec)
    }

    /// The field of the first fault (or warning) of `spec` as a `kind`.
    fn field_of(kind: &str, spec: &str) -> String {
        match load_as(kind, spec) {
            Err(mut e) => e.remove(0).field,
            Ok(set) => set.warnings.first().cloned().expect("a warning").field,
        }
    }

    #[test]
    fn a_rate_limit_attaches_to_its_service() {
        let set = load("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 10\n  interval: 1s\n  burst: 20\n").expect("valid");
        let limit = &set.routing[&NamespacedName::new("demo", "reviews")].rate_limits[0];
        assert_eq!(
            (
                limit.tokens,
                limit.interval_ms,
                limit.burst,
                limit.per_caller
            ),
            (10, 1000, 20, false)
        );
    }

    #[test]
    fn bad_rate_limits_name_their_field() {
        let field = |spec: &str| field_of("LocalRateLimit", spec);
        assert_eq!(field("  targetRef: {kind: Service, name: nope}\n  tokensPerInterval: 1\n  interval: 1s\n"), "spec.targetRef.name");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 0\n  interval: 1s\n"), "spec.tokensPerInterval");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  tokensPerInterval: 1\n  interval: often\n"), "spec.interval");
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  route: missing\n  tokensPerInterval: 1\n  interval: 1s\n"), "spec.route");
    }

    #[test]
    fn a_global_rate_limit_attaches_to_its_service_under_its_name() {
        let set = load_as(
            "GlobalRateLimit",
            "  targetRef: {kind: Service, name: reviews}\n  requestsPerSecond: 300\n",
        )
        .expect("valid");
        let limit = &set.routing[&NamespacedName::new("demo", "reviews")].global_rate_limits[0];
        assert_eq!((limit.name.as_str(), limit.requests_per_second), ("l", 300));
    }

    #[test]
    fn bad_global_rate_limits_name_their_field() {
        let field = |spec: &str| field_of("GlobalRateLimit", spec);
        assert_eq!(
            field("  targetRef: {kind: Service, name: nope}\n  requestsPerSecond: 1\n"),
            "spec.targetRef.name"
        );
        assert_eq!(
            field("  targetRef: {kind: Service, name: reviews}\n  requestsPerSecond: 0\n"),
            "spec.requestsPerSecond"
        );
        assert_eq!(
            field("  targetRef: {kind: Pod, name: reviews}\n  requestsPerSecond: 5\n"),
            "spec.targetRef.kind"
        );
        assert_eq!(field("  targetRef: {kind: Service, name: reviews}\n  route: missing\n  requestsPerSecond: 5\n"), "spec.route");
        assert_eq!(
            field("  targetRef: {kind: Service, name: reviews}\n  requestsPerSecnd: 5\n"),
            "spec.requestsPerSecnd"
        );
    }
}
