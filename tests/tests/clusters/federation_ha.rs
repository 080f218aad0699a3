//! The federation as replicas: losing the leader's host fails no request and loses no
//! state (root, join-token key, the clusters' exports).

use std::net::SocketAddr;
use std::time::Duration;

use isthmus::client::AppClient;
use isthmus_federation::Role;
use isthmus_tests::{config_dump, eventually, Mesh};
use k8s_openapi::api::core::v1::Secret;

const SOLO: &str = "solo.demo.svc.cluster.local";
const LATE: &str = "late.demo.svc.cluster.local";

/// Waits until requests to `host` from `outbound` land in `cluster`.
async fn lands_in(outbound: SocketAddr, host: &str, cluster: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{host} to land in {cluster}"),
        Duration::from_secs(15),
        || async {
            let r = AppClient::new().get(outbound, host, "/").await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            let landed = r.answer()?.cluster;
            anyhow::ensure!(landed == cluster, "landed in {landed}");
            Ok(())
        },
    )
    .await
}

/// The clusters exporting `service` in a federation's dump.
fn exporters(dump: &serde_json::Value, service: &str) -> Vec<String> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["clusters"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["cluster"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leading_federation_replica_fails_no_request_and_loses_no_join_or_export(
) -> anyhow::Result<()> {
    let (mut mesh, east, steady) =
        Mesh::with_traffic_from_east_configured(&["east", "west", "north"], &["west"], |m| {
            m.federation_replicas = 2
        })
        .await?;
    // Replica 0 leads. Replica 1 stands by: no listener for controllers, not ready.
    assert_eq!(mesh.federation_replica_role(1), Some(Role::Standby));
    let standby = mesh.federation_replica_addr(1);
    assert!(tokio::net::TcpStream::connect(standby).await.is_err());
    let standby_admin = SocketAddr::new(standby.ip(), 15014);
    let ready = AppClient::new()
        .get(standby_admin, "admin", "/ready")
        .await?;
    assert_eq!(ready.status, 503);
    let dump = config_dump(standby_admin).await?;
    assert_eq!(dump["replica"]["role"], "standby", "{dump}");
    // The standby keeps a copy of the state, so join tokens can be minted on it too.
    let key =
        |n: usize| std::fs::read(mesh.federation_replica_state(n).join("join-token.key")).ok();
    eventually(
        "the standby's copy of the state",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(key(1).is_some() && key(1) == key(0), "not yet");
            Ok(())
        },
    )
    .await?;

    // A fourth cluster joins and exports a service, through the leader.
    mesh.add_cluster("south").await?;
    mesh.add_workload("south", "solo-south", Some("solo"), "solo")
        .await?;
    lands_in(east, SOLO, "south").await?;
    // The leader has kept it in the Secret (within a few hundred milliseconds).
    let secrets: kube::Api<Secret> =
        kube::Api::namespaced(mesh.federation_api().client().await?, "isthmus-system");
    eventually(
        "south's export in the Secret",
        Duration::from_secs(5),
        || async {
            let s = secrets.get(isthmus::replicas::STATE_SECRET).await?;
            let registry = s
                .data
                .unwrap_or_default()
                .remove("registry.pb")
                .map(|b| b.0)
                .unwrap_or_default();
            let has = |needle: &[u8]| registry.windows(needle.len()).any(|w| w == needle);
            anyhow::ensure!(has(b"south") && has(b"solo"), "not yet");
            Ok(())
        },
    )
    .await?;

    // West exports another service, and the leader's host is lost right after; so is
    // south's controller, which could otherwise send south's exports again.
    mesh.add_workload("west", "late-west", Some("late"), "late")
        .await?;
    mesh.kill_federation_replica(0);
    mesh.kill_controller("south");
    let lost = std::time::Instant::now();

    let (n, role) = mesh.wait_leading(Duration::from_secs(10)).await?;
    let took_over = lost.elapsed();
    assert_eq!(n, 1);
    let Role::Leading {
        admin_address,
        bundle_pem,
        ..
    } = role
    else {
        unreachable!()
    };
    assert_eq!(bundle_pem, mesh.bundle_pem, "the same root");
    // It serves the last registry at once: south's export, kept only in the Secret.
    let fed = config_dump(admin_address).await?;
    assert_eq!(
        exporters(&fed, "demo/solo"),
        ["south"],
        "{}",
        fed["services"]
    );
    assert_eq!(fed["replica"]["role"], "leading", "{}", fed["replica"]);

    // Controllers move to the new leader, and west's late export reaches east.
    for c in ["east", "west", "north"] {
        let admin = mesh.controller_admin(c);
        eventually(
            &format!("{c}'s controller on replica 1"),
            Duration::from_secs(15),
            || async {
                let d = config_dump(admin).await?;
                anyhow::ensure!(
                    d["federation"]["connected"] == true
                        && d["federation"]["address"] == standby.to_string(),
                    "{}",
                    d["federation"]
                );
                Ok(())
            },
        )
        .await?;
    }
    lands_in(east, LATE, "west").await?;
    lands_in(east, SOLO, "south").await?;

    // South's controller comes back with a token from the old leader's key, and a fifth
    // cluster joins: the key survived the takeover.
    mesh.start_controller("south").await?;
    mesh.add_cluster("central").await?;
    mesh.add_workload("central", "late-central", Some("late"), "late")
        .await?;
    eventually("central's export", Duration::from_secs(15), || async {
        let fed = config_dump(admin_address).await?;
        let mut late = exporters(&fed, "demo/late");
        late.sort();
        anyhow::ensure!(late == ["central", "west"], "{late:?}");
        Ok(())
    })
    .await?;

    // The old leader's host comes back: it stands by.
    mesh.start_federation_replica(0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mesh.federation_replica_role(0), Some(Role::Standby));
    assert!(matches!(
        mesh.federation_replica_role(1),
        Some(Role::Leading { .. })
    ));

    assert_eq!(
        steady.failures(),
        Vec::<String>::new(),
        "east -> west traffic"
    );
    eprintln!("replica 1 took over {took_over:?} after the leader was lost");
    Ok(())
}
