//! Static stability and config safety: traffic keeps flowing while the controller or the
//! federation is down, proxies resync when the controller returns, and a bad config change
//! is rejected with its location while the serving config stays.

use std::time::{Duration, Instant};

use isthmus_tests::{config_dump, eventually, metric_sum, settles_in, traffic, AppClient, Mesh};

const HOST: &str = "echo.demo.svc.cluster.local";

fn endpoint_count(dump: &serde_json::Value) -> usize {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == HOST)
        .and_then(|s| s["endpoints"].as_array())
        .map(Vec::len)
        .unwrap_or(0)
}

/// Waits until the federation reports `cluster`'s controller as connected or not.
async fn federation_sees(
    federation: std::net::SocketAddr,
    cluster: &str,
    connected: bool,
) -> anyhow::Result<()> {
    let want = if connected { 1.0 } else { 0.0 };
    eventually(
        &format!("the federation to see {cluster} connected={connected}"),
        Duration::from_secs(10),
        || async {
            let now = metric_sum(
                federation,
                "isthmus_federation_registry_cluster_connected",
                &[("cluster", cluster)],
            )
            .await?;
            anyhow::ensure!(now == want, "{cluster} connected: {now}");
            Ok(())
        },
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_while_the_controller_is_down_and_proxies_resync_when_it_returns(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-1", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let traffic = traffic(outbound, HOST);

    mesh.kill_controller("east");
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = traffic.since(killed);
    assert!(
        during.len() > 20 && during.iter().all(|e| e.landed.as_deref() == Ok("east")),
        "traffic kept flowing: {} requests",
        during.len()
    );

    // The federation says the cluster's controller is gone, and since when.
    let federation = mesh.federation.as_ref().expect("federation").admin_address;
    let east = [("cluster", "east")];
    federation_sees(federation, "east", false).await?;
    let last_seen = metric_sum(
        federation,
        "isthmus_federation_registry_cluster_last_seen_timestamp_seconds",
        &east,
    )
    .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        (now - 10.0..=now + 1.0).contains(&last_seen),
        "last seen {last_seen}, now {now}"
    );

    mesh.start_controller("east").await?;
    federation_sees(federation, "east", true).await?;
    let admin = mesh.controller_admin("east");
    eventually("proxies to reconnect", Duration::from_secs(10), || async {
        anyhow::ensure!(
            metric_sum(admin, "isthmus_controller_xds_connected_proxies", &[]).await? >= 3.0
        );
        Ok(())
    })
    .await?;
    // A change after the restart reaches the client: it resynced with the new controller.
    mesh.add_workload("east", "echo-2", Some("echo"), "echo")
        .await?;
    let client_admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    eventually(
        "the client to learn the second endpoint",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(endpoint_count(&config_dump(client_admin).await?) == 2);
            Ok(())
        },
    )
    .await?;
    assert_eq!(traffic.failures(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_cluster_traffic_and_failover_work_while_the_federation_is_down() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client_admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    eventually(
        "the client to learn west",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(client_admin).await?;
            let remote = dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["service"] == HOST)
                .and_then(|s| s["remote"].as_array())
                .map(Vec::len);
            anyhow::ensure!(remote == Some(1));
            Ok(())
        },
    )
    .await?;
    isthmus_tests::reachable(outbound, HOST).await?;
    let traffic = traffic(outbound, HOST);
    settles_in(&traffic, "east", 10, Duration::from_secs(5)).await?;

    let west = mesh.controller_admin("west");
    assert_eq!(
        metric_sum(west, "isthmus_controller_federation_connected", &[]).await?,
        1.0
    );
    mesh.kill_federation();
    let lost = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    // Every controller says its cross-cluster entries are stale, and since when.
    eventually(
        "west to see the federation gone",
        Duration::from_secs(5),
        || async {
            let fed = config_dump(west).await?["federation"].clone();
            anyhow::ensure!(fed["connected"] == false, "{fed}");
            let since = fed["stale_since_unix"].as_u64().unwrap_or(0);
            anyhow::ensure!(since + 1 >= lost.as_secs(), "stale since {since}: {fed}");
            anyhow::ensure!(fed["last_update_unix"].as_u64().is_some(), "{fed}");
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        metric_sum(west, "isthmus_controller_federation_connected", &[]).await?,
        0.0
    );
    // Even a controller restarted while the federation is away serves the last registry;
    // it says it has had no update since it started.
    mesh.kill_controller("east");
    mesh.start_controller("east").await?;
    let fed = config_dump(mesh.controller_admin("east")).await?["federation"].clone();
    assert!(
        fed["connected"] == false && fed["last_update_unix"].is_null(),
        "{fed}"
    );
    mesh.kill_workload("east", "echo-east");
    settles_in(&traffic, "west", 30, Duration::from_secs(10)).await?;
    assert_eq!(traffic.failures(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_rejected_with_its_location_and_traffic_keeps_flowing(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-1", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let traffic = traffic(outbound, HOST);
    let admin = mesh.controller_admin("east");
    let config_dir = mesh.cluster("east").config_dir.clone();
    let service_file = config_dir.join("service-echo.yaml");
    let good = std::fs::read_to_string(&service_file)?;

    // Each fault replaces the service's own file: accepted, it would take echo away.
    let faults = [
        (
            "syntax",
            "apiVersion: v1\nkind: Service\nmetadata: {name: echo\n",
            "IST1001",
            "",
        ),
        (
            "unknown field",
            &good.replacen("selector:", "selectr:", 1),
            "IST0106",
            "spec.selectr",
        ),
        (
            "port out of range",
            &good.replacen("port: 80,", "port: 80000,", 1),
            "IST0106",
            "spec.ports[0].port",
        ),
        (
            "an Istio kind not read yet",
            &good.replacen(
                "apiVersion: v1\nkind: Service",
                "apiVersion: networking.istio.io/v1\nkind: Gateway",
                1,
            ),
            "IST1002",
            "kind",
        ),
    ];
    for (i, (what, yaml, code, field)) in faults.iter().enumerate() {
        std::fs::write(&service_file, yaml)?;
        let errors = eventually(
            &format!("{what} to be rejected"),
            Duration::from_secs(5),
            || async {
                let dump = config_dump(admin).await?;
                anyhow::ensure!(dump["config"]["rejected"].as_u64() == Some(i as u64 + 1));
                Ok(dump["config"]["last_errors"].clone())
            },
        )
        .await?;
        let first = errors[0].as_str().unwrap_or_default().to_owned();
        assert!(
            first.contains("service-echo.yaml") && first.contains(code) && first.contains(field),
            "{what}: {first}"
        );
        // The same fault, counted by its code for dashboards and alerts.
        let code = code.trim_matches(|c| c == '[' || c == ']');
        let faults = metric_sum(
            admin,
            "isthmus_controller_config_faults",
            &[("code", code), ("severity", "error")],
        )
        .await?;
        assert!(faults >= 1.0, "{what}: {faults} faults of {code}");
    }
    let reply = AppClient::new().get(outbound, HOST, "/").await?;
    assert_eq!(reply.status, 200, "the serving config stayed");

    std::fs::write(&service_file, &good)?;
    eventually(
        "the fixed config to be accepted",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(config_dump(admin).await?["config"]["last_errors"].is_null());
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        metric_sum(
            admin,
            "isthmus_controller_config_faults",
            &[("severity", "error")]
        )
        .await?,
        0.0,
        "no fault keeps an object out any more"
    );
    assert_eq!(traffic.failures(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yaml_change_reaches_proxies_in_this_and_other_clusters() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let client_admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let service = |dump: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == format!("{name}.demo.svc.cluster.local"))
            .cloned()
    };

    // In this cluster: a new Service and WorkloadEntry in the config folder.
    let east_dir = mesh.cluster("east").config_dir.clone();
    let written = std::time::Instant::now();
    std::fs::write(
        east_dir.join("local.yaml"),
        format!(
            "{}---\n{}",
            isthmus_tests::service_yaml("local"),
            isthmus_tests::workload_yaml(
                "local-1",
                "local",
                "127.0.0.99".parse()?,
                &isthmus_tests::locality_of("east"),
                "local"
            )
        ),
    )?;
    eventually(
        "the local service to reach the client",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(
                service(&dump, "local").and_then(|s| s["endpoints"].as_array().map(Vec::len))
                    == Some(1)
            );
            Ok(())
        },
    )
    .await?;
    let local = written.elapsed();

    // In another cluster: an exported service goes through the federation.
    let west_dir = mesh.cluster("west").config_dir.clone();
    let written = std::time::Instant::now();
    std::fs::write(
        west_dir.join("remote.yaml"),
        format!(
            "{}---\n{}",
            isthmus_tests::service_yaml("remote"),
            isthmus_tests::workload_yaml(
                "remote-1",
                "remote",
                "127.0.0.98".parse()?,
                &isthmus_tests::locality_of("west"),
                "remote"
            )
        ),
    )?;
    eventually(
        "west's export to reach the client in east",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(
                service(&dump, "remote").and_then(|s| s["remote"].as_array().map(Vec::len))
                    == Some(1)
            );
            Ok(())
        },
    )
    .await?;
    let remote = written.elapsed();
    println!("config propagation: same cluster {local:?}, across clusters {remote:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_federation_loses_no_cluster_and_marks_silent_ones_stale() -> anyhow::Result<()>
{
    let (mut mesh, _, traffic) = Mesh::with_traffic_from_east(&["east", "west"], &["west"]).await?;

    // West's controller stays away, so west cannot report after the federation restarts;
    // east's controller reconnects and receives what the federation publishes.
    mesh.kill_controller("west");
    mesh.kill_federation();
    mesh.start_federation().await?;
    let admin = mesh.federation.as_ref().expect("federation").admin_address;
    eventually(
        "east to report and west to be kept as stale",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(admin).await?;
            anyhow::ensure!(
                dump["stale_clusters"] == serde_json::json!(["west"]),
                "{}",
                dump["stale_clusters"]
            );
            let echo = dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["service"] == "demo/echo")
                .map(|s| s["clusters"].clone());
            anyhow::ensure!(
                echo.as_ref().and_then(|c| c.as_array()).map(Vec::len) == Some(1),
                "echo: {echo:?}"
            );
            Ok(())
        },
    )
    .await?;
    let stale =
        isthmus_tests::metric_sum(admin, "isthmus_federation_registry_stale_clusters", &[]).await?;
    assert_eq!(stale, 1.0);
    // Per cluster: west is stale and not connected, east connected and confirmed.
    let of = |metric: &'static str, cluster: &'static str| async move {
        isthmus_tests::metric_sum(admin, metric, &[("cluster", cluster)]).await
    };
    assert_eq!(
        of("isthmus_federation_registry_cluster_stale", "west").await?,
        1.0
    );
    assert_eq!(
        of("isthmus_federation_registry_cluster_stale", "east").await?,
        0.0
    );
    assert_eq!(
        of("isthmus_federation_registry_cluster_connected", "east").await?,
        1.0
    );
    assert_eq!(
        of("isthmus_federation_registry_cluster_connected", "west").await?,
        0.0
    );
    let clusters = config_dump(admin).await?["clusters"].clone();
    let west = clusters
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["cluster"] == "west")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&west["stale"], &west["connected"], &west["last_seen"]),
        (
            &serde_json::json!(true),
            &serde_json::json!(false),
            &serde_json::Value::Null
        ),
        "west was not heard from since the restart: {clusters}"
    );
    // East has had the restarted federation's registry for a while: traffic to west never
    // stopped.
    let watched = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = traffic.since(watched);
    assert!(since.len() > 20, "traffic flowed: {}", since.len());
    assert!(since.iter().all(|e| e.landed.as_deref() == Ok("west")));
    assert_eq!(traffic.failures(), Vec::<String>::new());

    mesh.start_controller("west").await?;
    eventually("west to report again", Duration::from_secs(10), || async {
        let dump = config_dump(admin).await?;
        anyhow::ensure!(dump["stale_clusters"] == serde_json::json!([]));
        anyhow::ensure!(
            of("isthmus_federation_registry_cluster_stale", "west").await? == 0.0
                && of("isthmus_federation_registry_cluster_connected", "west").await? == 1.0
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// A proxy that refuses any Service with a port named `broken`, as a sidecar whose
/// conversion of a resource fails; it records what it applied and what it was sent.
#[derive(Default)]
struct Picky {
    applied: std::sync::Mutex<Vec<String>>,
    offered: std::sync::Mutex<Vec<String>>,
}

impl isthmus_core::xds::XdsHandler for Picky {
    fn apply(
        &self,
        _type_url: &str,
        updated: &[isthmus_proto::discovery::Resource],
        _removed: &[String],
    ) -> Vec<isthmus_core::xds::Rejected> {
        use prost::Message;
        let mut rejected = Vec::new();
        for r in updated {
            self.offered.lock().expect("lock").push(r.name.clone());
            let broken = isthmus_proto::discovery::Service::decode(r.body.as_slice())
                .map(|s| s.ports.iter().any(|p| p.name == "broken"))
                .unwrap_or(true);
            if broken {
                rejected.push(isthmus_core::xds::Rejected::new(&r.name, "port `broken`"));
            } else {
                self.applied.lock().expect("lock").push(r.name.clone());
            }
        }
        rejected
    }
}

fn plain_service(name: &str, port_name: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: {port_name}, port: 80, targetPort: 8080}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_resource_stays_out_until_fixed_while_the_rest_of_its_push_applies(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.apply("east", "good.yaml", &plain_service("good", "http"))
        .await?;
    mesh.apply("east", "flaky.yaml", &plain_service("flaky", "broken"))
        .await?;
    // A real sidecar shows when the controller pushes both, so the picky proxy's first
    // response holds the broken one.
    mesh.add_workload("east", "watcher", None, "watcher")
        .await?;
    let watcher = mesh
        .workload("east", "watcher")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    eventually(
        "the controller to push both services",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(watcher).await?;
            let has = |host: &str| {
                dump["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["service"] == host)
            };
            anyhow::ensure!(
                has("good.demo.svc.cluster.local") && has("flaky.demo.svc.cluster.local")
            );
            Ok(())
        },
    )
    .await?;
    let channel = mesh.controller_channel("east", "picky").await?;
    let readiness = isthmus_core::readiness::Readiness::default();
    let picky = std::sync::Arc::new(Picky::default());
    let client = isthmus_core::xds::XdsClient {
        channel,
        node: isthmus_proto::discovery::Node {
            cluster: "east".into(),
            role: "sidecar".into(),
            workload: "demo/picky".into(),
            ..Default::default()
        },
        types: vec![isthmus_proto::type_url::SERVICE],
        handler: picky.clone(),
        health: None,
        certificate: None,
        peer_links: None,
        demand: None,
        first_config: Some(readiness.register("first config")),
    };
    let task = tokio::spawn(client.run());
    let applied = |name: &str| {
        picky
            .applied
            .lock()
            .expect("lock")
            .iter()
            .any(|n| n == name)
    };
    eventually(
        "the good service to apply",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(applied("demo/good"));
            Ok(())
        },
    )
    .await?;
    let admin = mesh.controller_admin("east");
    eventually(
        "the controller to count the NACK",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(
                metric_sum(admin, "isthmus_controller_xds_nacks_total", &[]).await? >= 1.0
            );
            Ok(())
        },
    )
    .await?;
    assert!(
        !readiness.is_ready(),
        "ready although the first push was NACKed"
    );
    // `isthmus status` shows who holds what: the picky proxy's rejection with its reason,
    // the real sidecar in sync.
    let row = |table: &str, name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    let table = isthmus::status::report(admin).await?;
    assert!(row(&table, "demo/picky").contains("NACK"), "{table}");
    assert!(
        table.contains("demo/picky rejected isthmus.io/Service:"),
        "{table}"
    );
    let watcher_row = row(&table, "demo/watcher");
    assert!(
        watcher_row.contains("SYNCED") && !watcher_row.contains("NACK"),
        "{table}"
    );
    // Another change elsewhere is pushed; the rejected version is not sent again.
    mesh.apply("east", "other.yaml", &plain_service("other", "http"))
        .await?;
    eventually(
        "the next change to apply",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(applied("demo/other"));
            Ok(())
        },
    )
    .await?;
    let offered_flaky = |p: &Picky| {
        p.offered
            .lock()
            .expect("lock")
            .iter()
            .filter(|n| *n == "demo/flaky")
            .count()
    };
    assert_eq!(
        offered_flaky(&picky),
        1,
        "the rejected version was sent again"
    );
    assert!(
        readiness.is_ready(),
        "a response of the type applied whole (ACKed) makes the proxy ready"
    );

    // Fixed in config: the new version goes out, applies, and the proxy is ready.
    mesh.apply("east", "flaky.yaml", &plain_service("flaky", "http"))
        .await?;
    eventually(
        "the fixed service to apply",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(applied("demo/flaky"));
            Ok(())
        },
    )
    .await?;
    assert_eq!(offered_flaky(&picky), 2, "the fixed version, once");
    let synced = eventually(
        "the picky proxy in sync",
        Duration::from_secs(5),
        || async {
            let table = isthmus::status::report(admin).await?;
            let picky = row(&table, "demo/picky");
            anyhow::ensure!(
                picky.contains("SYNCED") && !picky.contains("NACK"),
                "{table}"
            );
            Ok(table)
        },
    )
    .await?;
    assert!(!synced.contains("demo/picky rejected"), "{synced}");
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_goes_away_is_replaced_by_the_one_that_connects() -> anyhow::Result<()> {
    let (mut mesh, _, traffic) = Mesh::with_traffic_from_east(&["east", "west"], &["west"]).await?;
    mesh.kill_gateway("east");
    // The replacement comes up on another address (a new pod).
    mesh.start_gateway_on("east", 3).await?;
    let new_tunnel = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway")
        .tunnel_address
        .to_string();
    let admin = mesh.controller_admin("east");
    eventually(
        "the controller to know only the new gateway",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(admin).await?;
            let tunnels: Vec<&str> = dump["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g["tunnel"].as_str())
                .collect();
            anyhow::ensure!(tunnels == [new_tunnel.as_str()], "gateways: {tunnels:?}");
            Ok(())
        },
    )
    .await?;
    // Sidecars learn the new gateway with the next push, and traffic flows through it.
    settles_in(&traffic, "west", 20, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_object_is_admitted_on_its_own_and_references_wait_for_their_targets(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload_labeled("east", "echo-1", Some("echo"), "echo", &[("version", "v2")])
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let dir = mesh.cluster("east").config_dir.clone();
    // A VirtualService naming a subset no DestinationRule defines yet, next to a broken
    // object: the route applies (503 until the subset exists), the broken one is named.
    std::fs::write(
        dir.join("echo-vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo, subset: v2}}]\n",
    )?;
    std::fs::write(
        dir.join("broken.yaml"),
        plain_service("broken", "http").replace("port: 80,", "port: 80000,"),
    )?;
    let admin = mesh.controller_admin("east");
    let client = AppClient::new();
    eventually(
        "the route to apply and answer 503",
        Duration::from_secs(5),
        || async {
            let r = client.get(outbound, HOST, "/").await?;
            anyhow::ensure!(r.status == 503, "status {}", r.status);
            anyhow::ensure!(
                r.headers.get("x-isthmus-error").map(|v| v.as_bytes())
                    == Some(b"no-healthy-upstream"),
                "{:?}",
                r.headers
            );
            Ok(())
        },
    )
    .await?;
    let dump = config_dump(admin).await?;
    let errors = dump["config"]["last_errors"].to_string();
    assert!(
        errors.contains("broken.yaml") && errors.contains("spec.ports[0].port"),
        "{errors}"
    );
    let warnings = dump["config"]["warnings"].to_string();
    assert!(
        warnings.contains("echo-vs.yaml") && warnings.contains("subset `v2`"),
        "{warnings}"
    );
    // The DestinationRule arrives: the route serves.
    std::fs::write(
        dir.join("echo-dr.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  subsets: [{name: v2, labels: {version: v2}}]\n",
    )?;
    eventually("the subset to serve", Duration::from_secs(5), || async {
        let r = client.get(outbound, HOST, "/").await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(())
    })
    .await?;
    Ok(())
}

/// Forwards every connection to the address in `target` (refusing while there is none);
/// everything it carries ends when the task is aborted.
async fn relay(
    listener: tokio::net::TcpListener,
    target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
) {
    let mut carried = tokio::task::JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        let Some(to) = *target.lock().unwrap_or_else(|p| p.into_inner()) else {
            continue;
        };
        carried.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_given_several_federation_addresses_uses_one_that_answers_and_moves_when_it_stops(
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = listener.local_addr()?;
    let target = std::sync::Arc::new(std::sync::Mutex::new(None));
    let relaying = tokio::spawn(relay(listener, target.clone()));
    // The relay first (it refuses for now), then the federation itself.
    let (mut mesh, _, steady) =
        Mesh::with_traffic_from_east_configured(&["east", "west"], &["west"], |m| {
            m.federation_addrs_before = vec![relay_addr];
        })
        .await?;
    let admin = mesh.controller_admin("east");
    let federation = mesh.federation_addr.to_string();
    let linked_through = |want: String| async move {
        eventually(
            &format!("east linked through {want}"),
            Duration::from_secs(15),
            || async {
                let fed = config_dump(admin).await?["federation"].clone();
                anyhow::ensure!(
                    fed["connected"] == true && fed["address"] == want.as_str(),
                    "{fed}"
                );
                Ok(())
            },
        )
        .await
    };
    // Joined and linked through the address that answers.
    linked_through(federation.clone()).await?;

    // The relay now leads to the federation, which restarts: east moves on to the relay.
    *target.lock().unwrap_or_else(|p| p.into_inner()) = Some(mesh.federation_addr);
    mesh.kill_federation();
    mesh.start_federation().await?;
    linked_through(relay_addr.to_string()).await?;

    // The relay stops: east moves back to the federation's own address.
    relaying.abort();
    linked_through(federation).await?;
    isthmus_tests::settles_in(&steady, "west", 20, Duration::from_secs(10)).await?;
    assert_eq!(steady.failures(), Vec::<String>::new());
    Ok(())
}
