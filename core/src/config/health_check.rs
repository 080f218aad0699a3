//! `HealthCheck` (isthmus.io/v1alpha1): an active health check of a service's endpoints,
//! attached to the service's [`crate::routing::ServiceRouting`] and pushed with it. Every
//! field is checked here and named on error; defaults (5 s interval, 1 s timeout, a tenth
//! of the interval as jitter, 2 successes back, 3 failures out) are filled in, so that
//! sidecars are pushed a complete check.

use super::assemble::{limited_service, targets_service};
use super::istio::parse_duration_ms;
use super::kinds::{HealthCheckSpec, IntOrString};
use super::validate::{Checker, Document, DocumentBody};
use super::{Code, ConfigError, ConfigSet, NamespacedName};
use crate::routing::{HealthCheck, Probe};

const DEFAULT_INTERVAL_MS: u64 = 5_000;
const DEFAULT_TIMEOUT_MS: u64 = 1_000;
const DEFAULT_HEALTHY: u32 = 2;
const DEFAULT_UNHEALTHY: u32 = 3;
/// Shortest interval: a probe every 100 ms is already far more than any app needs.
const MIN_INTERVAL_MS: u64 = 100;
/// Thresholds above this would keep a dead endpoint in for minutes.
const MAX_THRESHOLD: i64 = 100;

pub(super) fn attach(docs: &[Document], set: &mut ConfigSet, errors: &mut Vec<ConfigError>) {
    for doc in docs {
        let DocumentBody::HealthCheck(spec) = &doc.body else {
            continue;
        };
        let ns = doc.namespace();
        let mut c = Checker::new(doc, NamespacedName::new(&ns, &doc.metadata.name), errors);
        if !targets_service(&mut c, &spec.target_ref) {
            continue;
        }
        let Some(check) = health_check(&mut c, spec, &doc.metadata.name) else {
            continue;
        };
        let Some(target) = limited_service(&mut c, set, &ns, &spec.target_ref) else {
            continue;
        };
        let Some(port) = service_port(&mut c, set, &target, spec.port.as_ref()) else {
            continue;
        };
        let r = set.routing.entry(target.clone()).or_default();
        if let Some(other) = &r.health_check {
            c.fail(
                Code::Duplicate,
                "spec.targetRef.name",
                format!("HealthCheck {} already checks {target}", other.name),
            );
            continue;
        }
        r.health_check = Some(HealthCheck { port, ..check });
    }
}

/// The service port a check names (by number or name), if the service has it.
fn service_port(
    c: &mut Checker<'_>,
    set: &ConfigSet,
    target: &NamespacedName,
    port: Option<&IntOrString>,
) -> Option<Option<u16>> {
    let Some(port) = port else {
        return Some(None);
    };
    let ports = &set.services.get(target)?.ports;
    let found = ports.iter().find(|p| match port {
        IntOrString::Int(n) => i64::from(p.port) == *n,
        IntOrString::String(name) => &p.name == name,
    });
    match found {
        Some(p) => Some(Some(p.port)),
        None => {
            let named = match port {
                IntOrString::Int(n) => n.to_string(),
                IntOrString::String(s) => format!("`{s}`"),
            };
            c.fail(
                Code::Reference,
                "spec.port",
                format!("{target} has no port {named}"),
            );
            None
        }
    }
}

