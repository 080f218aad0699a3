//! The control plane with states larger than any one message may be: a cluster exports
//! more than 16 MiB, the federation carries it to another cluster's controller and that
//! controller to a proxy, each in messages of about 1 MiB; then one service changes and only
//! that service travels. (Time and memory at 20 clusters and 100,000 endpoints are measured
//! by `isthmus bench registry`, not here.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_core::grpc::{chunk_by_size, CHUNK_BYTES, MAX_MESSAGE_BYTES};
use isthmus_core::identity::SpiffeId;
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::{
    ExportUpdate, ExportedPort, ExportedService, GatewaySet, Locality, LocalityCount,
};
use isthmus_tests::{eventually, metric_sum, Mesh, TRUST_DOMAIN};
use prost::Message;

const SERVICES: usize = 300;
/// Distinct label sets per service (as a StatefulSet's per-pod labels make them).
const PODS: usize = 1200;

fn service(i: usize, healthy: u32) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: format!("big-{i}"),
        ports: vec![ExportedPort {
            name: "http".into(),
            port: 80,
            protocol: "http".into(),
        }],
        localities: (0..PODS)
            .map(|p| LocalityCount {
                locality: Some(Locality {
                    region: "us-east".into(),
                    zone: format!("zone-{}", p % 3),
                    subzone: String::new(),
                }),
                healthy,
                labels: [
                    ("app".to_string(), format!("big-{i}")),
                    (
                        "statefulset.kubernetes.io/pod-name".to_string(),
                        format!("big-{i}-{p}"),
                    ),
                ]
                .into(),
            })
            .collect(),
        identities: vec![format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/big")],
        export_to: vec![],
        endpoint_names: vec![],
    }
}

fn batch(reset: bool, services: Vec<ExportedService>) -> Vec<ExportUpdate> {
    let runs = chunk_by_size(services, CHUNK_BYTES);
    let last = runs.len() - 1;
    runs.into_iter()
        .enumerate()
        .map(|(i, upserted)| ExportUpdate {
            cluster: "east".into(),
            reset,
            upserted,
            gateways: (reset && i == 0).then(GatewaySet::default),
            more: i < last,
            ..Default::default()
        })
        .collect()
}

/// Healthy endpoints per remote cluster, and the resource's bytes.
type Seen = (BTreeMap<String, u32>, usize);

/// Per service, what a proxy holds.
#[derive(Default)]
struct Held(Mutex<BTreeMap<String, Seen>>);

impl isthmus_core::xds::XdsHandler for Held {
    fn apply(
        &self,
        _type_url: &str,
        updated: &[isthmus_proto::discovery::Resource],
        removed: &[String],
    ) -> Vec<isthmus_core::xds::Rejected> {
        let mut held = self.0.lock().expect("lock");
        let mut rejected = Vec::new();
        for r in updated {
            match isthmus_proto::discovery::Service::decode(r.body.as_slice()) {
                Ok(svc) => {
                    let remote = svc
                        .remote
                        .iter()
                        .map(|c| {
                            (
                                c.cluster.clone(),
                                c.localities.iter().map(|l| l.healthy).sum(),
                            )
                        })
                        .collect();
                    held.insert(r.name.clone(), (remote, r.body.len()));
                }
                Err(e) => rejected.push(isthmus_core::xds::Rejected::new(&r.name, e)),
            }
        }
        for name in removed {
            held.remove(name);
        }
        rejected
    }
}

impl Held {
    fn east_healthy(&self, service: &str) -> Option<u32> {
        let held = self.0.lock().expect("lock");
        held.get(&format!("demo/{service}"))?.0.get("east").copied()
    }

    fn bytes(&self) -> usize {
        self.0.lock().expect("lock").values().map(|(_, b)| b).sum()
    }

