//! `/explain` on the admin listener, what `isthmus explain` prints: for a request this
//! workload would send (host, path, method, headers), each step of the decision with its
//! reason, from the proxy's live config and health — the name's resolution, the registry
//! entry (this cluster's endpoints, the other clusters that export it, and how current
//! each is), the route and the policy that apply, the candidates by locality tier with why
//! any is out, and the choice. Nothing is sent: the choice is the one a request made now
//! would start with (round robin and random pickers may start elsewhere).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use isthmus_core::routing::RouteAction;
use serde_json::{json, Value};

use crate::lb::{self, Target};
use crate::routing_table::{pick_weighted, RequestView};
use crate::state::MeshState;

/// What to explain, from the query string.
struct Ask {
    host: String,
    path: String,
    method: String,
    headers: HeaderMap,
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ask(query: &str) -> Result<Ask, String> {
    let mut a = Ask {
        host: String::new(),
        path: "/".into(),
        method: "GET".into(),
        headers: HeaderMap::new(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        match k {
            "host" => a.host = v,
            "path" => a.path = v,
            "method" => a.method = v.to_ascii_uppercase(),
            "header" => {
                let (name, value) = v
                    .split_once(':')
                    .ok_or_else(|| format!("header `{v}` is not name:value"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("`{name}` is not a header name"))?;
                let value = HeaderValue::from_str(value.trim())
                    .map_err(|_| format!("the value of header {name} is not valid"))?;
                a.headers.append(name, value);
            }
            other => {
                return Err(format!(
                    "unknown parameter `{other}` (host, path, method, header)"
                ))
            }
        }
    }
    if a.host.is_empty() {
        return Err("give the host to explain: /explain?host=NAME[:PORT]".into());
    }
    Ok(a)
}

fn ago(since: u64) -> String {
    let now = isthmus_core::admin::unix_seconds(std::time::SystemTime::now());
    format!("{}s", now.saturating_sub(since))
}

/// The decision for the request `query` describes, step by step.
pub fn explain(config: &crate::Config, state: &MeshState, query: &str) -> Result<Value, String> {
    let a = ask(query)?;
    let mut steps = Vec::new();
    let (name, port) = crate::outbound::split_host(&a.host);
    let source = json!({
        "workload": config.workload.to_string(),
        "cluster": config.cluster,
        "locality": config.locality.to_string(),
    });
    let Some(svc) = state.resolve(name).cloned() else {
        let what = if state.allow_any {
            "no mesh service has this name; under ALLOW_ANY the request passes through to the address the name resolves to"
        } else {
            "no mesh service has this name; under REGISTRY_ONLY the request is refused (502)"
        };
        steps.push(json!({"step": "name", "result": format!("{name}: {what}")}));
        return Ok(
            json!({"source": source, "request": request(&a), "steps": steps, "choice": null}),
        );
    };
    let key = format!("{}/{}", svc.namespace, svc.name);
    steps.push(json!({"step": "name", "result": format!("{name} is service {key}")}));
    let Some(svc_port) = svc.port(port).cloned() else {
        steps.push(json!({"step": "port", "result": format!("{key} has no port {}", port.map_or("(default)".into(), |p| p.to_string()))}));
        return Ok(
            json!({"source": source, "request": request(&a), "steps": steps, "choice": null}),
        );
    };
    steps.push(json!({"step": "registry", "result": registry(state, &svc)}));

    // The route, as the outbound path chooses it.
    let mut dest = svc.clone();
    let mut dest_port = svc_port.port;
    let mut subset = None;
    let view = RequestView {
        path: a.path.split('?').next().unwrap_or("/"),
        query: a.path.split_once('?').map(|(_, q)| q).unwrap_or_default(),
        method: &a.method,
        authority: &a.host,
        port: svc_port.port,
        headers: &a.headers,
        source_labels: &state.own_labels,
    };
    match svc.routing.as_deref().and_then(|r| r.select(&view)) {
        None => steps.push(json!({"step": "route", "result": format!("no VirtualService route of {key} applies: the service itself, port {}", svc_port.port)})),
        Some((r, _)) => {
            let spec = &r.spec;
            let name = if spec.name.is_empty() { "(unnamed)" } else { &spec.name };
            let mut result = json!({"route": name, "timeout_ms": spec.timeout_ms, "retries": spec.retries, "fault": spec.fault.is_some()});
            match &spec.action {
                RouteAction::DirectResponse { status, .. } => {
                    result["action"] = json!(format!("direct response {status}: nothing is sent"));
                    steps.push(json!({"step": "route", "result": result}));
                    return Ok(json!({"source": source, "request": request(&a), "steps": steps, "choice": null}));
                }
                RouteAction::Redirect { code, .. } => {
                    result["action"] = json!(format!("redirect {code}: nothing is sent"));
                    steps.push(json!({"step": "route", "result": result}));
                    return Ok(json!({"source": source, "request": request(&a), "steps": steps, "choice": null}));
                }
                RouteAction::Route(dests) => {
                    result["destinations"] = json!(dests);
                    if let Some(d) = pick_weighted(dests) {
                        match state.services.get(&d.service) {
                            Some(s) => {
                                dest = s.clone();
                                dest_port = d.port.unwrap_or(svc_port.port);
                                subset = d.subset.clone();
                                result["action"] = json!(format!("to {}{} (by weight)", d.service, d.subset.as_deref().map(|s| format!(" subset {s}")).unwrap_or_default()));
                            }
                            None => {
                                result["action"] = json!(format!("to {}, which does not exist: 503", d.service));
                                steps.push(json!({"step": "route", "result": result}));
                                return Ok(json!({"source": source, "request": request(&a), "steps": steps, "choice": null}));
                            }
                        }
                    }
                }
            }
            steps.push(json!({"step": "route", "result": result}));
        }
    }

    let plan = crate::attempt::Plan {
        svc: dest.clone(),
        authority: svc_port.authority.clone(),
        subset,
        retry: crate::attempt::RetryPolicy::default_policy(),
        hash: None,
        own_labels: state.own_labels.clone(),
        port: dest_port,
    };
    let sel = plan.selection();
    steps.push(json!({"step": "policy", "result": {
        "service": format!("{}/{}", dest.namespace, dest.name),
        "subset": plan.subset,
        "subset_labels": sel.labels,
        "traffic_policy": plan.state().map(|s| serde_json::to_value(&s.policy).unwrap_or_default()),
        "mesh_failover": state.mesh.failover,
    }}));
    let candidates = lb::explain(&dest, &config.locality, &state.mesh, sel);
    steps.push(json!({"step": "candidates", "result": candidates}));
    let choice = lb::pick(&dest, &config.locality, &state.mesh, &[], sel).map(|t| match t {
        Target::Local { address, identity, .. } => json!({"kind": "endpoint", "address": address.to_string(), "identity": identity.to_string()}),
        Target::Remote { cluster, .. } => json!({
            "kind": "cluster",
            "cluster": &*cluster,
            "via_gateway": state.mesh.gateway.as_ref().map(|g| g.0.to_string()),
        }),
    });
    let why = why(&candidates, &choice);
    Ok(
        json!({"source": source, "request": request(&a), "steps": steps, "choice": choice, "why": why}),
    )
}

fn request(a: &Ask) -> Value {
    json!({"host": a.host, "path": a.path, "method": a.method})
}

/// The registry entry: this cluster's endpoints, and every other cluster that exports the
/// service with how current its entry is.
fn registry(state: &MeshState, svc: &crate::state::Service) -> Value {
    let remote: Vec<Value> = svc
        .remote
        .iter()
        .map(|r| {
            let freshness = match state.mesh.stale_since(&r.cluster) {
                Some(since) => format!("stale for {} (kept from the last registry)", ago(since)),
                None => "current".to_owned(),
            };
            json!({"cluster": &*r.cluster, "locality": r.locality.to_string(), "entry": freshness})
        })
        .collect();
    let by_locality: BTreeMap<String, usize> =
        svc.endpoints.iter().fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e.locality.to_string()).or_default() += 1;
            m
        });
    json!({
        "local_endpoints": svc.endpoints.len(),
        "local_by_locality": by_locality,
        "exported_by": remote,
    })
}

