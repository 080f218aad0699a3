//! Network faults between gateways, injected with nftables drop rules on loopback: a silent
//! partition (no connection close, no ICMP) and packet loss. Needs root and `nft`.

use std::time::Duration;

use isthmus_tests::{eventually, metric_sum, settles_in, Mesh, NetFault};

/// echo in west and eu only; a client in east; traffic settled in west (east's failover
/// region).
async fn mesh_with_traffic_in_west() -> anyhow::Result<(Mesh, isthmus_tests::Traffic)> {
    let (mesh, _, traffic) =
        Mesh::with_traffic_from_east(&["east", "west", "eu"], &["west", "eu"]).await?;
    Ok((mesh, traffic))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_from_west_fails_over_to_eu_and_heals_back() -> anyhow::Result<()> {
    let (mut mesh, traffic) = mesh_with_traffic_in_west().await?;
    let west_quic = mesh.gateway_quic("west");
    let partition = NetFault::drop_udp(west_quic, 100)?;
    settles_in(&traffic, "eu", 30, Duration::from_secs(15)).await?;

    partition.heal();
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
    // West's ejection in the client expires (at most 30 s after repeated ejections).
    settles_in(&traffic, "west", 30, Duration::from_secs(40)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_between_gateways_fails_no_request() -> anyhow::Result<()> {
    let (mesh, traffic) = mesh_with_traffic_in_west().await?;
    let west_quic = mesh.gateway_quic("west");
    let loss = NetFault::drop_udp(west_quic, 10)?;
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(loss);
    let during = traffic.since(start);
    assert!(
        during.len() > 20,
        "traffic kept flowing: {} requests",
        during.len()
    );
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "QUIC recovers lost packets; no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_partitioned_gateway_loses_its_traffic_within_a_second_everywhere(
) -> anyhow::Result<()> {
    use isthmus_tests::{config_dump, reachable, traffic};
    const HOST: &str = "echo.demo.svc.cluster.local";
    // East and eu both prefer west (their failover region); north is the way out.
    let mut mesh = Mesh::start(&["east", "west", "eu", "north"]).await?;
    for c in ["west", "north"] {
        mesh.add_workload(c, &format!("echo-{c}"), Some("echo"), "echo")
            .await?;
    }
    for c in ["east", "eu", "west"] {
        mesh.add_workload(c, &format!("client-{c}"), None, "frontend")
            .await?;
    }
    let mut flows = Vec::new();
    for c in ["east", "eu", "west"] {
        let out = mesh.workload(c, &format!("client-{c}")).outbound();
        reachable(out, HOST).await?;
        let t = traffic(out, HOST);
        settles_in(&t, "west", 20, Duration::from_secs(10)).await?;
        flows.push((c, t));
    }
    let west_quic = mesh.gateway_quic("west");

    let cut = std::time::Instant::now();
    let partition = NetFault::drop_udp(west_quic, 100)?;
    // Give every flow two seconds past the deadline to show where it goes.
    eventually(
        "two seconds of traffic after the cut",
        Duration::from_secs(10),
        || async {
            for (_, t) in &flows {
                anyhow::ensure!(
                    t.since(cut + Duration::from_secs(3)).len() >= 5,
                    "still waiting"
                );
            }
            Ok(())
        },
    )
    .await?;
    let deadline = cut + Duration::from_secs(1);
    for (c, t) in &flows {
        // No caller waits a second: the request caught by the cut is retried elsewhere as
        // soon as the link is known dead.
        let slowest = t
            .since(cut)
            .iter()
            .map(|e| e.took)
            .max()
            .unwrap_or_default();
        eprintln!("{c}: slowest request after the cut took {slowest:?}");
        assert!(
            slowest < Duration::from_secs(1),
            "{c}: a request took {slowest:?}"
        );
        let after: Vec<_> = t.since(deadline).into_iter().map(|e| e.landed).collect();
        assert!(!after.is_empty());
        let expected = if *c == "west" { "west" } else { "north" };
        assert!(
            after.iter().all(|l| l.as_deref() == Ok(expected)),
            "{c}: requests finished a second after the cut must land in {expected}: {after:?}"
        );
        assert_eq!(
            t.failures(),
            Vec::<String>::new(),
            "{c}: no request may fail"
        );
    }
    // Every cluster's sidecars see west as unreachable (and west sees the others so).
    let east_dump = config_dump(mesh.workload("east", "client-east").admin()).await?;
    let west_entry = east_dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == HOST)
        .and_then(|s| s["remote"].as_array())
        .and_then(|r| r.iter().find(|r| r["cluster"] == "west").cloned())
        .expect("west's entry");
    assert!(
        west_entry["unreachable_since_unix"].is_u64(),
        "{west_entry}"
    );
    let west_ctl = config_dump(mesh.controller_admin("west")).await?;
    assert!(
        west_ctl["unreachable_since_unix"]["north"].is_u64(),
        "west's gateway cannot reach north either: {}",
        west_ctl["unreachable_since_unix"]
    );

    // The federation's view: no other cluster's gateway reaches west, so west is down for
    // every proxy; the others are not.
    let fed = mesh.federation.as_ref().expect("federation").admin_address;
    eventually(
        "the federation to see west down",
        Duration::from_secs(5),
        || async {
            let dump = config_dump(fed).await?;
            let clusters = dump["clusters"].as_array().cloned().unwrap_or_default();
            let of = |name: &str| clusters.iter().find(|c| c["cluster"] == name).cloned();
            let west = of("west").ok_or_else(|| anyhow::anyhow!("no west"))?;
            anyhow::ensure!(west["down_since_unix"].is_u64(), "{west}");
            anyhow::ensure!(
                west["unreachable_from"] == serde_json::json!(["east", "eu", "north"]),
                "{west}"
            );
            for other in ["east", "eu", "north"] {
                let c = of(other).ok_or_else(|| anyhow::anyhow!("no {other}"))?;
                anyhow::ensure!(c["down_since_unix"].is_null(), "{c}");
            }
            Ok(())
        },
    )
    .await?;

    // Healed, traffic comes back to west.
    partition.heal();
    for (_, t) in &flows {
        settles_in(t, "west", 20, Duration::from_secs(40)).await?;
    }
    let dump = config_dump(fed).await?;
    let down: Vec<_> = dump["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| !c["down_since_unix"].is_null())
        .collect();
    assert!(down.is_empty(), "nothing is down once healed: {down:?}");
    for (c, t) in &flows {
        assert_eq!(
            t.failures(),
            Vec::<String>::new(),
            "{c}: no request may fail"
        );
    }
    Ok(())
}
