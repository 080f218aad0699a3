//! What each proxy is pushed: Istio's `exportTo` on Services, VirtualServices and
//! DestinationRules, and the `Sidecar` kind, checked with lightweight xDS clients in
//! several namespaces and clusters (the config a proxy holds, as its dump would show it).

use std::time::Duration;

use isthmus_tests::{eventually, Mesh};

/// Records the services a proxy is pushed.
#[derive(Default)]
struct Recorder(std::sync::Mutex<std::collections::BTreeSet<String>>);

impl isthmus_core::xds::XdsHandler for Recorder {
    fn apply(
        &self,
        _type_url: &str,
        updated: &[isthmus_proto::discovery::Resource],
        removed: &[String],
    ) -> Vec<isthmus_core::xds::Rejected> {
        let mut held = self.0.lock().expect("lock");
        held.extend(updated.iter().map(|r| r.name.clone()));
        for r in removed {
            held.remove(r);
        }
        Vec::new()
    }
}

/// The services a proxy of workload `namespace/name` in `cluster` is pushed.
async fn pushed_services(
    mesh: &mut Mesh,
    cluster: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(std::sync::Arc<Recorder>, tokio::task::JoinHandle<()>)> {
    watch_services(mesh, cluster, namespace, name).await
}

/// A proxy of workload `namespace/name` in `cluster`, subscribed to services, whose pushes
/// `H` records.
async fn watch_services<H: isthmus_core::xds::XdsHandler + Default>(
    mesh: &mut Mesh,
    cluster: &str,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(std::sync::Arc<H>, tokio::task::JoinHandle<()>)> {
    let channel = mesh.controller_channel_in(cluster, namespace, name).await?;
    let recorder = std::sync::Arc::new(H::default());
    let client = isthmus_core::xds::XdsClient {
        channel,
        node: isthmus_proto::discovery::Node {
            cluster: cluster.into(),
            role: "sidecar".into(),
            workload: format!("{namespace}/{name}"),
            ..Default::default()
        },
        types: vec![isthmus_proto::type_url::SERVICE],
        handler: recorder.clone(),
        health: None,
        certificate: None,
        peer_links: None,
        demand: None,
        first_config: None,
    };
    Ok((recorder, tokio::spawn(client.run())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_to_dot_hides_a_service_from_other_namespaces_in_every_cluster() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    let private = "apiVersion: v1\nkind: Service\nmetadata:\n  name: private\n  namespace: demo\n  annotations: {networking.istio.io/exportTo: .}\nspec:\n  selector: {app: private}\n  ports: [{name: http, port: 80}]\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: private, namespace: demo}\n";
    mesh.apply("east", "private.yaml", private).await?;
    mesh.apply(
        "east",
        "public.yaml",
        &isthmus_tests::service_yaml("public"),
    )
    .await?;
    let mut watchers = Vec::new();
    let mut tasks = Vec::new();
    for (cluster, ns) in [
        ("east", "demo"),
        ("east", "other"),
        ("west", "demo"),
        ("west", "other"),
    ] {
        let (rec, task) = pushed_services(&mut mesh, cluster, ns, "watcher").await?;
        watchers.push((cluster, ns, rec));
        tasks.push(task);
    }
    for (cluster, ns, rec) in &watchers {
        eventually(
            &format!("{ns} in {cluster} to see what it may"),
            Duration::from_secs(10),
            || async {
                let held = rec.0.lock().expect("lock").clone();
                anyhow::ensure!(held.contains("demo/public"), "{cluster}/{ns}: {held:?}");
                let sees_private = held.contains("demo/private");
                anyhow::ensure!(
                    sees_private == (*ns == "demo"),
                    "{cluster}/{ns} sees private: {sees_private}"
                );
                Ok(())
            },
        )
        .await?;
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_resource_limits_what_its_proxies_are_pushed() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.apply(
        "east",
        "public.yaml",
        &isthmus_tests::service_yaml("public"),
    )
    .await?;
    mesh.apply(
        "east",
        "internal.yaml",
        &isthmus_tests::service_yaml("internal"),
    )
    .await?;
    let sidecar = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\nspec:\n  egress:\n  - hosts: [./public.demo.svc.cluster.local]\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
    mesh.apply("east", "sidecar.yaml", sidecar).await?;
    let (demo, t1) = pushed_services(&mut mesh, "east", "demo", "watcher").await?;
    let (other, t2) = pushed_services(&mut mesh, "east", "other", "watcher").await?;
    let holds = |rec: &Recorder| rec.0.lock().expect("lock").clone();
    eventually(
        "each proxy to get its scope",
        Duration::from_secs(5),
        || async {
            let (d, o) = (holds(&demo), holds(&other));
            anyhow::ensure!(
                d.contains("demo/public") && !d.contains("demo/internal"),
                "demo: {d:?}"
            );
            anyhow::ensure!(
                o.contains("demo/public") && o.contains("demo/internal"),
                "other (no Sidecar): {o:?}"
            );
            Ok(())
        },
    )
    .await?;
    // The Sidecar goes: its proxies are pushed everything again.
    std::fs::remove_file(mesh.cluster("east").config_dir.join("sidecar.yaml"))?;
    eventually("the scope to lift", Duration::from_secs(5), || async {
        anyhow::ensure!(holds(&demo).contains("demo/internal"));
        Ok(())
    })
    .await?;
    t1.abort();
    t2.abort();
    Ok(())
}

/// Per service a proxy is pushed: (HTTP routes, subsets) of its routing.
#[derive(Default)]
struct Routes(std::sync::Mutex<std::collections::BTreeMap<String, (usize, usize)>>);

impl isthmus_core::xds::XdsHandler for Routes {
    fn apply(
        &self,
        _type_url: &str,
        updated: &[isthmus_proto::discovery::Resource],
        removed: &[String],
    ) -> Vec<isthmus_core::xds::Rejected> {
        use prost::Message;
        let mut held = self.0.lock().expect("lock");
        for r in updated {
            if let Ok(svc) = isthmus_proto::discovery::Service::decode(r.body.as_slice()) {
                let routing = svc.routing.unwrap_or_default();
                held.insert(r.name.clone(), (routing.http.len(), routing.subsets.len()));
            }
        }
        for r in removed {
            held.remove(r);
        }
        Vec::new()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_and_destination_rules_reach_only_the_namespaces_they_are_exported_to(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.apply("east", "echo.yaml", &isthmus_tests::service_yaml("echo"))
        .await?;
    // The VirtualService stays in its own namespace; the DestinationRule is for `other`.
    mesh.apply(
        "east",
        "routing.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  exportTo: [.]\n  http:\n  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: echo}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec:\n  host: echo\n  exportTo: [other]\n  subsets: [{name: v1, labels: {version: v1}}]\n",
    )
    .await?;
    let mut tasks = Vec::new();
    for (ns, expected) in [("demo", (1, 0)), ("other", (0, 1)), ("third", (0, 0))] {
        let (routes, task) = watch_services::<Routes>(&mut mesh, "east", ns, "watcher").await?;
        tasks.push(task);
        eventually(
            &format!("{ns}'s view of demo/echo"),
            Duration::from_secs(10),
            || async {
                let seen = routes.0.lock().expect("lock").get("demo/echo").copied();
                anyhow::ensure!(seen == Some(expected), "{ns} sees {seen:?}");
                Ok(())
            },
        )
        .await?;
    }
    // A bad exportTo rejects the object, named.
    let err = isthmus_core::config::load_files(&[isthmus_core::config::SourceFile {
        name: "bad.yaml".into(),
        contents: "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  exportTo: [Not_A_Namespace]\n  http: [{route: [{destination: {host: echo}}]}]\n".into(),
    }])
    .expect_err("invalid");
    assert!(err.to_string().contains("spec.exportTo"), "{err}");
    for t in tasks {
        t.abort();
    }
    Ok(())
}
