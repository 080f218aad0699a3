//! `isthmus explain`: how a workload's sidecar would route a request, step by step with
//! each reason, read from the sidecar's `/explain` (its live config and health).

use std::fmt::Write;
use std::net::SocketAddr;

use serde_json::Value;

/// The request to explain.
pub struct Request<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    /// `name:value` each.
    pub headers: &'a [String],
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks the sidecar at `admin`; returns its answer as JSON.
pub async fn fetch(admin: SocketAddr, req: &Request<'_>) -> anyhow::Result<Value> {
    let mut query = format!(
        "/explain?host={}&path={}&method={}",
        encode(req.host),
        encode(req.path),
        encode(req.method)
    );
    for h in req.headers {
        let _ = write!(query, "&header={}", encode(h));
    }
    let reply = crate::client::AppClient::new()
        .send(admin, &admin.to_string(), &query, false, &[])
        .await
        .map_err(|e| anyhow::anyhow!("the sidecar's admin listener at {admin}: {e}"))?;
    anyhow::ensure!(
        reply.status == 200,
        "{admin}/explain answered {}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body).trim()
    );
    serde_json::from_slice(&reply.body)
        .map_err(|e| anyhow::anyhow!("{admin}/explain is not JSON: {e}"))
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The answer as people read it: one numbered step per line, the candidates as a table,
/// then the choice and why.
pub fn render(e: &Value) -> String {
    let mut out = String::new();
    let (src, req) = (&e["source"], &e["request"]);
    let _ = writeln!(
        out,
        "{} {}{} from {} (cluster {}, {})",
        str_of(&req["method"]),
        str_of(&req["host"]),
        str_of(&req["path"]),
        str_of(&src["workload"]),
        str_of(&src["cluster"]),
        str_of(&src["locality"]),
    );
    for (i, step) in e["steps"].as_array().into_iter().flatten().enumerate() {
        let n = i + 1;
        let r = &step["result"];
        match step["step"].as_str().unwrap_or("?") {
            "registry" => {
                let _ = writeln!(
                    out,
                    "{n}. registry: {} endpoints in this cluster {}",
                    r["local_endpoints"], r["local_by_locality"]
                );
                for c in r["exported_by"].as_array().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "     exported by {} ({}): entry {}",
                        str_of(&c["cluster"]),
                        str_of(&c["locality"]),
                        str_of(&c["entry"])
                    );
                }
            }
            "route" if r.is_object() => {
                let _ = writeln!(
                    out,
                    "{n}. route: {} -> {} (timeout {} ms, retries {}, fault {})",
                    str_of(&r["route"]),
                    str_of(&r["action"]),
                    str_of(&r["timeout_ms"]),
                    str_of(&r["retries"]),
                    r["fault"]
                );
            }
            "policy" => {
                let policy = match &r["traffic_policy"] {
                    Value::Null => {
                        "no DestinationRule: round robin, passive health checks".to_owned()
                    }
                    p => p.to_string(),
                };
                let _ = writeln!(
                    out,
                    "{n}. policy: {}{}: {policy}; mesh failover {}",
                    str_of(&r["service"]),
                    r["subset"]
                        .as_str()
                        .map(|s| format!(" subset {s}"))
                        .unwrap_or_default(),
                    r["mesh_failover"]
                );
            }
            "candidates" => {
                let _ = writeln!(out, "{n}. candidates, nearest tier first:");
                for c in r.as_array().into_iter().flatten() {
                    let _ = writeln!(
                        out,
                        "     tier {}  {} {} ({}): {}",
                        c["tier"],
                        str_of(&c["kind"]),
                        str_of(&c["name"]),
                        str_of(&c["locality"]),
                        c["out"]
                            .as_str()
                            .map(|o| format!("OUT, {o}"))
                            .unwrap_or_else(|| "usable".into())
                    );
                }
            }
            name => {
                let _ = writeln!(out, "{n}. {name}: {}", str_of(r));
            }
        }
    }
    let choice = &e["choice"];
    let what = match choice["kind"].as_str() {
        Some("cluster") => format!(
            "cluster {} through the gateway at {}",
            str_of(&choice["cluster"]),
            str_of(&choice["via_gateway"])
        ),
        Some(_) => format!(
            "endpoint {} ({})",
            str_of(&choice["address"]),
            str_of(&choice["identity"])
        ),
        None => "nothing is sent".into(),
    };
    let _ = writeln!(out, "choice: {what}");
    if let Some(why) = e["why"].as_str() {
        let _ = writeln!(out, "because {why}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_reads_as_numbered_steps_with_the_choice_and_why() {
        let e = serde_json::json!({
            "source": {"workload": "demo/client", "cluster": "east", "locality": "us-east/zone-a"},
            "request": {"host": "echo.demo.svc.cluster.local", "path": "/", "method": "GET"},
            "steps": [
                {"step": "name", "result": "echo.demo.svc.cluster.local is service demo/echo"},
                {"step": "registry", "result": {"local_endpoints": 0, "local_by_locality": {},
                    "exported_by": [{"cluster": "west", "locality": "us-west/zone-a", "entry": "current"}]}},
                {"step": "candidates", "result": [
                    {"tier": 0, "kind": "cluster", "name": "west", "locality": "us-west/zone-a",
                     "out": "unreachable for 3s: this cluster's gateway has no live link to west's gateway"},
                    {"tier": 1, "kind": "cluster", "name": "eu", "locality": "eu-central/zone-a", "out": null}]}
            ],
            "choice": {"kind": "cluster", "cluster": "eu", "via_gateway": "127.0.0.9:15008"},
            "why": "tier 1 is the nearest with a usable candidate: cluster west is out (unreachable)"
        });
        let text = render(&e);
        assert!(
            text.starts_with(
                "GET echo.demo.svc.cluster.local/ from demo/client (cluster east, us-east/zone-a)"
            ),
            "{text}"
        );
        assert!(
            text.contains("1. name: echo.demo.svc.cluster.local is service demo/echo"),
            "{text}"
        );
        assert!(
            text.contains("exported by west (us-west/zone-a): entry current"),
            "{text}"
        );
        assert!(
            text.contains("tier 0  cluster west (us-west/zone-a): OUT, unreachable for 3s"),
            "{text}"
        );
        assert!(
            text.contains("choice: cluster eu through the gateway at 127.0.0.9:15008"),
            "{text}"
        );
        assert!(text.contains("because tier 1 is the nearest"), "{text}");
        assert_eq!(encode("a b/c:d"), "a%20b%2Fc%3Ad");
    }
}