/// The check a spec describes, with defaults filled in; `None` (and faults named by field)
/// if any field is wrong.
fn health_check(c: &mut Checker<'_>, spec: &HealthCheckSpec, name: &str) -> Option<HealthCheck> {
    let mut ok = true;
    let mut probes = Vec::new();
    if let Some(http) = &spec.http {
        let mut expected_statuses = Vec::new();
        for (i, s) in http.expected_statuses.iter().enumerate() {
            match status_range(s) {
                Some(r) => expected_statuses.push(r),
                None => {
                    c.fail(
                        Code::InvalidValue,
                        format!("spec.http.expectedStatuses[{i}]"),
                        format!(
                            "{} is not a status code (100-599) or a range such as \"200-299\"",
                            shown(s)
                        ),
                    );
                    ok = false;
                }
            }
        }
        if !http.path.starts_with('/') || http.path.chars().any(char::is_whitespace) {
            c.fail(
                Code::InvalidValue,
                "spec.http.path",
                format!("`{}` is not a request path (it starts with `/`)", http.path),
            );
            ok = false;
        }
        if let Some(host) = &http.host {
            if host.parse::<http::uri::Authority>().is_err() {
                c.fail(
                    Code::InvalidValue,
                    "spec.http.host",
                    format!("`{host}` is not a host name"),
                );
                ok = false;
            }
        }
        probes.push(Probe::Http {
            path: http.path.clone(),
            host: http.host.clone(),
            expected_statuses,
        });
    }
    if let Some(grpc) = &spec.grpc {
        probes.push(Probe::Grpc {
            service: grpc.service.clone(),
        });
    }
    if spec.tcp.is_some() {
        probes.push(Probe::Tcp);
    }
    let probe = match probes.len() {
        1 => probes.pop(),
        n => {
            c.fail(
                if n == 0 {
                    Code::Missing
                } else {
                    Code::InvalidValue
                },
                "spec",
                format!("a HealthCheck names exactly one of `http`, `grpc` and `tcp` ({n} given)"),
            );
            None
        }
    };
    let mut duration = |field: &str, value: &Option<String>, default: u64, min: u64| {
        let Some(v) = value else {
            return Some(default);
        };
        match parse_duration_ms(v).filter(|ms| *ms >= min) {
            Some(ms) => Some(ms),
            None => {
                c.fail(
                    Code::InvalidValue,
                    format!("spec.{field}"),
                    format!("`{v}` is not a duration of at least {min} ms (such as 5s or 500ms)"),
                );
                None
            }
        }
    };
    let interval_ms = duration(
        "interval",
        &spec.interval,
        DEFAULT_INTERVAL_MS,
        MIN_INTERVAL_MS,
    );
    let timeout_ms = duration("timeout", &spec.timeout, DEFAULT_TIMEOUT_MS, 1);
    let jitter_ms = duration(
        "intervalJitter",
        &spec.interval_jitter,
        interval_ms.unwrap_or(DEFAULT_INTERVAL_MS) / 10,
        0,
    );
    if let (Some(i), Some(t)) = (interval_ms, timeout_ms) {
        if t > i {
            c.fail(
                Code::InvalidValue,
                "spec.timeout",
                format!("{t} ms is longer than the interval ({i} ms): probes would overlap"),
            );
            ok = false;
        }
    }
    let mut threshold = |field: &str, value: Option<i64>, default: u32| {
        let v = value.unwrap_or(i64::from(default));
        if (1..=MAX_THRESHOLD).contains(&v) {
            u32::try_from(v).ok()
        } else {
            c.fail(
                Code::InvalidValue,
                format!("spec.{field}"),
                format!("{v} is not a count of probes in a row (1-{MAX_THRESHOLD})"),
            );
            None
        }
    };
    let healthy_threshold = threshold("healthyThreshold", spec.healthy_threshold, DEFAULT_HEALTHY);
    let unhealthy_threshold = threshold(
        "unhealthyThreshold",
        spec.unhealthy_threshold,
        DEFAULT_UNHEALTHY,
    );
    if !ok {
        return None;
    }
    Some(HealthCheck {
        name: name.to_owned(),
        port: None,
        probe: probe?,
        interval_ms: interval_ms?,
        timeout_ms: timeout_ms?,
        jitter_ms: jitter_ms?,
        healthy_threshold: healthy_threshold?,
        unhealthy_threshold: unhealthy_threshold?,
    })
}

fn shown(s: &IntOrString) -> String {
    match s {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => format!("`{s}`"),
    }
}

