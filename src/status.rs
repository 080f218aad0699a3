//! `isthmus status`: every proxy connected to a cluster's controller and whether it holds
//! the config the controller last pushed, per resource type, as `istioctl proxy-status`
//! shows for Istio. Read from the controller's `/config_dump` (its `proxies` and `config`
//! sections) on its admin listener.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// The columns, by the resource types proxies subscribe to.
const TYPES: [(&str, &str); 4] = [
    ("isthmus.io/Mesh", "MESH"),
    ("isthmus.io/Service", "SERVICE"),
    ("isthmus.io/Workload", "WORKLOAD"),
    ("isthmus.io/Peer", "PEER"),
];

/// Fetches the controller's dump at `admin` and renders the table.
pub async fn report(admin: SocketAddr) -> anyhow::Result<String> {
    let reply = crate::client::AppClient::new()
        .send(admin, &admin.to_string(), "/config_dump", false, &[])
        .await
        .map_err(|e| anyhow::anyhow!("the controller's admin listener at {admin}: {e}"))?;
    anyhow::ensure!(
        reply.status == 200,
        "{admin}/config_dump answered {}",
        reply.status
    );
    let dump: serde_json::Value = serde_json::from_slice(&reply.body)
        .map_err(|e| anyhow::anyhow!("{admin}/config_dump is not JSON: {e}"))?;
    Ok(render(&dump, SystemTime::now()))
}

fn ago(unix: Option<u64>, now: SystemTime) -> String {
    let Some(then) = unix else {
        return "-".into();
    };
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    span(now.saturating_sub(then))
}

/// How far ahead `unix` is.
fn ahead(unix: Option<u64>, now: SystemTime) -> String {
    let Some(then) = unix else {
        return "-".into();
    };
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    span(then.saturating_sub(now))
}

fn span(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// The table of a controller's dump.
pub fn render(dump: &serde_json::Value, now: SystemTime) -> String {
    let mut out = String::new();
    let proxies = dump["proxies"].as_array().cloned().unwrap_or_default();
    let config = &dump["config"];
    let _ = writeln!(
        out,
        "cluster {}: {} proxies connected; config sets accepted {}, rejected {}",
        dump["cluster"].as_str().unwrap_or("?"),
        proxies.len(),
        config["accepted"],
        config["rejected"],
    );
    // How fresh the cross-cluster entries are.
    let fed = &dump["federation"];
    match fed["connected"].as_bool() {
        Some(true) => {
            let _ = writeln!(
                out,
                "federation: connected for {}; last registry update {} ago",
                ago(fed["since_unix"].as_u64(), now),
                ago(fed["last_update_unix"].as_u64(), now),
            );
        }
        Some(false) => {
            let _ = writeln!(
                out,
                "federation: unreachable; other clusters' entries stale since {} ago (serving the last global registry)",
                ago(fed["stale_since_unix"].as_u64(), now),
            );
        }
        None => {}
    }
    // How long this cluster issues certificates, with or without the federation.
    let ca = &dump["ca"];
    if ca.is_object() {
        let _ = writeln!(
            out,
            "cluster CA {}: issues for {} more (until it expires, even without the federation); renewed in place in {}",
            ca["fingerprint"].as_str().unwrap_or("?"),
            ahead(ca["issues_until_unix"].as_u64(), now),
            ahead(ca["renew_at_unix"].as_u64(), now),
        );
    }
    // Clusters the federation keeps but no longer hears from.
    if let Some(stale) = fed["clusters_stale_since_unix"].as_object() {
        for (cluster, since) in stale {
            let _ = writeln!(
                out,
                "cluster {cluster}: not reporting to the federation; its entries stale since {} ago",
                ago(since.as_u64(), now),
            );
        }
    }
    let mut rows = vec![{
        let mut h = vec!["NAME".to_owned(), "ROLE".into(), "CONNECTED".into()];
        h.extend(TYPES.iter().map(|(_, c)| (*c).to_owned()));
        h.push("LAST ACK".into());
        h
    }];
    let mut nacks = Vec::new();
    let mut sorted = proxies;
    sorted.sort_by_key(|p| (p["role"].to_string(), p["name"].to_string()));
    for p in &sorted {
        let name = p["name"].as_str().unwrap_or("?");
        let mut row = vec![
            name.to_owned(),
            p["role"].as_str().unwrap_or("?").to_owned(),
            ago(p["connected_unix"].as_u64(), now),
        ];
        let mut last_ack = None::<u64>;
        for (t, _) in TYPES {
            let s = &p["types"][t];
            row.push(s["state"].as_str().unwrap_or("-").to_owned());
            if let Some(a) = s["last_ack_unix"].as_u64() {
                last_ack = Some(last_ack.map_or(a, |l| l.max(a)));
            }
            if let Some(reason) = s["nack"].as_str() {
                nacks.push(format!("{name} rejected {t}: {reason}"));
            }
        }
        row.push(match last_ack {
            Some(_) => format!("{} ago", ago(last_ack, now)),
            None => "-".into(),
        });
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for n in nacks {
        let _ = writeln!(out, "{n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_each_proxy_with_its_state_per_type_and_nack_reasons() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let dump = serde_json::json!({
            "cluster": "east",
            "config": {"accepted": 3, "rejected": 1},
            "proxies": [
                {"name": "demo/echo-0", "role": "sidecar", "connected_unix": 900,
                 "types": {"isthmus.io/Service": {"state": "SYNCED", "last_ack_unix": 990},
                           "isthmus.io/Mesh": {"state": "NACK", "nack": "port 0"}}},
                {"name": "spiffe://td/ns/isthmus-system/sa/isthmus-gateway", "role": "gateway",
                 "connected_unix": 10, "types": {"isthmus.io/Peer": {"state": "STALE"}}},
            ],
        });
        let table = render(&dump, now);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("east: 2 proxies"), "{table}");
        assert!(lines[1].starts_with("NAME"), "{table}");
        assert!(
            lines[2].contains("gateway") && lines[2].contains("16m") && lines[2].contains("STALE"),
            "{table}"
        );
        let echo = lines[3];
        assert!(echo.starts_with("demo/echo-0"), "{table}");
        assert!(
            echo.contains("NACK") && echo.contains("SYNCED") && echo.contains("10s ago"),
            "{table}"
        );
        assert!(
            table.contains("demo/echo-0 rejected isthmus.io/Mesh: port 0"),
            "{table}"
        );
    }

    #[test]
    fn the_federation_line_says_since_when_other_clusters_are_stale() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let down = serde_json::json!({"cluster": "east", "config": {}, "proxies": [],
            "federation": {"connected": false, "since_unix": 925, "stale_since_unix": 925}});
        let table = render(&down, now);
        assert!(
            table.contains("federation: unreachable; other clusters' entries stale since 75s ago"),
            "{table}"
        );
        let up = serde_json::json!({"cluster": "east", "config": {}, "proxies": [],
            "federation": {"connected": true, "since_unix": 400, "last_update_unix": 998,
                "clusters_stale_since_unix": {"west": 990}},
            "ca": {"fingerprint": "0123456789ab", "issues_until_unix": 8200, "renew_at_unix": 4600}});
        let table = render(&up, now);
        assert!(
            table.contains("federation: connected for 10m; last registry update 2s ago"),
            "{table}"
        );
        assert!(
            table.contains(
                "cluster west: not reporting to the federation; its entries stale since 10s ago"
            ),
            "{table}"
        );
        assert!(
            table.contains("cluster CA 0123456789ab: issues for 2h more (until it expires, even without the federation); renewed in place in 60m"),
            "{table}"
        );
    }
}
