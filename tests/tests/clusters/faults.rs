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
    let west_quic = mesh
        .cluster("west")
        .gateway
        .as_ref()
        .expect("gateway")
        .quic_address;
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
    let (mut mesh, traffic) = mesh_with_traffic_in_west().await?;
    let west_quic = mesh
        .cluster("west")
        .gateway
        .as_ref()
        .expect("gateway")
        .quic_address;
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
