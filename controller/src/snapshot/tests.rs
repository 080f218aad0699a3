use super::*;
use isthmus_core::config::{load_files, SourceFile};

const CONFIG: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-a, namespace: demo}
spec: {address: 127.0.0.10, labels: {app: echo}, locality: us-east/zone-a, serviceAccount: echo, ports: {web: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-b, namespace: demo}
spec: {address: 127.0.0.11, labels: {app: echo}, locality: us-east/zone-b, serviceAccount: echo, ports: {web: 8080}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: echo, namespace: demo}
"#;

fn registry(dir: &std::path::Path, global: Global) -> (Registry, watch::Sender<Arc<Global>>) {
    let set = load_files(&[SourceFile {
        name: "c.yaml".into(),
        contents: CONFIG.into(),
    }])
    .expect("valid");
    let (_config_tx, config_rx) = watch::channel(Arc::new(set));
    let (global_tx, global_rx) = watch::channel(Arc::new(global));
    std::mem::forget(_config_tx);
    (
        Registry::new(
            "east",
            "td",
            config_rx,
            global_rx,
            {
                let (tx, rx) = watch::channel(Arc::new(crate::trust::Issuing::for_tests()));
                std::mem::forget(tx);
                rx
            },
            dir,
            crate::jwks::Resolver::new(
                isthmus_core::fetch::Getter::new(None).expect("getter"),
                crate::jwks::DEFAULT_REFRESH,
            ),
        ),
        global_tx,
    )
}

fn decode_service(snapshot: &Snapshot, name: &str) -> xds::Service {
    let (_, body) = &snapshot.resources[type_url::SERVICE][name];
    xds::Service::decode(body.as_ref()).expect("decodes")
}

#[test]
fn exports_count_healthy_endpoints_per_locality_and_drop_disconnected_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (reg, _g) = registry(dir.path(), Global::default());
    let exports = reg.exports().borrow().clone();
    let svc = &exports.services[0];
    assert_eq!(
        svc.localities.iter().map(|l| l.healthy).sum::<u32>(),
        2,
        "unknown endpoints count as healthy"
    );
    assert_eq!(
        svc.identities,
        vec!["spiffe://td/ns/demo/sa/echo".to_string()]
    );

    let a = NamespacedName::new("demo", "echo-a");
    reg.stream_opened(&a);
    reg.stream_closed(&a);
    reg.rebuild();
    let exports = reg.exports().borrow().clone();
    assert_eq!(
        exports.services[0]
            .localities
            .iter()
            .map(|l| l.healthy)
            .sum::<u32>(),
        1
    );
    let snap = reg.snapshots().borrow().clone();
    let pushed = decode_service(&snap, "demo/echo");
    assert_eq!(
        pushed.ports[0].target_port, 8080,
        "named target port resolved"
    );
    assert_eq!(pushed.endpoints.iter().filter(|e| e.healthy).count(), 1);
}

#[test]
fn remote_clusters_come_from_the_global_registry_and_versions_are_stable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let global = Global {
        version: 3,
        services: [(
            "demo/only-west".to_string(),
            Arc::new(fed::GlobalService {
                namespace: "demo".into(),
                name: "only-west".into(),
                ports: vec![fed::ExportedPort {
                    name: "http".into(),
                    port: 80,
                    protocol: "http".into(),
                }],
                clusters: vec![fed::ClusterService {
                    cluster: "west".into(),
                    localities: vec![],
                    identities: vec![],
                    endpoint_names: vec![],
                }],
                export_to: vec![],
            }),
        )]
        .into(),
        ..Default::default()
    };
    let (reg, _g) = registry(dir.path(), global);
    let snap = reg.snapshots().borrow().clone();
    let remote = decode_service(&snap, "demo/only-west");
    assert_eq!(remote.remote[0].cluster, "west");
    assert!(remote.endpoints.is_empty());
    let (reg2, _g2) = registry(dir.path(), Global::default());
    let v1 = &snap.resources[type_url::SERVICE]["demo/echo"].0;
    let snap2 = reg2.snapshots().borrow().clone();
    let v2 = &snap2.resources[type_url::SERVICE]["demo/echo"].0;
    assert_eq!(v1, v2, "a restarted controller computes the same versions");
}