/// `204` or `"200-299"` (inclusive), within 100-599.
fn status_range(s: &IntOrString) -> Option<(u16, u16)> {
    let code = |n: i64| u16::try_from(n).ok().filter(|n| (100..=599).contains(n));
    let (start, end) = match s {
        IntOrString::Int(n) => (code(*n)?, code(*n)?),
        IntOrString::String(s) => match s.split_once('-') {
            Some((a, b)) => (code(a.trim().parse().ok()?)?, code(b.trim().parse().ok()?)?),
            None => (code(s.trim().parse().ok()?)?, code(s.trim().parse().ok()?)?),
        },
    };
    (start <= end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::super::{load_files, SourceFile};
    use super::*;

    fn load(spec: &str) -> Result<ConfigSet, Vec<ConfigError>> {
        let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: demo}}\nspec: {{selector: {{app: reviews}}, ports: [{{port: 80, name: http}}, {{port: 9090, name: grpc}}]}}\n---\napiVersion: isthmus.io/v1alpha1\nkind: HealthCheck\nmetadata: {{name: hc, namespace: demo}}\nspec:\n  targetRef: {{kind: Service, name: reviews}}\n{spec}");
        load_files(&[SourceFile {
            name: "hc.yaml".into(),
            contents: yaml,
        }])
        .map_err(|e| e.0)
    }

    fn check(spec: &str) -> HealthCheck {
        let set = load(spec).expect("valid");
        set.routing[&NamespacedName::new("demo", "reviews")]
            .health_check
            .clone()
            .expect("attached")
    }

    fn field(spec: &str) -> String {
        match load(spec) {
            Err(mut e) => e.remove(0).field,
            Ok(set) => set.warnings.first().cloned().expect("a fault").field,
        }
    }

    #[test]
    fn a_health_check_attaches_with_its_defaults() {
        let hc = check("  http: {path: /healthz}\n");
        assert_eq!(
            hc,
            HealthCheck {
                name: "hc".into(),
                port: None,
                probe: Probe::Http {
                    path: "/healthz".into(),
                    host: None,
                    expected_statuses: vec![],
                },
                interval_ms: 5_000,
                timeout_ms: 1_000,
                jitter_ms: 500,
                healthy_threshold: 2,
                unhealthy_threshold: 3,
            }
        );
    }

    #[test]
    fn every_field_is_read() {
        let hc = check("  port: grpc\n  grpc: {service: reviews.v1}\n  interval: 2s\n  timeout: 300ms\n  intervalJitter: 0s\n  healthyThreshold: 1\n  unhealthyThreshold: 5\n");
        assert_eq!(hc.port, Some(9090));
        assert_eq!(
            hc.probe,
            Probe::Grpc {
                service: "reviews.v1".into()
            }
        );
        assert_eq!(
            (hc.interval_ms, hc.timeout_ms, hc.jitter_ms),
            (2_000, 300, 0)
        );
        assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (1, 5));
        let hc = check("  port: 80\n  http: {path: /ready, host: reviews.local, expectedStatuses: [204, \"200-299\"]}\n");
        assert_eq!(hc.port, Some(80));
        assert_eq!(
            hc.probe,
            Probe::Http {
                path: "/ready".into(),
                host: Some("reviews.local".into()),
                expected_statuses: vec![(204, 204), (200, 299)],
            }
        );
        assert_eq!(check("  tcp: {}\n").probe, Probe::Tcp);
    }

    #[test]
    fn bad_health_checks_name_their_field() {
        assert_eq!(field("  http: {path: healthz}\n"), "spec.http.path");
        assert_eq!(
            field("  http: {path: /h, expectedStatuses: [\"300-200\"]}\n"),
            "spec.http.expectedStatuses[0]"
        );
        assert_eq!(
            field("  http: {path: /h, expectedStatuses: [700]}\n"),
            "spec.http.expectedStatuses[0]"
        );
        assert_eq!(field("  interval: 5s\n"), "spec");
        assert_eq!(field("  tcp: {}\n  grpc: {}\n"), "spec");
        assert_eq!(field("  tcp: {}\n  interval: often\n"), "spec.interval");
        assert_eq!(field("  tcp: {}\n  interval: 10ms\n"), "spec.interval");
        assert_eq!(
            field("  tcp: {}\n  interval: 1s\n  timeout: 2s\n"),
            "spec.timeout"
        );
        assert_eq!(
            field("  tcp: {}\n  unhealthyThreshold: 0\n"),
            "spec.unhealthyThreshold"
        );
        assert_eq!(field("  tcp: {}\n  port: 81\n"), "spec.port");
        assert_eq!(field("  tcp: {}\n  port: admin\n"), "spec.port");
        assert_eq!(field("  tcp: {}\n  tpc: {}\n"), "spec.tpc");
    }

    #[test]
    fn a_second_health_check_for_a_service_is_refused() {
        let spec = "  tcp: {}\n---\napiVersion: isthmus.io/v1alpha1\nkind: HealthCheck\nmetadata: {name: other, namespace: demo}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  tcp: {}\n";
        let errors = load(spec).expect_err("refused");
        assert!(
            errors[0]
                .message
                .contains("HealthCheck hc already checks demo/reviews"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn a_health_check_travels_the_wire_unchanged_and_a_bad_one_is_refused() {
        let routing = crate::routing::ServiceRouting {
            health_check: Some(check(
                "  port: 80\n  http: {path: /h, expectedStatuses: [204]}\n",
            )),
            ..Default::default()
        };
        let wire: isthmus_proto::routing::ServiceRouting = (&routing).into();
        let back = crate::routing::ServiceRouting::try_from(wire.clone()).expect("converts");
        assert_eq!(back.health_check, routing.health_check);
        let mut bad = wire;
        if let Some(h) = &mut bad.health_check {
            h.unhealthy_threshold = 0;
        }
        assert!(crate::routing::ServiceRouting::try_from(bad).is_err());
    }
}
