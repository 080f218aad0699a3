//! Clusters on Kubernetes: controllers that read a (stand-in) API server through a
//! kubeconfig, with Services, Pods and EndpointSlices written as a cluster writes them.

use std::time::Duration;

use isthmus_tests::{config_dump, eventually, settles_in, traffic, AppClient, Mesh};

const HOST: &str = "echo.demo.svc.cluster.local";

/// Which pod answers a request to `host` through `outbound`.
async fn answered_by(outbound: std::net::SocketAddr, host: &str) -> anyhow::Result<String> {
    let reply = AppClient::new().get(outbound, host, "/").await?;
    anyhow::ensure!(reply.status == 200, "status {}", reply.status);
    Ok(reply.answer()?.workload)
}

/// Waits until `n` requests in a row are answered only by `pods`.
async fn only(
    outbound: std::net::SocketAddr,
    pods: &[&str],
    within: Duration,
) -> anyhow::Result<()> {
    eventually(&format!("only {pods:?} answer"), within, || async {
        for _ in 0..20 {
            let by = answered_by(outbound, HOST).await?;
            anyhow::ensure!(pods.contains(&by.as_str()), "{by} answered");
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_endpoint_slices_are_what_proxies_route_to() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    for pod in ["echo-0", "echo-1"] {
        mesh.add_workload("west", pod, Some("echo"), "echo").await?;
    }
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    only(outbound, &["echo-0", "echo-1"], Duration::from_secs(5)).await?;
    // Both pods answer: the slice lists both as ready.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(answered_by(outbound, HOST).await?);
    }
    assert_eq!(seen.len(), 2, "both ready pods take traffic: {seen:?}");

    // Not ready (its readiness probe failed): the slice says so and the pod is left.
    let started = std::time::Instant::now();
    mesh.set_pod_ready("west", "echo-0", false).await?;
    only(outbound, &["echo-1"], Duration::from_secs(2)).await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Ready again, then the other pod deleted.
    mesh.set_pod_ready("west", "echo-0", true).await?;
    mesh.delete_pod("west", "echo-1").await?;
    only(outbound, &["echo-0"], Duration::from_secs(2)).await?;

    // The controller's view names the pod as Kubernetes does.
    let dump = config_dump(mesh.controller_admin("west")).await?;
    let echo = dump["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == "demo/echo"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(echo["endpoints"][0]["workload"], "demo/echo-0", "{echo}");
    assert_eq!(
        echo["endpoints"][0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_gets_410_gone_lists_again_and_loses_nothing() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    for pod in ["echo-0", "echo-1"] {
        mesh.add_workload("west", pod, Some("echo"), "echo").await?;
    }
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;

    // The controller's watches are cut and the history they would resume from is gone.
    // The change made meanwhile must still arrive: the watchers get 410 Gone, list again
    // and see it.
    let api = mesh.api("west");
    let before = api.watches();
    assert!(before >= 4, "the controller watches every kind: {before}");
    api.compact();
    api.break_watches();
    mesh.set_pod_ready("west", "echo-1", false).await?;
    only(outbound, &["echo-0"], Duration::from_secs(10)).await?;
    eventually(
        "the watches to be back",
        Duration::from_secs(10),
        || async {
            let now = mesh.clusters["west"]
                .kube
                .as_ref()
                .map_or(0, |a| a.watches());
            anyhow::ensure!(now >= before, "{now} of {before}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_service_exported_from_west_fails_over_to_eu_when_its_slice_empties(
) -> anyhow::Result<()> {
    // east and west on Kubernetes, eu on files: one registry model either way.
    let mut mesh = Mesh::start_with_kubernetes(&["east", "west", "eu"], &["east", "west"]).await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("eu", "echo-eu", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let host = "echo.demo.svc.clusterset.local";
    isthmus_tests::reachable(outbound, host).await?;
    let traffic = traffic(outbound, host);
    settles_in(&traffic, "west", 20, Duration::from_secs(10)).await?;

    // The only west pod stops being ready: west exports zero healthy endpoints.
    mesh.set_pod_ready("west", "echo-west", false).await?;
    settles_in(&traffic, "eu", 20, Duration::from_secs(10)).await?;
    mesh.set_pod_ready("west", "echo-west", true).await?;
    settles_in(&traffic, "west", 20, Duration::from_secs(10)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "no request may fail"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_are_read_from_custom_resources_and_a_bad_one_keeps_the_last_good(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    mesh.add_workload("west", "echo-0", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let client = AppClient::new();

    let teapot = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{uri: {prefix: /teapot}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: echo}}]\n  - route: [{destination: {host: echo}}]\n";
    mesh.kubectl_apply("west", teapot).await?;
    eventually(
        "the VirtualService to apply",
        Duration::from_secs(5),
        || async {
            let r = client.get(outbound, HOST, "/teapot").await?;
            anyhow::ensure!(r.status == 418, "status {}", r.status);
            Ok(())
        },
    )
    .await?;

    // A change with a fault is refused by name; the admitted version keeps serving.
    let bad = teapot.replace(
        "  - route: [{destination: {host: echo}}]\n",
        "  - route: [{destination: {host: echo}}]\n    retries: {attempts: three}\n",
    );
    mesh.kubectl_apply("west", &bad).await?;
    let admin = mesh.controller_admin("west");
    let errors = eventually("the rejection to show", Duration::from_secs(5), || async {
        let dump = config_dump(admin).await?;
        let errors = dump["config"]["last_errors"].to_string();
        anyhow::ensure!(errors.contains("retries.attempts"), "{errors}");
        Ok(errors)
    })
    .await?;
    assert!(
        errors.contains("virtualservices.networking.istio.io/demo/echo"),
        "the fault names the resource: {errors}"
    );
    assert_eq!(client.get(outbound, HOST, "/teapot").await?.status, 418);
    assert_eq!(client.get(outbound, HOST, "/").await?.status, 200);
    Ok(())
}
