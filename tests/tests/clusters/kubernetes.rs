//! Clusters on Kubernetes: controllers that read a (stand-in) API server through a
//! kubeconfig, with Services, Pods and EndpointSlices written as a cluster writes them.

use std::time::Duration;

use isthmus_tests::{config_dump, eventually, settles_in, traffic, AppClient, Mesh};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject};

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

/// West on Kubernetes with pods `echo-0` and `echo-1` behind Service `echo`, and a
/// `client` pod; returns the mesh and the client's outbound listener once echo answers.
async fn west_with_two_pods() -> anyhow::Result<(Mesh, std::net::SocketAddr)> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    for pod in ["echo-0", "echo-1"] {
        mesh.add_workload("west", pod, Some("echo"), "echo").await?;
    }
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    Ok((mesh, outbound))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_endpoint_slices_are_what_proxies_route_to() -> anyhow::Result<()> {
    let (mut mesh, outbound) = west_with_two_pods().await?;
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
    let (mut mesh, outbound) = west_with_two_pods().await?;

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

    // MCS: each cluster on Kubernetes imports what the others export.
    for (cluster, from) in [("east", vec!["eu", "west"]), ("west", vec!["eu"])] {
        let kube = mesh.api(cluster).client().await?;
        eventually(
            &format!("{cluster} to import echo"),
            Duration::from_secs(5),
            || async {
                let si = service_imports(kube.clone()).get("echo").await?;
                let clusters: Vec<&str> = si.data["status"]["clusters"]
                    .as_array()
                    .map(|c| c.iter().filter_map(|c| c["cluster"].as_str()).collect())
                    .unwrap_or_default();
                anyhow::ensure!(clusters == from, "{cluster} imports from {clusters:?}");
                let ports: Vec<&str> = si.data["spec"]["ports"]
                    .as_array()
                    .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
                    .unwrap_or_default();
                anyhow::ensure!(ports == ["http", "grpc", "tcp-echo"], "{ports:?}");
                Ok(())
            },
        )
        .await?;
    }

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
async fn virtual_services_come_from_custom_resources_and_bad_ones_are_refused_where_users_look(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    mesh.add_workload("west", "echo-0", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let client = AppClient::new();

    // Written at v1beta1, as many Istio users still write it; the controller reads v1.
    let teapot = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{uri: {prefix: /teapot}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: echo}}]\n  - route: [{destination: {host: echo}}]\n";
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

    // The webhook refuses a bad change at `kubectl apply`, with the faults `isthmus
    // validate` prints for the same manifest.
    let bad = teapot.replace(
        "  - route: [{destination: {host: echo}}]\n",
        "  - route: [{destination: {host: echo}}]\n    retries: {attempts: three}\n",
    );
    let refused = mesh
        .kubectl_apply("west", &bad)
        .await
        .expect_err("the webhook refuses it");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("admission webhook \"validation.isthmus.io\" denied the request"),
        "{refused}"
    );
    let validated = isthmus_core::config::load_files(&[isthmus_core::config::SourceFile {
        name: "echo.yaml".into(),
        contents: bad.clone(),
    }])
    .expect_err("isthmus validate refuses it too");
    for e in &validated.0 {
        let line = format!(
            "{}: {}: {} [{}]",
            e.object.as_deref().unwrap_or_default(),
            e.field,
            e.message,
            e.code.as_str()
        );
        assert!(refused.contains(&line), "`{line}` not in {refused}");
    }
    assert_eq!(client.get(outbound, HOST, "/teapot").await?.status, 418);

    // Without the webhook (not installed, or the change made while it was down) the bad
    // change is stored; the controller refuses it by name and the admitted version keeps
    // serving.
    let kube = mesh.api("west").client().await?;
    Api::<ValidatingWebhookConfiguration>::all(kube.clone())
        .delete(
            isthmus_controller::WEBHOOK_CONFIGURATION,
            &Default::default(),
        )
        .await?;
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

    // Where a Kubernetes user looks: the object's status and an Event.
    let status = eventually("the status to say rejected", Duration::from_secs(5), || {
        let kube = kube.clone();
        async move {
            let vs = virtual_services(kube).get("echo").await?;
            let status = vs.data["status"].clone();
            anyhow::ensure!(status["conditions"][0]["status"] == "False", "{status}");
            Ok(status)
        }
    })
    .await?;
    let condition = &status["conditions"][0];
    assert_eq!(condition["reason"], "Rejected");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.http[1].retries.attempts")),
        "{condition}"
    );
    assert_eq!(status["validationMessages"][0]["type"]["code"], "IST0106");
    let events = Api::<Event>::namespaced(kube.clone(), "demo")
        .list(&Default::default())
        .await?;
    let rejected: Vec<&Event> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Rejected"))
        .collect();
    assert_eq!(
        rejected.len(),
        1,
        "one Event for the rejection: {rejected:?}"
    );
    assert_eq!(
        rejected[0].involved_object.kind.as_deref(),
        Some("VirtualService")
    );
    assert_eq!(rejected[0].type_.as_deref(), Some("Warning"));

    // Fixed: accepted again, and the new version serves.
    mesh.kubectl_apply("west", &teapot.replace("/teapot", "/kettle"))
        .await?;
    eventually("the fix to apply", Duration::from_secs(5), || async {
        anyhow::ensure!(client.get(outbound, HOST, "/kettle").await?.status == 418);
        let vs = virtual_services(kube.clone()).get("echo").await?;
        anyhow::ensure!(vs.data["status"]["conditions"][0]["status"] == "True");
        Ok(())
    })
    .await?;

    // A bad object that was never admitted does not serve at all.
    let broken = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo}}]\n    timeout: soon\n";
    mesh.kubectl_apply("west", broken).await?;
    eventually(
        "the new object to be rejected",
        Duration::from_secs(5),
        || async {
            let vs = virtual_services(kube.clone()).get("broken").await?;
            anyhow::ensure!(vs.data["status"]["conditions"][0]["status"] == "False");
            Ok(())
        },
    )
    .await?;
    assert_eq!(client.get(outbound, HOST, "/kettle").await?.status, 418);
    Ok(())
}