    fn complete(&self, healthy_each: u32) -> bool {
        (0..SERVICES).all(|i| self.east_healthy(&format!("big-{i}")) == Some(healthy_each))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_and_a_proxy_config_over_16_mib_converge_and_one_change_sends_one_service(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    // The test speaks for east to the federation, with east's controller certificate.
    let state = mesh.cluster("east").state_dir.clone();
    mesh.kill_controller("east");
    let key = rustls_pemfile::private_key(
        &mut std::fs::read_to_string(state.join("controller-key.pem"))?.as_bytes(),
    )?
    .ok_or_else(|| anyhow::anyhow!("no controller key"))?;
    let east = isthmus_core::tls::TlsIdentity::new(isthmus_core::tls::Credentials::from_pem(
        key.secret_der().to_vec(),
        &[std::fs::read_to_string(state.join("controller.pem"))?],
        &mesh.bundle_pem,
    )?);
    let federation = mesh.federation.as_ref().expect("federation");
    let (fed_grpc, fed_admin) = (federation.grpc_address, federation.admin_address);
    let channel = isthmus_core::grpc::tls_channel(
        fed_grpc,
        east.client_config(
            isthmus_core::tls::PeerPolicy::OneOf(vec![SpiffeId::new(
                TRUST_DOMAIN,
                "isthmus-system",
                "isthmus-federation",
            )]),
            &[isthmus_core::tls::ALPN_H2],
        ),
    );

    let services: Vec<ExportedService> = (0..SERVICES).map(|i| service(i, 1)).collect();
    let total: usize = services.iter().map(Message::encoded_len).sum();
    assert!(total > 16 << 20, "the export is {total} bytes");
    let first = batch(true, services);
    assert!(
        first.iter().all(|m| m.encoded_len() < 2 * CHUNK_BYTES),
        "no message near gRPC's limit"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    for m in first {
        tx.send(m).await?;
    }

    // A proxy in west gets all of it.
    let held = Arc::new(Held::default());
    let client = isthmus_core::xds::XdsClient {
        channel: mesh.controller_channel("west", "probe").await?,
        node: isthmus_proto::discovery::Node {
            cluster: "west".into(),
            role: "sidecar".into(),
            workload: "demo/probe".into(),
            ..Default::default()
        },
        types: vec![isthmus_proto::type_url::SERVICE],
        handler: held.clone(),
        health: None,
        certificate: None,
        peer_links: None,
        demand: None,
        first_config: None,
    };
    let proxy = tokio::spawn(client.run());
    eventually(
        "every service, whole, at the proxy in west",
        Duration::from_secs(60),
        || async {
            anyhow::ensure!(held.complete(PODS as u32), "{} bytes so far", held.bytes());
            Ok(())
        },
    )
    .await?;
    let proxy_bytes = held.bytes();
    assert!(
        proxy_bytes > 16 << 20,
        "the proxy holds {proxy_bytes} bytes"
    );

    // One service changes: every pod of big-7 turns unhealthy.
    let west_admin = mesh.controller_admin("west");
    let fed_before = metric_sum(
        fed_admin,
        "isthmus_federation_registry_sent_bytes_total",
        &[],
    )
    .await?;
    let xds_before =
        metric_sum(west_admin, "isthmus_controller_xds_pushed_bytes_total", &[]).await?;
    let one = service(7, 0);
    let one_size = one.encoded_len() as f64;
    for m in batch(false, vec![one]) {
        tx.send(m).await?;
    }
    eventually(
        "the change at the proxy",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(held.east_healthy("big-7") == Some(0), "not yet");
            Ok(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fed_sent = metric_sum(
        fed_admin,
        "isthmus_federation_registry_sent_bytes_total",
        &[],
    )
    .await?
        - fed_before;
    let xds_sent = metric_sum(west_admin, "isthmus_controller_xds_pushed_bytes_total", &[]).await?
        - xds_before;
    println!(
        "whole export {total} B, proxy config {proxy_bytes} B; one change: {fed_sent} B from the federation, {xds_sent} B pushed in west (the service is {one_size} B)"
    );
    // West is the only other controller; its proxies are this one and its gateway.
    let proxies = metric_sum(west_admin, "isthmus_controller_xds_connected_proxies", &[]).await?;
    assert_eq!(proxies, 2.0, "the gateway and the test's proxy");
    assert!(
        fed_sent > 0.5 * one_size && fed_sent < 1.5 * one_size,
        "the federation sent {fed_sent} B for a {one_size} B service"
    );
    assert!(
        xds_sent > 0.5 * proxies * one_size && xds_sent < 1.5 * proxies * one_size,
        "west's controller pushed {xds_sent} B to {proxies} proxies for a {one_size} B service"
    );
    assert!(held.complete_except(7), "the other services are untouched");
    proxy.abort();
    Ok(())
}

impl Held {
    fn complete_except(&self, skip: usize) -> bool {
        (0..SERVICES)
            .filter(|i| *i != skip)
            .all(|i| self.east_healthy(&format!("big-{i}")) == Some(PODS as u32))
    }
}
