//! Active health checks (the HealthCheck kind): an endpoint's own sidecar probes its app,
//! and an endpoint that fails is taken out for every caller, in its cluster and in the
//! others, before a request to it fails; it comes back after the healthy threshold.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus::client::AppClient;
use isthmus_tests::{config_dump, eventually, metric_sum, Mesh, APP_PORT};

const HOST: &str = "echo.demo.svc.cluster.local";

/// A HealthCheck of `echo` that decides in well under a second: probes every 200 ms (up to
/// 50 ms later), two failures out, three successes back.
fn health_check_yaml(probe: &str) -> String {
    format!("apiVersion: isthmus.io/v1alpha1\nkind: HealthCheck\nmetadata: {{name: echo-health, namespace: demo}}\nspec:\n  targetRef: {{kind: Service, name: echo}}\n{probe}  interval: 200ms\n  intervalJitter: 50ms\n  timeout: 150ms\n  unhealthyThreshold: 2\n  healthyThreshold: 3\n")
}

/// Answers as they come, one request at a time: (when, answering workload or the failure).
type Log = Arc<Mutex<Vec<(Instant, Result<String, String>)>>>;

fn steady(outbound: SocketAddr, log: Log) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = AppClient::new();
        loop {
            let landed = match client.get(outbound, HOST, "/").await {
                Ok(r) if r.status == 200 => r
                    .answer()
                    .map(|a| format!("{}/{}", a.cluster, a.workload))
                    .map_err(|e| e.to_string()),
                Ok(r) => Err(format!(
                    "status {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body).trim()
                )),
                Err(e) => Err(format!("{e:#}")),
            };
            log.lock().expect("log").push((Instant::now(), landed));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

fn answered_since(log: &Log, since: Instant) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for (at, landed) in log.lock().expect("log").iter() {
        if *at >= since {
            let key = landed.clone().unwrap_or_else(|e| format!("FAILED: {e}"));
            *by.entry(key).or_default() += 1;
        }
    }
    by
}

fn failures(log: &Log) -> Vec<String> {
    log.lock()
        .expect("log")
        .iter()
        .filter_map(|(_, l)| l.clone().err())
        .collect()
}