fn service_imports(client: kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client, "demo", &isthmus_kubernetes::imports::api_resource())
}

fn virtual_services(client: kube::Client) -> Api<DynamicObject> {
    let kind = isthmus_kubernetes::MESH_KINDS[0];
    Api::namespaced_with(client, "demo", &kind.api_resource())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_token_proves_its_own_service_account_and_nothing_else() -> anyhow::Result<()> {
    use isthmus_core::ca_client::Token;
    use isthmus_core::identity::SpiffeId;
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    let audience = isthmus_kubernetes::identity::CA_AUDIENCE;
    let hour = Duration::from_secs(3600);
    let api = mesh.api("west");
    let good = api
        .token_issuer()
        .token("demo", "reviews", "reviews-0", audience, hour);
    let expired =
        api.token_issuer()
            .token("demo", "reviews", "reviews-0", audience, Duration::ZERO);
    let elsewhere = api
        .token_issuer()
        .token("demo", "reviews", "reviews-0", "vault", hour);
    let mut forged = good.clone();
    forged.pop();
    forged.push(if good.ends_with('A') { 'B' } else { 'A' });
    // A bootstrap-token client for the same CA, re-pointed at each case.
    let base = mesh.ca_client("west", "west", "reviews", "reviews")?;
    let asking = |token: &str, sa: &str| {
        let mut c = base.clone();
        c.token = Some(Token::Inline(token.to_owned()));
        c.identity = SpiffeId::new("cluster.local", "demo", sa);
        c
    };

    let creds = asking(&good, "reviews").fetch(None).await?;
    assert_eq!(
        creds.id.to_string(),
        "spiffe://cluster.local/ns/demo/sa/reviews"
    );

    let refusal = |r: Result<_, isthmus_core::ca_client::CaClientError>| match r {
        Err(isthmus_core::ca_client::CaClientError::Refused { status, .. }) => {
            (status.code(), status.message().to_owned())
        }
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("issued"),
    };
    let (code, message) = refusal(asking(&good, "admin").fetch(None).await);
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("sa/reviews"), "{message}");
    let (code, message) = refusal(asking(&expired, "reviews").fetch(None).await);
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(message.contains("expired"), "{message}");
    let (code, message) = refusal(asking(&elsewhere, "reviews").fetch(None).await);
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(message.contains("audience"), "{message}");
    let (code, _) = refusal(asking(&forged, "reviews").fetch(None).await);
    assert_eq!(code, tonic::Code::Unauthenticated);

    // Bootstrap tokens still serve hosts outside Kubernetes.
    base.fetch(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_rereads_its_token_when_the_kubelet_rotates_it() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    // The pod starts with a token that has already expired; the kubelet rotates it 1.5 s
    // later. The sidecar gets its certificate only by reading the file again.
    let path = mesh.token_path("west", "echo-0");
    std::fs::create_dir_all(path.parent().expect("a folder"))?;
    let issuer = mesh.api("west").token_issuer();
    let audience = isthmus_kubernetes::identity::CA_AUDIENCE;
    std::fs::write(
        &path,
        issuer.token("demo", "echo", "echo-0", audience, Duration::ZERO),
    )?;
    let rotate = tokio::spawn({
        let path = path.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let fresh = issuer.token(
                "demo",
                "echo",
                "echo-0",
                audience,
                Duration::from_secs(3600),
            );
            std::fs::write(&path, fresh)
        }
    });
    mesh.add_workload("west", "echo-0", Some("echo"), "echo")
        .await?;
    rotate.await??;
    let refused = isthmus_tests::metric_sum(
        mesh.controller_admin("west"),
        "isthmus_controller_ca_certificate_requests_total",
        &[("outcome", "unauthenticated")],
    )
    .await?;
    assert!(
        refused >= 1.0,
        "the expired token was tried and refused first"
    );
    mesh.add_workload("west", "client", None, "client").await?;
    isthmus_tests::reachable(mesh.workload("west", "client").outbound(), HOST).await?;
    Ok(())
}