/// Why the choice, in one sentence.
fn why(candidates: &[lb::CandidateView], choice: &Option<Value>) -> String {
    let Some(choice) = choice else {
        return "nothing to send to: no endpoint here and no other cluster exports it".into();
    };
    let chosen_tier = candidates
        .iter()
        .find(|c| {
            (c.kind == "cluster" && choice["cluster"] == c.name.as_str())
                || (c.kind == "endpoint"
                    && c.name.ends_with(choice["address"].as_str().unwrap_or("?")))
        })
        .map(|c| c.tier);
    let skipped: Vec<String> = candidates
        .iter()
        .filter(|c| Some(c.tier) < chosen_tier || c.out.is_some())
        .filter_map(|c| {
            c.out
                .as_ref()
                .map(|o| format!("{} {} is out ({o})", c.kind, c.name))
        })
        .collect();
    match (chosen_tier, skipped.is_empty()) {
        (Some(t), true) => format!("tier {t} is the nearest with a usable candidate"),
        (Some(t), false) => format!(
            "tier {t} is the nearest with a usable candidate: {}",
            skipped.join("; ")
        ),
        (None, _) => "every candidate is out; the least bad is tried".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_host_path_method_and_headers() {
        let a = ask("host=echo.demo%3A80&path=%2Fa%3Fb%3D1&method=post&header=x-user%3A%20alice")
            .expect("ask");
        assert_eq!(a.host, "echo.demo:80");
        assert_eq!(a.path, "/a?b=1");
        assert_eq!(a.method, "POST");
        assert_eq!(a.headers["x-user"], "alice");
        assert!(ask("path=/").is_err_and(|e| e.contains("give the host")));
        assert!(ask("host=a&colour=red").is_err_and(|e| e.contains("unknown parameter `colour`")));
        assert!(ask("host=a&header=nocolon").is_err_and(|e| e.contains("not name:value")));
    }
}