/// Why `workload` is out of `service` in a sidecar's dump, if it is.
fn unhealthy_because(dump: &serde_json::Value, workload: &str) -> Option<String> {
    dump["services"]
        .as_array()?
        .iter()
        .filter(|s| s["service"] == HOST)
        .flat_map(|s| {
            s["unhealthy_endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|e| e["workload"] == format!("demo/{workload}"))
        .and_then(|e| e["because"].as_str().map(str::to_owned))
}

/// Clusters `echo` has a remote entry for in a sidecar's dump.
fn remote_clusters(dump: &serde_json::Value) -> Vec<String> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == HOST)
        .flat_map(|s| s["remote"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["cluster"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_http_check_is_out_before_a_request_fails_and_back_after_the_threshold(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "echo-b", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.apply(
        "east",
        "health.yaml",
        &health_check_yaml("  http: {path: /healthz}\n"),
    )
    .await?;
    let b_admin = mesh.workload("east", "echo-b").admin();
    let passing = [("service", "demo/echo")];
    eventually(
        "echo-b's check to pass",
        Duration::from_secs(10),
        || async {
            let v = metric_sum(b_admin, "isthmus_sidecar_health_check_passing", &passing).await?;
            anyhow::ensure!(v == 1.0, "passing = {v}");
            Ok(())
        },
    )
    .await?;
    let client_admin = mesh.workload("east", "client").admin();
    let log: Log = Arc::default();
    let sender = steady(mesh.workload("east", "client").outbound(), log.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let both = answered_since(&log, Instant::now() - Duration::from_millis(400));
    assert!(
        both.contains_key("east/echo-a") && both.contains_key("east/echo-b"),
        "both endpoints serve at first: {both:?}"
    );

    // echo-b says it is not serving (as an app about to go away does); it still answers.
    let flipped = Instant::now();
    mesh.workload("east", "echo-b")
        .app
        .as_ref()
        .expect("app")
        .set_serving(false);
    let because = eventually(
        "the client's sidecar to take echo-b out",
        Duration::from_secs(5),
        || async {
            unhealthy_because(&config_dump(client_admin).await?, "echo-b")
                .ok_or_else(|| anyhow::anyhow!("echo-b is still in"))
        },
    )
    .await?;
    let out_after = flipped.elapsed();
    eprintln!("echo-b out {out_after:?} after it stopped serving: {because}");
    assert!(
        because.contains("failing its health check: HTTP 503 from GET /healthz"),
        "{because}"
    );
    // Two failed probes 200-250 ms apart, then a report and a push (about 0.5 s; a loaded
    // CI machine gets room).
    assert!(
        out_after < Duration::from_secs(3),
        "echo-b out after {out_after:?}"
    );
    let failed = metric_sum(
        b_admin,
        "isthmus_sidecar_health_checks_total",
        &[("service", "demo/echo"), ("result", "failure")],
    )
    .await?;
    assert!(
        failed >= 2.0,
        "echo-b's sidecar counted {failed} failed probes"
    );
    assert_eq!(
        metric_sum(b_admin, "isthmus_sidecar_health_check_passing", &passing).await?,
        0.0
    );
    let controller = config_dump(mesh.controller_admin("east")).await?;
    let listed = controller["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["workload"] == "demo/echo-b")
        .expect("echo-b in the controller's dump");
    assert_eq!(listed["healthy"], false, "{listed}");

    // Out: nothing reaches echo-b, and its app may now die without a request failing.
    let out = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.workload("east", "echo-b")
        .app
        .take()
        .expect("app")
        .abort();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let while_out = answered_since(&log, out);
    assert_eq!(
        while_out.keys().collect::<Vec<_>>(),
        vec!["east/echo-a"],
        "only echo-a answers while echo-b is out: {while_out:?}"
    );

    // A healthy app again on echo-b's address: back after three passing probes.
    let ip = mesh.workload("east", "echo-b").ip;
    let app = isthmus::echo::build(isthmus::echo::Config {
        listen: SocketAddr::new(ip.into(), APP_PORT),
        cluster: "east".into(),
        workload: "echo-b".into(),
        tcp_listen: None,
    })
    .await?;
    let restarted = Instant::now();
    mesh.workload("east", "echo-b").app = Some(app);
    eventually("echo-b to serve again", Duration::from_secs(5), || async {
        let seen = answered_since(&log, restarted);
        anyhow::ensure!(seen.contains_key("east/echo-b"), "{seen:?}");
        Ok(())
    })
    .await?;
    let back_after = restarted.elapsed();
    eprintln!("echo-b back {back_after:?} after its app served again");
    // Three passes in a row at 200-250 ms (plus the app probe's second): not at once.
    assert!(
        back_after >= Duration::from_millis(400),
        "echo-b was back after {back_after:?}, before its healthy threshold"
    );
    assert!(
        unhealthy_because(&config_dump(client_admin).await?, "echo-b").is_none(),
        "echo-b is listed healthy again"
    );
    sender.abort();
    let failed = failures(&log);
    assert!(failed.is_empty(), "no request failed: {failed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_check_reading_not_serving_takes_an_endpoint_out_in_every_cluster(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let yaml = health_check_yaml("  port: grpc\n  grpc: {service: isthmus.echo.v1.Echo}\n");
    mesh.apply("east", "health.yaml", &yaml).await?;
    mesh.apply("west", "health.yaml", &yaml).await?;
    let client_admin = mesh.workload("east", "client").admin();
    eventually(
        "east to see echo in west",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(remote_clusters(&dump) == ["west"], "{dump}");
            Ok(())
        },
    )
    .await?;
    let log: Log = Arc::default();
    let sender = steady(mesh.workload("east", "client").outbound(), log.clone());

    // West's only endpoint reads NOT_SERVING: west's controller takes it out, its export
    // counts no healthy endpoint, and east stops seeing echo in west. No sidecar of east
    // probes west's endpoint.
    mesh.workload("west", "echo-west")
        .app
        .as_ref()
        .expect("app")
        .set_serving(false);
    let west_admin = mesh.controller_admin("west");
    let because = eventually(
        "west's controller to take echo-west out",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(west_admin).await?;
            dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .find(|e| e["workload"] == "demo/echo-west" && e["healthy"] == false)
                .and_then(|e| e["unhealthy_because"].as_str().map(str::to_owned))
                .ok_or_else(|| anyhow::anyhow!("echo-west is still in"))
        },
    )
    .await?;
    assert!(
        because.contains("grpc.health.v1 says `isthmus.echo.v1.Echo` is NOT_SERVING"),
        "{because}"
    );
    eventually(
        "east to stop seeing echo in west",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(remote_clusters(&dump).is_empty(), "{dump}");
            Ok(())
        },
    )
    .await?;

    // West serves again and east's own endpoint goes NOT_SERVING: east's traffic moves to
    // west with no failed request.
    mesh.workload("west", "echo-west")
        .app
        .as_ref()
        .expect("app")
        .set_serving(true);
    eventually(
        "east to see echo in west again",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(remote_clusters(&dump) == ["west"], "{dump}");
            Ok(())
        },
    )
    .await?;
    mesh.workload("east", "echo-east")
        .app
        .as_ref()
        .expect("app")
        .set_serving(false);
    let flipped = Instant::now();
    eventually(
        "east's traffic to move to west",
        Duration::from_secs(5),
        || async {
            let last = answered_since(&log, Instant::now() - Duration::from_millis(300));
            anyhow::ensure!(
                last.keys().collect::<Vec<_>>() == ["west/echo-west"],
                "{last:?}"
            );
            Ok(())
        },
    )
    .await?;
    eprintln!(
        "east's traffic in west {:?} after echo-east stopped serving",
        flipped.elapsed()
    );
    assert!(flipped.elapsed() < Duration::from_secs(4));
    // `isthmus explain` says why east's own endpoint is not a candidate.
    let req = isthmus::explain::Request {
        host: HOST,
        path: "/",
        method: "GET",
        headers: &[],
    };
    let text = isthmus::explain::render(&isthmus::explain::fetch(client_admin, &req).await?);
    assert!(
        text.contains("demo/echo-east") && text.contains("its controller reports it unhealthy (failing its health check: grpc.health.v1 says `isthmus.echo.v1.Echo` is NOT_SERVING)"),
        "{text}"
    );
    sender.abort();
    let failed = failures(&log);
    assert!(failed.is_empty(), "no request failed: {failed:?}");
    Ok(())
}
