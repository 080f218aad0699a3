//! Requests across the mesh: same cluster, across clusters over QUIC, with end-to-end
//! identity.

use std::time::Duration;

use isthmus_tests::{eventually, metric_sum, AppClient, Mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_one_cluster_carries_the_callers_spiffe_id() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let reply = eventually("echo reachable", Duration::from_secs(5), || async {
        let r = client
            .get(outbound, "echo.demo.svc.cluster.local", "/hello")
            .await?;
        anyhow::ensure!(r.status == 200, "status {}: {:?}", r.status, r.body);
        Ok(r)
    })
    .await?;
    let answer = reply.answer()?;
    assert_eq!(answer.cluster, "east");
    assert_eq!(answer.caller, "spiffe://cluster.local/ns/demo/sa/frontend");
    assert_eq!(answer.path, "/hello");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_from_east_reaches_a_service_only_in_west_through_both_gateways(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let reply = eventually(
        "echo in west reachable from east",
        Duration::from_secs(10),
        || async {
            let r = client
                .get(outbound, "echo.demo.svc.clusterset.local", "/")
                .await?;
            anyhow::ensure!(
                r.status == 200,
                "status {}: {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            Ok(r)
        },
    )
    .await?;
    let answer = reply.answer()?;
    assert_eq!(answer.cluster, "west");
    assert_eq!(
        answer.caller, "spiffe://cluster.local/ns/demo/sa/frontend",
        "end-to-end identity survives both gateways"
    );
    let east_gw = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway")
        .admin_address;
    let west_gw = mesh
        .cluster("west")
        .gateway
        .as_ref()
        .expect("gateway")
        .admin_address;
    assert!(
        metric_sum(
            east_gw,
            "isthmus_gateway_quic_streams_total",
            &[
                ("direction", "outbound"),
                ("peer_cluster", "west"),
                ("outcome", "ok")
            ]
        )
        .await?
            >= 1.0
    );
    assert!(
        metric_sum(
            west_gw,
            "isthmus_gateway_quic_streams_total",
            &[
                ("direction", "inbound"),
                ("peer_cluster", "east"),
                ("outcome", "ok")
            ]
        )
        .await?
            >= 1.0
    );
    Ok(())
}
