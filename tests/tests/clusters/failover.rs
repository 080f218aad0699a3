//! Failover with steady traffic: no request fails while a cluster's backend or gateway
//! dies, and traffic returns home when it comes back.

use std::time::{Duration, Instant};

use isthmus_tests::{
    config_dump, eventually, metric_sum, settles_in, traffic, AppClient, Mesh, Traffic,
};

const HOST: &str = "echo.demo.svc.cluster.local";

/// Three clusters serving echo, a client in east, and steady traffic that already lands.
async fn three_clusters() -> anyhow::Result<(Mesh, Traffic)> {
    let mut mesh = Mesh::start(&["east", "west", "eu"]).await?;
    for c in ["east", "west", "eu"] {
        mesh.add_workload(c, &format!("echo-{c}"), Some("echo"), "echo")
            .await?;
    }
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    Ok((mesh, traffic(outbound, HOST)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_west_when_east_backend_dies_and_back_when_it_returns() -> anyhow::Result<()> {
    let (mut mesh, traffic) = three_clusters().await?;
    settles_in(&traffic, "east", 20, Duration::from_secs(10)).await?;

    let killed = Instant::now();
    mesh.kill_workload("east", "echo-east");
    settles_in(&traffic, "west", 30, Duration::from_secs(10)).await?;
    assert!(
        traffic
            .since(killed)
            .iter()
            .all(|e| e.landed.as_deref() != Ok("eu")),
        "failover goes to the next locality (west), not eu"
    );

    mesh.restart_workload("east", "echo-east").await?;
    settles_in(&traffic, "east", 30, Duration::from_secs(15)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_eu_when_west_gateway_dies_too_and_back_to_west_when_it_returns(
) -> anyhow::Result<()> {
    let (mut mesh, traffic) = three_clusters().await?;
    settles_in(&traffic, "east", 20, Duration::from_secs(10)).await?;
    mesh.kill_workload("east", "echo-east");
    settles_in(&traffic, "west", 20, Duration::from_secs(10)).await?;

    mesh.kill_gateway("west");
    settles_in(&traffic, "eu", 30, Duration::from_secs(15)).await?;
    // `isthmus explain` from the client's sidecar names the cluster that failed, and why.
    let admin = mesh.workload("east", "client").admin();
    let req = isthmus::explain::Request {
        host: HOST,
        path: "/",
        method: "GET",
        headers: &[],
    };
    let text = eventually(
        "explain to see west unreachable",
        Duration::from_secs(5),
        || async {
            let text = isthmus::explain::render(&isthmus::explain::fetch(admin, &req).await?);
            anyhow::ensure!(text.contains("OUT, unreachable"), "{text}");
            Ok(text)
        },
    )
    .await?;
    eprintln!("{text}");
    assert!(
        text.contains("1. name: echo.demo.svc.cluster.local is service demo/echo"),
        "{text}"
    );
    assert!(
        text.contains("exported by west (us-west/zone-a): entry current"),
        "{text}"
    );
    assert!(
        text.contains("cluster west (us-west/zone-a): OUT, unreachable for")
            && text.contains("this cluster's gateway has no live link to west's gateway"),
        "{text}"
    );
    assert!(
        text.contains("cluster eu (eu-central/zone-a): usable"),
        "{text}"
    );
    assert!(
        text.contains("choice: cluster eu through the gateway at"),
        "{text}"
    );
    assert!(text.contains("cluster west is out (unreachable"), "{text}");

    mesh.start_gateway("west").await?;
    let east_gw = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway")
        .admin_address;
    eventually(
        "east's gateway to reconnect to west",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(
                metric_sum(
                    east_gw,
                    "isthmus_gateway_peer_up",
                    &[("peer_cluster", "west")]
                )
                .await?
                    == 1.0
            );
            Ok(())
        },
    )
    .await?;
    mesh.kill_workload("eu", "echo-eu");
    settles_in(&traffic, "west", 30, Duration::from_secs(20)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_the_app_dies_behind_a_live_sidecar() -> anyhow::Result<()> {
    let (mut mesh, traffic) = three_clusters().await?;
    settles_in(&traffic, "east", 20, Duration::from_secs(10)).await?;
    mesh.kill_app("east", "echo-east");
    settles_in(&traffic, "west", 30, Duration::from_secs(10)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    // The sidecar's probe told the controller: east's endpoint is withdrawn.
    let client_admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    eventually(
        "east's endpoint to be withdrawn",
        Duration::from_secs(5),
        || async {
            let dump = isthmus_tests::config_dump(client_admin).await?;
            let eps = dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["service"] == HOST)
                .and_then(|s| s["endpoints"].as_array())
                .map(Vec::len);
            anyhow::ensure!(eps == Some(0), "endpoints: {eps:?}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_locality_failover_order_wins_over_the_mesh_order() -> anyhow::Result<()>
{
    let (mut mesh, traffic) = three_clusters().await?;
    // Istio's "Locality failover" task as deploy/examples has it: us-east fails over to eu-central.
    let dr = std::fs::read_to_string(format!(
        "{}/../deploy/examples/locality-failover.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))?;
    mesh.apply("east", "echo-dr.yaml", &dr).await?;
    settles_in(&traffic, "east", 20, Duration::from_secs(10)).await?;
    mesh.kill_workload("east", "echo-east");
    settles_in(&traffic, "eu", 30, Duration::from_secs(10)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_service_in_a_cluster_does_not_eject_that_cluster_for_other_services(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "other-west", Some("other"), "other")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let other = "other.demo.svc.cluster.local";
    isthmus_tests::reachable(outbound, HOST).await?;
    isthmus_tests::reachable(outbound, other).await?;
    // echo's app in west goes away: its sidecar answers "app unavailable", which ejects
    // west for echo at once.
    mesh.kill_app("west", "echo-west");
    let client = AppClient::new();
    for _ in 0..3 {
        let _ = client.get(outbound, HOST, "/").await?;
    }
    let admin = std::net::SocketAddr::new(outbound.ip(), 15000);
    let dump = config_dump(admin).await?;
    let ejected = |service: &str| {
        dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == service)
            .and_then(|s| s["remote"][0]["ejected"].as_bool())
    };
    assert_eq!(ejected(HOST), Some(true), "{dump}");
    assert_eq!(
        ejected(other),
        Some(false),
        "west stays in use for other: {dump}"
    );
    let r = client.get(outbound, other, "/").await?;
    assert_eq!(r.answer()?.cluster, "west");
    Ok(())
}
