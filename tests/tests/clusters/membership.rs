//! Clusters joining and leaving a running federation, with no restart anywhere.

use isthmus_tests::proxy_get as get;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus::client::AppClient;
use isthmus::operator::Operator;
use isthmus_core::tls::TlsIdentity;
use isthmus_tests::{config_dump, eventually, gateway_refuses, mtls_request, Mesh, TRUST_DOMAIN};

const ECHO: &str = "echo.demo.svc.cluster.local";
const SOLO: &str = "solo.demo.svc.cluster.local";

/// Where a request to `host` from `outbound` lands: the answering cluster, or why not.
async fn lands(outbound: SocketAddr, host: &str) -> Result<String, String> {
    match AppClient::new().get(outbound, host, "/").await {
        Ok(r) if r.status == 200 => r.answer().map(|a| a.cluster).map_err(|e| e.to_string()),
        Ok(r) => Err(format!("status {}", r.status)),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until requests to `host` from `outbound` land in `cluster`.
async fn lands_in(outbound: SocketAddr, host: &str, cluster: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{host} to land in {cluster}"),
        Duration::from_secs(15),
        || async {
            let landed = lands(outbound, host).await;
            anyhow::ensure!(landed.as_deref() == Ok(cluster), "{landed:?}");
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_cluster_joins_serves_and_leaves_with_its_certificates_refused(
) -> anyhow::Result<()> {
    // East's traffic to west goes on through the join and the removal.
    let (mut mesh, east, steady) =
        Mesh::with_traffic_from_east(&["east", "west", "north"], &["west"]).await?;

    // A fourth cluster joins the running mesh: a join token, its controller, its gateway.
    mesh.add_cluster("south").await?;
    mesh.add_workload("south", "solo-south", Some("solo"), "solo")
        .await?;
    mesh.add_workload("south", "client-south", None, "frontend")
        .await?;
    let south = mesh.workload("south", "client-south").outbound();
    lands_in(east, SOLO, "south").await?;
    lands_in(south, ECHO, "west").await?;

    // Certificates south's CA issued, taken while it is a member, are accepted now.
    let south_gateway = mesh.gateway_certificate("south").await?;
    let south_workload = TlsIdentity::new(
        mesh.ca_client("south", "south", "frontend", "frontend")?
            .fetch(None)
            .await?,
    );
    let west_sidecar = SocketAddr::new(mesh.workload("west", "echo-west").ip.into(), 15008);
    let east_quic = mesh.gateway_quic("east");
    assert_eq!(
        mtls_request(west_sidecar, &south_workload, get(&format!("{ECHO}:80"))).await?,
        200
    );
    assert!(!gateway_refuses(east_quic, &south_gateway, "east").await);

    // South leaves.
    let operator = Operator {
        federation: mesh.federation_addr,
        state_dir: mesh.fed_state.clone(),
        trust_domain: TRUST_DOMAIN.into(),
    };
    let removed = operator
        .remove_cluster("south", Duration::from_secs(1))
        .await?;
    assert_eq!(removed.withdrawn_services, 1, "{removed:?}");
    // Its services vanish from the others' registries...
    eventually("solo to leave east", Duration::from_secs(10), || async {
        let landed = lands(east, SOLO).await;
        anyhow::ensure!(landed.is_err(), "{landed:?}");
        Ok(())
    })
    .await?;
    let fed = config_dump(mesh.federation.as_ref().expect("federation").admin_address).await?;
    let clusters = fed["clusters"].to_string();
    assert!(!clusters.contains("south"), "{clusters}");
    assert!(!fed["services"].to_string().contains("south"), "{fed}");
    // ...and once the drain is over its certificates are refused everywhere.
    eventually(
        "south's certificates to be refused",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(
                mtls_request(west_sidecar, &south_workload, get(&format!("{ECHO}:80")))
                    .await
                    .is_err(),
                "west's sidecar still accepts south's workload certificate"
            );
            anyhow::ensure!(
                gateway_refuses(east_quic, &south_gateway, "east").await,
                "east's gateway still accepts south's gateway"
            );
            Ok(())
        },
    )
    .await?;
    // A certificate of a member cluster still passes: the refusal is about south.
    let east_workload = TlsIdentity::new(
        mesh.ca_client("east", "east", "frontend", "frontend")?
            .fetch(None)
            .await?,
    );
    assert_eq!(
        mtls_request(west_sidecar, &east_workload, get(&format!("{ECHO}:80"))).await?,
        200
    );

    // South's controller is refused by the federation; south still serves its own traffic.
    eventually(
        "south to lose the federation",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(mesh_controller_admin(&mesh, "south")).await?;
            anyhow::ensure!(
                dump["federation"]["connected"] == false,
                "{}",
                dump["federation"]
            );
            Ok(())
        },
    )
    .await?;
    assert_eq!(lands(south, SOLO).await, Ok("south".into()));
    // The federation remembers the removal.
    let again = operator.remove_cluster("south", Duration::ZERO).await;
    assert!(again.is_err_and(|e| e.to_string().contains("already removed")));

    assert_eq!(
        steady.failures(),
        Vec::<String>::new(),
        "east -> west traffic"
    );
    Ok(())
}

fn mesh_controller_admin(mesh: &Mesh, cluster: &str) -> SocketAddr {
    mesh.clusters[cluster]
        .controller
        .as_ref()
        .expect("controller")
        .admin_address
}

/// The client's view of `host`'s entry from `cluster`: its `stale_since_unix`.
async fn remote_stale_since(
    admin: SocketAddr,
    host: &str,
    cluster: &str,
) -> anyhow::Result<serde_json::Value> {
    let dump = config_dump(admin).await?;
    let remote = dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == host)
        .and_then(|s| s["remote"].as_array())
        .and_then(|r| r.iter().find(|r| r["cluster"] == cluster).cloned())
        .ok_or_else(|| anyhow::anyhow!("no {cluster} entry for {host}: {dump}"))?;
    Ok(remote["stale_since_unix"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_stops_reporting_is_stale_everywhere_a_user_looks_and_keeps_serving(
) -> anyhow::Result<()> {
    let (mut mesh, _, steady) =
        Mesh::with_traffic_from_east(&["east", "west", "north"], &["west"]).await?;
    let client_admin = mesh.workload("east", "client").admin();
    assert!(remote_stale_since(client_admin, ECHO, "west")
        .await?
        .is_null());

    // West's controller stops; its gateway and workloads go on.
    mesh.kill_controller("west");
    let stopped = isthmus_core::admin::unix_seconds(std::time::SystemTime::now());
    let fed_admin = mesh.federation.as_ref().expect("federation").admin_address;
    // The federation, east's controller, `isthmus status`, and east's sidecar all say so.
    eventually(
        "west to be stale in east's sidecar",
        Duration::from_secs(10),
        || async {
            let since = remote_stale_since(client_admin, ECHO, "west").await?;
            let since = since
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("not stale: {since}"))?;
            anyhow::ensure!(
                since + 1 >= stopped,
                "stale since {since}, stopped at {stopped}"
            );
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        isthmus_tests::metric_sum(
            fed_admin,
            "isthmus_federation_registry_cluster_connected",
            &[("cluster", "west")]
        )
        .await?,
        0.0
    );
    let east_admin = mesh.controller_admin("east");
    let fed = config_dump(east_admin).await?["federation"].clone();
    assert!(fed["clusters_stale_since_unix"]["west"].is_u64(), "{fed}");
    assert!(
        fed["clusters_stale_since_unix"].get("north").is_none(),
        "{fed}"
    );
    let status = isthmus::status::report(east_admin).await?;
    assert!(
        status.contains("cluster west: not reporting to the federation; its entries stale since"),
        "{status}"
    );
    // Nothing was dropped: east's traffic still lands in west.
    isthmus_tests::settles_in(&steady, "west", 20, Duration::from_secs(5)).await?;

    // West reports again: nothing is stale any more.
    mesh.start_controller("west").await?;
    eventually(
        "west to be fresh again",
        Duration::from_secs(10),
        || async {
            let since = remote_stale_since(client_admin, ECHO, "west").await?;
            anyhow::ensure!(since.is_null(), "still stale since {since}");
            Ok(())
        },
    )
    .await?;

    // The federation goes away: every other cluster's entries are stale in east's proxies.
    mesh.kill_federation();
    eventually(
        "east's sidecar to see the federation gone",
        Duration::from_secs(10),
        || async {
            let dump = config_dump(client_admin).await?;
            anyhow::ensure!(
                dump["stale"]["federation_since_unix"].is_u64(),
                "{}",
                dump["stale"]
            );
            anyhow::ensure!(remote_stale_since(client_admin, ECHO, "west")
                .await?
                .is_u64());
            Ok(())
        },
    )
    .await?;
    isthmus_tests::settles_in(&steady, "west", 20, Duration::from_secs(5)).await?;
    assert_eq!(steady.failures(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_silent_longer_than_the_set_time_is_withdrawn_until_it_reports_again(
) -> anyhow::Result<()> {
    let (mut mesh, _, steady) =
        Mesh::with_traffic_from_east_configured(&["east", "west", "eu"], &["west", "eu"], |m| {
            m.forget_silent_after = Some(Duration::from_secs(2));
        })
        .await?;
    let fed = mesh.federation.as_ref().expect("federation").admin_address;
    let exported_by = |dump: &serde_json::Value| -> Vec<String> {
        dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == "demo/echo")
            .flat_map(|s| s["clusters"].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["cluster"].as_str().map(str::to_owned))
            .collect()
    };

    // West's controller goes silent: stale at once, withdrawn after two seconds, and
    // traffic moves to eu with no failure (west's endpoints were alive all along).
    mesh.kill_controller("west");
    let silent = std::time::Instant::now();
    eventually(
        "west's exports to be withdrawn",
        Duration::from_secs(10),
        || async {
            let by = exported_by(&config_dump(fed).await?);
            anyhow::ensure!(by == ["eu"], "{by:?}");
            Ok(())
        },
    )
    .await?;
    assert!(
        silent.elapsed() >= Duration::from_secs(1),
        "withdrawn after {:?}, before the silence lasted",
        silent.elapsed()
    );
    isthmus_tests::settles_in(&steady, "eu", 20, Duration::from_secs(10)).await?;

    // West reports again: its exports are back, and so is the traffic.
    mesh.start_controller("west").await?;
    eventually(
        "west's exports to be back",
        Duration::from_secs(10),
        || async {
            let mut by = exported_by(&config_dump(fed).await?);
            by.sort();
            anyhow::ensure!(by == ["eu", "west"], "{by:?}");
            Ok(())
        },
    )
    .await?;
    isthmus_tests::settles_in(&steady, "west", 20, Duration::from_secs(15)).await?;
    assert_eq!(steady.failures(), Vec::<String>::new());
    Ok(())
}
