//! The Istio tasks in `deploy/examples/`, as a user would follow them: every file is valid
//! Isthmus config, and applying them verbatim behaves as the Istio task describes.

use std::time::Duration;

use isthmus_core::config::{load_files, SourceFile};
use isthmus_tests::{eventually, AppClient, Mesh};

const HOST: &str = "reviews.demo.svc.cluster.local";

fn example(name: &str) -> String {
    let path = format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: demo}
spec: {selector: {app: reviews}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec: {selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
"#;

#[test]
fn every_example_is_valid_config_in_every_api_version() {
    let dir = format!("{}/../deploy/examples", env!("CARGO_MANIFEST_DIR"));
    let files_in = |sub: &str| -> Vec<String> {
        std::fs::read_dir(format!("{dir}/{sub}"))
            .expect("examples folder")
            .filter_map(|e| {
                let e = e.ok()?;
                e.file_type().ok()?.is_file().then_some(())?;
                Some(format!("{sub}{}", e.file_name().into_string().ok()?))
            })
            .collect()
    };
    let mut names = files_in("");
    names.extend(files_in("security/"));
    names.extend(files_in("telemetry/"));
    names.sort();
    assert!(names.len() >= 22, "{names:?}");
    for name in names {
        let mut files = vec![SourceFile {
            name: "services.yaml".into(),
            contents: SERVICES.into(),
        }];
        // VirtualServices route to the subsets of the reviews DestinationRule.
        if example(&name).contains("kind: VirtualService") {
            files.push(SourceFile {
                name: "destination-rule-reviews.yaml".into(),
                contents: example("destination-rule-reviews.yaml"),
            });
        }
        // Telemetry resources name the providers of the telemetry mesh config.
        if name.starts_with("telemetry/") && !name.contains("mesh-config") {
            files.push(SourceFile {
                name: "mesh-config.yaml".into(),
                contents: example("telemetry/mesh-config-opentelemetry.yaml"),
            });
        }
        files.push(SourceFile {
            name: name.clone(),
            contents: example(&name),
        });
        // Istio publishes its tasks in each served version of networking.istio.io; every
        // one of them reads the same here.
        for version in ["v1", "v1beta1", "v1alpha3"] {
            let files: Vec<SourceFile> = files
                .iter()
                .map(|f| SourceFile {
                    name: f.name.clone(),
                    contents: f
                        .contents
                        .replace(
                            "networking.istio.io/v1\n",
                            &format!("networking.istio.io/{version}\n"),
                        )
                        // The security kinds are served at v1 and v1beta1.
                        .replace(
                            "security.istio.io/v1\n",
                            &format!(
                                "security.istio.io/{}\n",
                                if version == "v1alpha3" { "v1" } else { version }
                            ),
                        )
                        // Telemetry is served at v1 and v1alpha1.
                        .replace(
                            "telemetry.istio.io/v1\n",
                            &format!(
                                "telemetry.istio.io/{}\n",
                                if version == "v1" { "v1" } else { "v1alpha1" }
                            ),
                        ),
                })
                .collect();
            match load_files(&files) {
                Err(e) => panic!("{name} ({version}) is not valid:\n{e}"),
                // Every provider a Telemetry names exists.
                Ok(set) => assert!(
                    !set.warnings.iter().any(|w| w.field.contains("providers")),
                    "{name}: {:?}",
                    set.warnings
                ),
            }
        }
    }
}

/// Applies an example VirtualService and waits until the client has its `routes`.
async fn apply(mesh: &mut Mesh, file: &str, routes: usize) -> anyhow::Result<()> {
    mesh.apply("east", "virtual-service-reviews.yaml", &example(file))
        .await?;
    mesh.wait_routes("east", "productpage", HOST, routes).await
}

async fn get(
    outbound: std::net::SocketAddr,
    path: &str,
    user: Option<&str>,
) -> anyhow::Result<isthmus_tests::Reply> {
    let headers: Vec<(&str, &str)> = user.map(|u| vec![("end-user", u)]).unwrap_or_default();
    AppClient::new()
        .send(outbound, HOST, path, false, &headers)
        .await
}

async fn versions(
    outbound: std::net::SocketAddr,
    n: usize,
    user: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = get(outbound, "/", user).await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        out.push(r.answer()?.workload);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_traffic_tasks_behave_as_documented() -> anyhow::Result<()> {
    let (mut mesh, outbound) = Mesh::with_reviews(&["east"], "east", "productpage").await?;
    mesh.apply(
        "east",
        "destination-rule-reviews.yaml",
        &example("destination-rule-reviews.yaml"),
    )
    .await?;
    // Request routing: all v1, then jason on v2.
    apply(&mut mesh, "request-routing-all-v1.yaml", 1).await?;
    assert!(versions(outbound, 20, None)
        .await?
        .iter()
        .all(|v| v == "reviews-v1"));
    apply(&mut mesh, "request-routing-jason-v2.yaml", 2).await?;
    assert!(versions(outbound, 20, Some("jason"))
        .await?
        .iter()
        .all(|v| v == "reviews-v2"));
    assert!(versions(outbound, 20, None)
        .await?
        .iter()
        .all(|v| v == "reviews-v1"));

    // Fault injection: jason gets 500s; the others are served.
    apply(&mut mesh, "fault-injection-abort.yaml", 2).await?;
    // The route count did not change, so wait for the behaviour itself.
    eventually("jason to get 500s", Duration::from_secs(5), || async {
        let r = get(outbound, "/", Some("jason")).await?;
        let reason = r
            .headers
            .get("x-isthmus-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        anyhow::ensure!(
            r.status == 500 && reason.as_deref() == Some("fault-abort"),
            "{} {reason:?}",
            r.status
        );
        Ok(())
    })
    .await?;
    assert_eq!(get(outbound, "/", None).await?.status, 200);

    // Traffic shifting: both versions serve about half.
    apply(&mut mesh, "traffic-shifting-50-50.yaml", 1).await?;
    let v2 = versions(outbound, 100, None)
        .await?
        .iter()
        .filter(|v| *v == "reviews-v2")
        .count();
    assert!((25..=75).contains(&v2), "{v2} of 100 on v2");

    // Request timeouts: a slow request ends in 504 after half a second.
    apply(&mut mesh, "request-timeout.yaml", 1).await?;
    eventually(
        "a 504 after the timeout",
        Duration::from_secs(10),
        || async {
            let started = std::time::Instant::now();
            let r = get(outbound, "/delay/2000", None).await?;
            anyhow::ensure!(
                r.status == 504 && started.elapsed() < Duration::from_millis(1800),
                "{} after {:?}",
                r.status,
                started.elapsed()
            );
            Ok(())
        },
    )
    .await?;

    // Mirroring: the answers still all come from v1.
    apply(&mut mesh, "mirroring.yaml", 1).await?;
    eventually("answers from v1 only", Duration::from_secs(5), || async {
        anyhow::ensure!(versions(outbound, 10, None)
            .await?
            .iter()
            .all(|v| v == "reviews-v1"));
        Ok(())
    })
    .await?;

    // Circuit breaking: some of twenty concurrent slow requests overflow.
    mesh.apply(
        "east",
        "destination-rule-reviews.yaml",
        &example("circuit-breaking.yaml"),
    )
    .await?;
    eventually("overflow under load", Duration::from_secs(10), || async {
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async move { get(outbound, "/delay/300", None).await }))
            .collect();
        let mut overflow = 0;
        for c in calls {
            overflow += usize::from(c.await??.status == 503);
        }
        anyhow::ensure!(overflow >= 5, "{overflow} overflowed");
        Ok(())
    })
    .await?;
    Ok(())
}