/// The controllers' Lease holder.
async fn lease_holder(client: &kube::Client) -> anyhow::Result<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), "isthmus-system")
        .get("isthmus-controller")
        .await?;
    Ok(lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

/// Applies a VirtualService `name` that admission rejects to west, and waits until a
/// controller wrote its rejection into its status.
async fn rejected_in_status(mesh: &mut Mesh, name: &str) -> anyhow::Result<()> {
    rejected_in(mesh, "west", name).await
}

/// [`rejected_in_status`] in `cluster`.
async fn rejected_in(mesh: &mut Mesh, cluster: &str, name: &str) -> anyhow::Result<()> {
    let bad = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  hosts: [echo]\n  http:\n  - route: [{{destination: {{host: echo}}}}]\n    timeout: soon\n");
    mesh.kubectl_apply(cluster, &bad).await?;
    let kube = mesh.api(cluster).client().await?;
    eventually(
        &format!("{name} to be marked rejected"),
        Duration::from_secs(5),
        || async {
            let vs = virtual_services(kube.clone()).get(name).await?;
            anyhow::ensure!(vs.data["status"]["conditions"][0]["status"] == "False");
            Ok(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controller_replicas_elect_one_writer_and_the_other_takes_over() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    let kube = mesh.api("west").client().await?;
    eventually("a leader", Duration::from_secs(5), || async {
        let holder = lease_holder(&kube).await?;
        anyhow::ensure!(holder == "west-controller-0", "{holder}");
        Ok(())
    })
    .await?;
    let replica = mesh.start_controller_replica("west", 4).await?;
    let leader_metric = |admin| async move {
        isthmus_tests::metric_sum(admin, "isthmus_controller_leader", &[]).await
    };
    // The second replica serves, but follows: the Lease stays with the first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lease_holder(&kube).await?, "west-controller-0");
    assert_eq!(leader_metric(replica.admin_address).await?, 0.0);
    assert_eq!(leader_metric(mesh.controller_admin("west")).await?, 1.0);

    // The webhook would refuse what follows before any controller saw it.
    Api::<ValidatingWebhookConfiguration>::all(kube.clone())
        .delete(
            isthmus_controller::WEBHOOK_CONFIGURATION,
            &Default::default(),
        )
        .await?;
    rejected_in_status(&mut mesh, "first").await?;

    // The leader dies: the follower takes the Lease once it expires, and writes from then on.
    mesh.kill_controller("west");
    let killed = std::time::Instant::now();
    eventually(
        "the follower to take over",
        Duration::from_secs(6),
        || async {
            anyhow::ensure!(leader_metric(replica.admin_address).await? == 1.0);
            Ok(())
        },
    )
    .await?;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "not before the Lease expired: {took:?}"
    );
    assert_eq!(lease_holder(&kube).await?, "west-controller-4");
    rejected_in_status(&mut mesh, "second").await?;
    // Only the leader of the moment wrote statuses (the audit log says who wrote what).
    let writers = |name: &str| {
        let mut users: Vec<String> = mesh.clusters["west"]
            .kube
            .as_ref()
            .map(|api| api.requests())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| {
                a.name == name && a.subresource.as_deref() == Some("status") && a.code < 300
            })
            .map(|a| a.credential)
            .collect();
        users.dedup();
        users
    };
    assert_eq!(writers("first"), vec!["west-controller-0".to_owned()]);
    assert_eq!(writers("second"), vec!["west-controller-4".to_owned()]);
    // One Event per rejection: the new leader does not report `first` again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = Api::<Event>::namespaced(kube, "demo")
        .list(&Default::default())
        .await?;
    for name in ["first", "second"] {
        let n = events
            .items
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .count();
        assert_eq!(n, 1, "Events for {name}");
    }
    replica.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_lead_writes_no_status() -> anyhow::Result<()> {
    use isthmus_core::config::{Code, ConfigError};
    use isthmus_kubernetes::status::{run, Outcome};
    let dir = tempfile::tempdir()?;
    let api = isthmus_tests::apiserver::ApiServer::start(
        isthmus_tests::fresh_ip(1, 3),
        &isthmus_tests::apiserver::builtin(),
        dir.path(),
    )
    .await?;
    let client = api.client().await?;
    for crd in isthmus_kubernetes::crds::all() {
        Api::<CustomResourceDefinition>::all(client.clone())
            .create(&Default::default(), &crd)
            .await?;
    }
    let kind = isthmus_kubernetes::MESH_KINDS[0];
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "echo", "namespace": "demo"}, "spec": {"hosts": ["echo"]},
    }))?;
    let obj = virtual_services(client.clone())
        .create(&Default::default(), &obj)
        .await?;
    let fault = ConfigError {
        file: isthmus_kubernetes::source_of(&kind, &obj),
        document: 1,
        object: Some("VirtualService demo/echo".into()),
        field: "spec.http".into(),
        code: Code::Missing,
        message: "routes are required".into(),
    };
    let (outcomes, rx) = tokio::sync::watch::channel(std::sync::Arc::new(Outcome::default()));
    let (leading, leader) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(run(client.clone(), rx, leader));
    outcomes.send_replace(std::sync::Arc::new(Outcome {
        objects: vec![(kind, std::sync::Arc::new(obj))],
        faults: vec![fault],
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status_writes = || {
        api.requests()
            .into_iter()
            .filter(|a| a.subresource.as_deref() == Some("status") && a.code < 300)
            .count()
    };
    assert_eq!(status_writes(), 0, "a follower writes nothing");
    leading.send_replace(true);
    eventually("the leader to write", Duration::from_secs(5), || async {
        anyhow::ensure!(status_writes() == 1);
        Ok(())
    })
    .await?;
    writer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_rbac_covers_exactly_what_the_controller_calls() -> anyhow::Result<()> {
    // The harness installs from `isthmus install kubernetes` and runs the controller as its
    // service account, under RBAC. One object of every mesh kind, a rejection, a pod
    // proving itself with a projected token, and a service of another cluster imported,
    // changed and withdrawn make it use every permission.
    let mut mesh = Mesh::start_with_kubernetes(&["east", "west"], &["east"]).await?;
    for pod in ["echo-0", "echo-1"] {
        mesh.add_workload("east", pod, Some("echo"), "echo").await?;
    }
    mesh.add_workload("east", "client", None, "client").await?;
    mesh.add_workload("west", "other-0", Some("other"), "other")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let kube = mesh.api("east").client().await?;
    let imported = |ports: usize| {
        let kube = kube.clone();
        async move {
            let si = service_imports(kube).get_opt("other").await?;
            let n = si.map(|s| s.data["spec"]["ports"].as_array().map_or(0, Vec::len));
            anyhow::ensure!(n == Some(ports).filter(|p| *p > 0), "{n:?}");
            Ok(())
        }
    };
    eventually("east to import other", Duration::from_secs(5), || {
        imported(3)
    })
    .await?;
    let one_port = "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo}\nspec:\n  selector: {app: other}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    let export = "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: other, namespace: demo}\n";
    mesh.apply("west", "service-other.yaml", &format!("{one_port}{export}"))
        .await?;
    eventually("the import to follow", Duration::from_secs(5), || {
        imported(1)
    })
    .await?;
    mesh.apply("west", "service-other.yaml", one_port).await?;
    eventually("the import to go", Duration::from_secs(5), || imported(0)).await?;

    let objects = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo, namespace: demo}\nspec: {host: echo}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api, namespace: demo}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: demo}\nspec: {address: 10.0.0.9, labels: {app: vm}}\n---\napiVersion: isthmus.io/v1alpha1\nkind: LocalRateLimit\nmetadata: {name: echo, namespace: demo}\nspec: {targetRef: {kind: Service, name: echo}, tokensPerInterval: 100, interval: 1s}\n---\napiVersion: isthmus.io/v1alpha1\nkind: GlobalRateLimit\nmetadata: {name: echo, namespace: demo}\nspec: {targetRef: {kind: Service, name: echo}, requestsPerSecond: 1000}\n---\napiVersion: isthmus.io/v1alpha1\nkind: HealthCheck\nmetadata: {name: echo, namespace: demo}\nspec: {targetRef: {kind: Service, name: echo}, tcp: {}}\n---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: none, namespace: demo}\nspec: {selector: {matchLabels: {app: nothing}}, url: /plugins/none.wasm}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - route: [{destination: {host: echo}}]\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n---\napiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: demo}\nspec: {rules: [{}]}\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: demo}\nspec:\n  jwtRules: [{issuer: a, jwks: '{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"a\", \"y\": \"b\"}]}'}]\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: default, namespace: demo}\nspec:\n  accessLogging: [{providers: [{name: envoy}]}]\n";
    mesh.kubectl_apply("east", objects).await?;
    Api::<ValidatingWebhookConfiguration>::all(kube.clone())
        .delete(
            isthmus_controller::WEBHOOK_CONFIGURATION,
            &Default::default(),
        )
        .await?;
    rejected_in(&mut mesh, "east", "broken").await?;
    isthmus_tests::reachable(outbound, HOST).await?;
    // A root rotation changes the trust bundle, which the controller rewrites in every
    // namespace's isthmus-ca-root-cert.
    isthmus::operator::Operator {
        federation: mesh.federation_addr,
        state_dir: mesh.fed_state.clone(),
        trust_domain: isthmus_tests::TRUST_DOMAIN.into(),
    }
    .ask(&isthmus::operator::Ask::Start(None))
    .await?;

    let controller = |a: &isthmus_tests::apiserver::Access| {
        a.user == "system:serviceaccount:isthmus-system:isthmus-controller"
    };
    let granted = |rules: Vec<isthmus_kubernetes::install::Rule>| {
        rules
            .into_iter()
            .flat_map(|r| {
                r.api_groups
                    .iter()
                    .flat_map(|g| {
                        r.resources.iter().flat_map(|res| {
                            r.verbs
                                .iter()
                                .map(|v| (g.clone(), res.clone(), v.to_string()))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mut granted_all = granted(isthmus_kubernetes::install::controller_rules());
    granted_all.extend(granted(isthmus_kubernetes::install::lease_rules()));
    let used = eventually(
        "every permission to be used",
        Duration::from_secs(10),
        || async {
            let requests = mesh.clusters["east"]
                .kube
                .as_ref()
                .map(|api| api.requests())
                .unwrap_or_default();
            let refused: Vec<_> = requests
                .iter()
                .filter(|a| controller(a) && a.code == 403)
                .collect();
            anyhow::ensure!(
                refused.is_empty(),
                "the controller was refused: {refused:?}"
            );
            let used: std::collections::BTreeSet<(String, String, String)> = requests
                .iter()
                .filter(|a| controller(a) && a.code < 300)
                .map(|a| {
                    let resource = match &a.subresource {
                        Some(sub) => format!("{}/{sub}", a.resource),
                        None => a.resource.clone(),
                    };
                    (a.group.clone(), resource, a.verb.to_string())
                })
                .collect();
            let unused: Vec<_> = granted_all.difference(&used).collect();
            anyhow::ensure!(unused.is_empty(), "granted but never used: {unused:?}");
            Ok(used)
        },
    )
    .await?;
    assert_eq!(used, granted_all, "used exactly what it is granted");

    // And nothing else: the controller's account cannot read Secrets.
    let as_controller =
        isthmus_kubernetes::client(Some(&mesh.controller_kubeconfig("east", 9)?)).await?;
    let secrets =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(as_controller, "isthmus-system")
            .list(&Default::default())
            .await;
    match secrets {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("reading Secrets must be forbidden: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pods_of_labelled_namespaces_get_the_sidecar_and_capture_and_others_do_not(
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    mesh.kubectl_apply(
        "west",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n",
    )
    .await?;
    // A Deployment's pod, as kube-controller-manager creates it from the template.
    let pod = |name: &str, ns: &str, labels: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: reviews{labels}}}\n  annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: \"5432\"}}\nspec:\n  serviceAccountName: reviews\n  containers:\n  - name: app\n    image: reviews:1\n    ports: [{{containerPort: 9080}}]\n")
    };
    // The injector answers once the leader has published its CA bundle.
    let started = std::time::Instant::now();
    while let Err(e) = mesh
        .kubectl_apply("west", &pod("reviews-1", "shop", ""))
        .await
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the injector never answered: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kube = mesh.api("west").client().await?;
    let get = |ns: &str, name: &str| {
        let api: Api<Pod> = Api::namespaced(kube.clone(), ns);
        let name = name.to_owned();
        async move { api.get(&name).await }
    };
    let injected = get("shop", "reviews-1").await?;
    let spec = injected.spec.clone().unwrap_or_default();
    let inits: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["isthmus-init", "isthmus-proxy"]);
    let init = &spec.init_containers.as_ref().expect("inits")[0];
    assert_eq!(init.args.as_ref().expect("args")[0], "iptables");
    assert!(init
        .args
        .iter()
        .flatten()
        .any(|a| a == "--exclude-outbound-ports=5432"));
    let proxy = &spec.init_containers.as_ref().expect("inits")[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let args = proxy.args.clone().unwrap_or_default();
    for want in [
        "--cluster=west",
        "--service-account=reviews",
        "--controller=isthmus-controller.isthmus-system.svc:15012",
        "--app=127.0.0.1:9080",
        "--root=/var/run/isthmus/root/root-cert.pem",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    let root = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "ISTHMUS_ROOT_PEM")
        .and_then(|e| e.value.clone());
    assert_eq!(
        root.as_deref(),
        Some(mesh.bundle_pem.as_str()),
        "the mesh root, inline"
    );

    // Opted out by label, or in a namespace not labelled: left as they were.
    mesh.kubectl_apply(
        "west",
        &pod("reviews-2", "shop", ", sidecar.istio.io/inject: \"false\""),
    )
    .await?;
    mesh.kubectl_apply("west", &pod("reviews-3", "demo", ""))
        .await?;
    for (ns, name) in [("shop", "reviews-2"), ("demo", "reviews-3")] {
        let p = get(ns, name).await?;
        assert!(
            p.spec.and_then(|s| s.init_containers).is_none(),
            "{ns}/{name} was injected"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_s_mesh_config_map_names_the_external_authorization_providers() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start_with_kubernetes(&["west"], &["west"]).await?;
    mesh.add_workload("west", "echo-0", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "client", None, "client").await?;
    let outbound = mesh.workload("west", "client").outbound();
    isthmus_tests::reachable(outbound, HOST).await?;
    let client = AppClient::new();
    let status_of = |path: &'static str, want: u16| {
        let client = client.clone();
        eventually(path, Duration::from_secs(10), move || {
            let client = client.clone();
            async move {
                let got = client.get(outbound, HOST, path).await?.status;
                anyhow::ensure!(got == want, "{path}: got {got}, want {want}");
                Ok(())
            }
        })
    };
    // A CUSTOM policy whose provider the mesh config does not have denies what it matches.
    mesh.kubectl_apply("west", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: demo}\nspec:\n  selector: {matchLabels: {app: echo}}\n  action: CUSTOM\n  provider: {name: echo-as-authz}\n  rules: [{to: [{operation: {paths: [/checked]}}]}]\n").await?;
    status_of("/checked", 403).await?;
    status_of("/", 200).await?;
    // Istio's ConfigMap declares it: an HTTP provider (the echo app, which answers 200 to
    // anything) allows. Its checks go to /authz/..., which the policy does not match (a
    // provider that a policy sends back to itself would ask itself forever).
    let mesh_config = |port: u16| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    extensionProviders:\n    - name: echo-as-authz\n      envoyExtAuthzHttp:\n        service: echo.demo.svc.cluster.local\n        port: {port}\n        pathPrefix: /authz\n        statusOnError: \"503\"\n")
    };
    mesh.kubectl_apply("west", &mesh_config(80)).await?;
    status_of("/checked", 200).await?;
    // Changed to a port the provider's service lacks: the check fails, statusOnError.
    mesh.kubectl_apply("west", &mesh_config(81)).await?;
    status_of("/checked", 503).await?;
    status_of("/", 200).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_holds_the_current_trust_bundle_through_a_root_rotation(
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut mesh = Mesh::start_with_kubernetes(&["east"], &["east"]).await?;
    mesh.kubectl_apply(
        "east",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    )
    .await?;
    let kube = mesh.api("east").client().await?;
    let bundle_in = |ns: &'static str| {
        let kube = kube.clone();
        async move {
            let cm = Api::<ConfigMap>::namespaced(kube, ns)
                .get_opt(isthmus_kubernetes::root_cert::CONFIGMAP)
                .await?;
            let pem = cm
                .and_then(|c| c.data)
                .and_then(|d| d.get(isthmus_kubernetes::root_cert::KEY).cloned())
                .unwrap_or_default();
            anyhow::Ok(isthmus_core::tls::bundle::fingerprints(&pem))
        }
    };
    let old = isthmus_core::tls::bundle::fingerprints(&mesh.bundle_pem);
    // A namespace created after the controller started gets it at the next resync; the
    // controller's own namespace at once.
    eventually(
        "the bundle in isthmus-system",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(bundle_in("isthmus-system").await? == old);
            Ok(())
        },
    )
    .await?;
    let operator = isthmus::operator::Operator {
        federation: mesh.federation_addr,
        state_dir: mesh.fed_state.clone(),
        trust_domain: isthmus_tests::TRUST_DOMAIN.into(),
    };
    let started = operator.ask(&isthmus::operator::Ask::Start(None)).await?;
    let both = vec![old[0].clone(), started.to_root.clone()];
    eventually(
        "both roots in every namespace",
        Duration::from_secs(40),
        || async {
            for ns in ["isthmus-system", "shop"] {
                anyhow::ensure!(bundle_in(ns).await? == both, "{ns}");
            }
            Ok(())
        },
    )
    .await?;
    operator
        .rotate(
            isthmus::operator::Ask::Start(None),
            true,
            Duration::from_secs(60),
        )
        .await?;
    eventually("only the new root", Duration::from_secs(10), || async {
        for ns in ["isthmus-system", "shop"] {
            anyhow::ensure!(bundle_in(ns).await? == [started.to_root.clone()], "{ns}");
        }
        Ok(())
    })
    .await?;
    Ok(())
}
