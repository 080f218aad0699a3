//! Istio traffic management through real sidecars: VirtualService matches, weighted
//! splits over DestinationRule subsets, faults, timeouts, retries, redirects, direct
//! responses, rewrites and header operations — what a user of Istio's tasks observes.

use std::time::{Duration, Instant};

use isthmus_tests::{eventually, AppClient, Mesh};

const HOST: &str = "reviews.demo.svc.cluster.local";

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// `reviews` with a v1 and a v2 workload in east, a client, and the DestinationRule.
async fn reviews() -> anyhow::Result<(Mesh, std::net::SocketAddr)> {
    let (mut mesh, outbound) = Mesh::with_reviews(&["east"], "east", "client").await?;
    mesh.apply("east", "reviews-dr.yaml", SUBSETS).await?;
    isthmus_tests::reachable(outbound, HOST).await?;
    Ok((mesh, outbound))
}

fn virtual_service(http: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  hosts: [reviews]\n  http:\n{http}")
}

async fn workloads(
    outbound: std::net::SocketAddr,
    n: usize,
    headers: &[(&str, &str)],
) -> anyhow::Result<Vec<String>> {
    let client = AppClient::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = client.send(outbound, HOST, "/", false, headers).await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        out.push(r.answer()?.workload);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_20_split_sends_about_a_fifth_to_v2() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service(
        "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v2}\n      weight: 20\n",
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    let landed = workloads(outbound, 400, &[]).await?;
    let v2 = landed.iter().filter(|w| *w == "reviews-v2").count();
    // Binomial(400, 0.2): mean 80, sd 8; 52..108 is 3.5 sd either way.
    assert!((52..=108).contains(&v2), "{v2} of 400 went to v2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_match_sends_only_that_user_to_v2() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service(
        "  - match:\n    - headers: {end-user: {exact: jason}}\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 2).await?;
    assert!(workloads(outbound, 30, &[("end-user", "jason")])
        .await?
        .iter()
        .all(|w| w == "reviews-v2"));
    assert!(workloads(outbound, 30, &[("end-user", "jane")])
        .await?
        .iter()
        .all(|w| w == "reviews-v1"));
    assert!(workloads(outbound, 30, &[])
        .await?
        .iter()
        .all(|w| w == "reviews-v1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_longer_than_the_route_timeout_gives_504_after_the_timeout() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service(
        "  - fault:\n      delay: {fixedDelay: 3s, percentage: {value: 100}}\n    timeout: 0.5s\n    route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    let started = Instant::now();
    let r = AppClient::new().get(outbound, HOST, "/").await?;
    let took = started.elapsed();
    // The route timeout counts the injected delay: 504 after about the timeout, not the delay.
    assert_eq!(r.status, 504, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.headers
            .get("x-isthmus-error")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("timeout")
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "took {took:?}"
    );

    // A slow upstream (no fault) is cut at the route timeout.
    let vs = virtual_service(
        "  - timeout: 0.5s\n    route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    eventually(
        "the timeout to cut a slow upstream",
        Duration::from_secs(10),
        || async {
            let started = Instant::now();
            let r = AppClient::new().get(outbound, HOST, "/delay/3000").await?;
            let took = started.elapsed();
            anyhow::ensure!(
                r.status == 504 && took < Duration::from_millis(2000),
                "status {} after {took:?}",
                r.status
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_fault_at_50_percent_fails_about_half() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service(
        "  - fault:\n      abort: {httpStatus: 503, percentage: {value: 50}}\n    route:\n    - destination: {host: reviews, subset: v1}\n",
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    let client = AppClient::new();
    let mut aborted = 0;
    for _ in 0..200 {
        let r = client.get(outbound, HOST, "/").await?;
        if r.status == 503 {
            assert_eq!(
                r.headers
                    .get("x-isthmus-error")
                    .map(|v| v.to_str().unwrap_or_default()),
                Some("fault-abort")
            );
            aborted += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    // Binomial(200, 0.5): sd 7; 65..135 is 5 sd either way.
    assert!((65..=135).contains(&aborted), "{aborted} of 200 aborted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_make_a_flaky_upstream_succeed() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = |retries: &str| {
        virtual_service(&format!(
            "  - route:\n    - destination: {{host: reviews, subset: v1}}\n{retries}"
        ))
    };
    mesh.apply("east", "reviews-vs.yaml", &vs("")).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    let client = AppClient::new();
    let mut failed = 0;
    for _ in 0..20 {
        failed += usize::from(client.get(outbound, HOST, "/flaky").await?.status == 503);
    }
    assert!(
        failed >= 8,
        "the upstream fails every other request without retries ({failed} of 20)"
    );

    mesh.apply(
        "east",
        "reviews-vs.yaml",
        &vs("    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}\n"),
    )
    .await?;
    eventually("retries to apply", Duration::from_secs(5), || async {
        for _ in 0..20 {
            let r = client.get(outbound, HOST, "/flaky").await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
        }
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_responses_redirects_rewrites_and_header_operations() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service(concat!(
        "  - match: [{uri: {exact: /teapot}}]\n    directResponse: {status: 418, body: {string: short and stout}}\n",
        "  - match: [{uri: {prefix: /old}}]\n    redirect: {uri: /new, redirectCode: 302}\n",
        "  - match: [{uri: {prefix: /v1/api}, method: {exact: GET}}]\n    rewrite: {uri: /api}\n",
        "    headers:\n      request: {set: {x-route: api}, remove: [x-drop-me]}\n      response: {set: {x-served-by: mesh}}\n",
        "    route:\n    - destination: {host: reviews, subset: v2}\n",
        "  - route:\n    - destination: {host: reviews, subset: v1}\n",
    ));
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 4).await?;
    let client = AppClient::new();

    let r = client.get(outbound, HOST, "/teapot").await?;
    assert_eq!(
        (r.status.as_u16(), String::from_utf8_lossy(&r.body).as_ref()),
        (418, "short and stout")
    );

    let r = client.get(outbound, HOST, "/old/page").await?;
    assert_eq!(r.status, 302);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("http://{HOST}/new").as_str())
    );

    let r = client
        .send(
            outbound,
            HOST,
            "/v1/api/items?page=2",
            false,
            &[("x-drop-me", "1")],
        )
        .await?;
    assert_eq!(
        r.headers.get("x-served-by").and_then(|v| v.to_str().ok()),
        Some("mesh")
    );
    let a = r.answer()?;
    assert_eq!(
        (a.workload.as_str(), a.path.as_str()),
        ("reviews-v2", "/api/items?page=2")
    );
    assert_eq!(a.headers.get("x-route").map(String::as_str), Some("api"));
    assert!(!a.headers.contains_key("x-drop-me"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_abort_reaches_grpc_clients_as_their_status() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service("  - fault:\n      abort: {grpcStatus: RESOURCE_EXHAUSTED}\n    route:\n    - destination: {host: reviews, subset: v1}\n");
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
        .origin(format!("http://{HOST}:9090").parse()?)
        .connect()
        .await?;
    let status = isthmus_proto::echo::echo_client::EchoClient::new(channel)
        .say(isthmus_proto::echo::EchoRequest {
            message: "hi".into(),
        })
        .await
        .expect_err("aborted");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_delivers_a_copy_and_ignores_its_response() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let vs = virtual_service("  - route:\n    - destination: {host: reviews, subset: v1}\n    mirror: {host: reviews, subset: v2}\n    mirrorPercentage: {value: 100}\n");
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    assert!(
        workloads(outbound, 20, &[])
            .await?
            .iter()
            .all(|w| w == "reviews-v1"),
        "answers come from the primary only"
    );
    let v2_admin = mesh
        .workload("east", "reviews-v2")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let shadow = [
        ("reporter", "destination"),
        (
            "destination_service",
            "reviews.demo.svc.cluster.local-shadow",
        ),
    ];
    eventually(
        "v2 to receive the copies",
        Duration::from_secs(5),
        || async {
            let n = isthmus_tests::metric_sum(v2_admin, "istio_requests_total", &shadow).await?;
            anyhow::ensure!(n >= 20.0, "{n} copies");
            Ok(())
        },
    )
    .await?;

    // The mirror failing changes nothing for the caller.
    mesh.kill_app("east", "reviews-v2");
    assert!(workloads(outbound, 20, &[])
        .await?
        .iter()
        .all(|w| w == "reviews-v1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_pins_a_key_to_one_endpoint() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {httpHeaderName: x-user}\n";
    mesh.apply("east", "reviews-dr.yaml", dr).await?;
    let client = AppClient::new();
    let mut seen = std::collections::BTreeSet::new();
    eventually("hashing to apply", Duration::from_secs(5), || async {
        for user in 0..20 {
            let u = format!("user-{user}");
            let landed = workloads(outbound, 8, &[("x-user", u.as_str())]).await?;
            anyhow::ensure!(
                landed.iter().all(|w| *w == landed[0]),
                "{u} spread over {landed:?}"
            );
        }
        Ok(())
    })
    .await?;
    for user in 0..20 {
        let u = format!("user-{user}");
        seen.insert(
            workloads(outbound, 1, &[("x-user", u.as_str())])
                .await?
                .remove(0),
        );
    }
    assert_eq!(seen.len(), 2, "different keys use both endpoints");

    // A hashing cookie the client lacks is set by the sidecar, and then pins the client.
    let dr = dr.replace(
        "{httpHeaderName: x-user}",
        "{httpCookie: {name: session, ttl: 60s}}",
    );
    mesh.apply("east", "reviews-dr.yaml", &dr).await?;
    let r = eventually("a session cookie", Duration::from_secs(5), || async {
        let r = client.get(outbound, HOST, "/").await?;
        anyhow::ensure!(r.headers.contains_key("set-cookie"), "no set-cookie");
        Ok(r)
    })
    .await?;
    let set = r
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let pair = set.split(';').next().unwrap_or_default().to_owned();
    assert!(
        pair.starts_with("session=") && set.contains("Max-Age=60"),
        "{set}"
    );
    let landed = workloads(outbound, 10, &[("cookie", pair.as_str())]).await?;
    assert!(landed.iter().all(|w| *w == landed[0]), "{landed:?}");
    Ok(())
}

const POOLED: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRetries: 1}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaking_answers_overflow_under_concurrent_load() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    mesh.apply("east", "reviews-dr.yaml", POOLED).await?;
    let admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    eventually(
        "the pool limits to reach the client",
        Duration::from_secs(5),
        || async {
            let dump = isthmus_tests::config_dump(admin).await?;
            let svc = dump["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["service"] == HOST)
                .cloned()
                .unwrap_or_default();
            anyhow::ensure!(
                svc["policy"]["connection_pool"]["max_requests"] == 1,
                "policy: {}",
                svc["policy"]
            );
            Ok(())
        },
    )
    .await?;
    // Twenty callers at once on a slow path: one in flight, one waiting, the rest overflow.
    let overflowed = eventually("overflow under load", Duration::from_secs(10), || async {
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let client = AppClient::new();
                tokio::spawn(async move { client.get(outbound, HOST, "/delay/300").await })
            })
            .collect();
        let (mut ok, mut overflow) = (0, 0);
        for c in calls {
            let r = c.await??;
            match (
                r.status.as_u16(),
                r.headers
                    .get("x-isthmus-error")
                    .and_then(|v| v.to_str().ok()),
            ) {
                (200, _) => ok += 1,
                (503, Some("overflow")) => overflow += 1,
                (s, reason) => anyhow::bail!("unexpected {s} {reason:?}"),
            }
        }
        anyhow::ensure!(ok >= 2 && overflow >= 10, "{ok} ok, {overflow} overflowed");
        Ok(overflow)
    })
    .await?;
    let counted =
        isthmus_tests::metric_sum(admin, "istio_requests_total", &[("response_flags", "UO")])
            .await?;
    assert!(
        counted >= overflowed as f64,
        "overflows are counted by reason: {counted}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_failing_endpoint_and_brings_it_back() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100}\n";
    mesh.apply("east", "reviews-dr.yaml", dr).await?;
    let client = AppClient::new();
    // v2 fails every request on this path; after two failures it is ejected.
    let ejected_at = eventually("v2 to be ejected", Duration::from_secs(10), || async {
        for _ in 0..6 {
            client.get(outbound, HOST, "/fail-if/reviews-v2").await?;
        }
        for _ in 0..20 {
            let r = client.get(outbound, HOST, "/fail-if/reviews-v2").await?;
            anyhow::ensure!(r.status == 200, "v2 still gets traffic");
        }
        Ok(Instant::now())
    })
    .await?;
    // After baseEjectionTime it gets traffic again (and fails again).
    eventually("v2 to come back", Duration::from_secs(10), || async {
        let r = client.get(outbound, HOST, "/fail-if/reviews-v2").await?;
        anyhow::ensure!(r.status == 503, "not yet");
        Ok(())
    })
    .await?;
    assert!(
        ejected_at.elapsed() >= Duration::from_millis(1000),
        "came back too early: {:?}",
        ejected_at.elapsed()
    );
    Ok(())
}

fn rate_limit(per_caller: bool) -> String {
    format!("apiVersion: isthmus.io/v1alpha1\nkind: LocalRateLimit\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  targetRef: {{kind: Service, name: reviews}}\n  tokensPerInterval: 5\n  interval: 60s\n  perCaller: {per_caller}\n")
}

/// Sends `n` requests; returns how many passed, checking the refusals look right.
async fn limited(outbound: std::net::SocketAddr, n: usize) -> anyhow::Result<usize> {
    let client = AppClient::new();
    let mut ok = 0;
    for _ in 0..n {
        let r = client.get(outbound, HOST, "/").await?;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                anyhow::ensure!(
                    r.headers
                        .get("x-isthmus-error")
                        .and_then(|v| v.to_str().ok())
                        == Some("rate-limited")
                );
                let after: u64 = r
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                anyhow::ensure!(after >= 1, "retry-after {after}");
            }
            s => anyhow::bail!("unexpected status {s}"),
        }
    }
    Ok(ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_rate_limit_answers_429_past_the_budget() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    mesh.add_workload("east", "other-client", None, "ratings")
        .await?;
    let other = mesh.workload("east", "other-client").outbound();
    mesh.apply("east", "reviews-limit.yaml", &rate_limit(false))
        .await?;
    // Each of the two reviews sidecars has a bucket of 5.
    let ok = eventually("the limit to apply", Duration::from_secs(5), || async {
        let ok = limited(outbound, 20).await?;
        anyhow::ensure!(ok <= 10, "{ok} of 20 passed");
        Ok(ok)
    })
    .await?;
    assert!(ok >= 1);
    assert_eq!(
        limited(other, 5).await?,
        0,
        "a shared bucket limits every caller"
    );

    // Per caller: another identity has its own buckets.
    mesh.apply("east", "reviews-limit.yaml", &rate_limit(true))
        .await?;
    eventually("per-caller buckets", Duration::from_secs(5), || async {
        let ok = limited(outbound, 20).await?;
        anyhow::ensure!(ok <= 10, "{ok} of 20 passed");
        let theirs = limited(other, 4).await?;
        anyhow::ensure!(theirs == 4, "the other caller got {theirs} of 4");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_and_weighted_splits_reach_endpoints_in_other_clusters() -> anyhow::Result<()> {
    let (mut mesh, outbound) = Mesh::with_reviews(&["east", "west"], "west", "client").await?;
    mesh.apply("east", "reviews-dr.yaml", SUBSETS).await?;
    mesh.apply(
        "east",
        "reviews-vs.yaml",
        &virtual_service("  - route:\n    - destination: {host: reviews, subset: v2}\n"),
    )
    .await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    // v2 exists only in west: the subset is served through the gateways.
    let client = AppClient::new();
    eventually("v2 in west to answer", Duration::from_secs(10), || async {
        let r = client.get(outbound, HOST, "/").await?;
        anyhow::ensure!(
            r.status == 200,
            "status {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let a = r.answer()?;
        anyhow::ensure!(
            (a.workload.as_str(), a.cluster.as_str()) == ("reviews-v2", "west"),
            "{a:?}"
        );
        Ok(())
    })
    .await?;
    assert!(workloads(outbound, 20, &[])
        .await?
        .iter()
        .all(|w| w == "reviews-v2"));

    // A 50/50 split between a local and a remote subset.
    let vs = virtual_service("  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n    - destination: {host: reviews, subset: v2}\n      weight: 50\n");
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    eventually(
        "both clusters to serve the split",
        Duration::from_secs(10),
        || async {
            let landed = workloads(outbound, 100, &[]).await?;
            let v2 = landed.iter().filter(|w| *w == "reviews-v2").count();
            anyhow::ensure!((25..=75).contains(&v2), "{v2} of 100 on v2");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_get_the_status_of_each_error_the_proxy_makes() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let grpc = || async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
            .origin(format!("http://{HOST}:9090").parse()?)
            .connect()
            .await?;
        Ok::<_, anyhow::Error>(isthmus_proto::echo::echo_client::EchoClient::new(channel))
    };
    // The caller's own deadline (grpc-timeout) against an injected delay: DEADLINE_EXCEEDED.
    let vs = virtual_service("  - fault:\n      delay: {fixedDelay: 3s}\n    route:\n    - destination: {host: reviews, subset: v1}\n");
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "client", HOST, 1).await?;
    // Sent as a raw HTTP/2 gRPC request with the deadline header a gRPC client sends, so the
    // answer observed is the proxy's and not the client library's own timer.
    let grpc_headers = [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "300m"),
    ];
    let r = AppClient::new()
        .send(
            outbound,
            &format!("{HOST}:9090"),
            "/isthmus.echo.v1.Echo/Say",
            true,
            &grpc_headers,
        )
        .await?;
    assert_eq!(
        r.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("4"),
        "DEADLINE_EXCEEDED: {:?}",
        r.headers
    );

    // Over the rate limit: RESOURCE_EXHAUSTED.
    mesh.apply(
        "east",
        "reviews-vs.yaml",
        &virtual_service("  - route:\n    - destination: {host: reviews, subset: v1}\n"),
    )
    .await?;
    mesh.apply("east", "reviews-limit.yaml", &rate_limit(false))
        .await?;
    let code = eventually("the limit to bite", Duration::from_secs(5), || async {
        let mut client = grpc().await?;
        for _ in 0..20 {
            if let Err(s) = client
                .say(isthmus_proto::echo::EchoRequest::default())
                .await
            {
                return Ok(s.code());
            }
        }
        anyhow::bail!("never limited")
    })
    .await?;
    assert_eq!(code, tonic::Code::ResourceExhausted);

    // No healthy endpoint: UNAVAILABLE.
    mesh.kill_workload("east", "reviews-v1");
    mesh.kill_workload("east", "reviews-v2");
    let code = eventually("no endpoint left", Duration::from_secs(10), || async {
        match grpc()
            .await?
            .say(isthmus_proto::echo::EchoRequest::default())
            .await
        {
            Err(s) => Ok(s.code()),
            Ok(_) => anyhow::bail!("still served"),
        }
    })
    .await?;
    assert_eq!(code, tonic::Code::Unavailable);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_send_tunnels_by_weight() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut mesh, outbound) = reviews().await?;
    let vs = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  hosts: [reviews]\n  tcp:\n  - match: [{{port: {p}}}]\n    route:\n    - destination: {{host: reviews, subset: v2}}\n      weight: 100\n",
        p = isthmus_tests::TCP_ECHO_PORT
    );
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    let target = format!("{HOST}:{}", isthmus_tests::TCP_ECHO_PORT);
    let tunnel = || async {
        let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await?;
        anyhow::ensure!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Ok(())
    };
    let admin = |mesh: &mut Mesh, w: &str| {
        mesh.workload("east", w)
            .sidecar
            .as_ref()
            .expect("sidecar")
            .admin_address
    };
    let (v1, v2) = (
        admin(&mut mesh, "reviews-v1"),
        admin(&mut mesh, "reviews-v2"),
    );
    let inbound = [("reporter", "destination")];
    // Give the route time to arrive, then count where tunnels land.
    eventually("tunnels to land on v2", Duration::from_secs(10), || async {
        let before = isthmus_tests::metric_sum(v1, "istio_requests_total", &inbound).await?;
        for _ in 0..10 {
            tunnel().await?;
        }
        let after = isthmus_tests::metric_sum(v1, "istio_requests_total", &inbound).await?;
        anyhow::ensure!(after == before, "v1 got {} tunnels", after - before);
        Ok(())
    })
    .await?;
    assert!(isthmus_tests::metric_sum(v2, "istio_requests_total", &inbound).await? >= 10.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_labels_route_by_the_calling_workload() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    mesh.add_workload("east", "tester", None, "tester").await?;
    let tester = mesh.workload("east", "tester");
    let (tester_ip, tester_out) = (tester.ip, tester.outbound());
    // The tester's own WorkloadEntry gives it labels (no Service selects it).
    let we = format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: tester, namespace: demo}}\nspec:\n  address: {tester_ip}\n  labels: {{app: tester, track: canary}}\n  serviceAccount: tester\n");
    mesh.apply("east", "tester.yaml", &we).await?;
    let vs = virtual_service("  - match: [{sourceLabels: {track: canary}}]\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n");
    mesh.apply("east", "reviews-vs.yaml", &vs).await?;
    mesh.wait_routes("east", "tester", HOST, 2).await?;
    eventually(
        "the canary caller to reach v2",
        Duration::from_secs(5),
        || async {
            anyhow::ensure!(workloads(tester_out, 10, &[])
                .await?
                .iter()
                .all(|w| w == "reviews-v2"));
            Ok(())
        },
    )
    .await?;
    assert!(
        workloads(outbound, 10, &[])
            .await?
            .iter()
            .all(|w| w == "reviews-v1"),
        "other callers stay on v1"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_level_settings_apply_to_their_port_only() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: demo}\nspec:\n  host: reviews\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 9090}\n      connectionPool:\n        tcp: {maxConnections: 1}\n        http: {http1MaxPendingRequests: 1}\n";
    mesh.apply("east", "reviews-dr.yaml", dr).await?;
    let burst = |host: String| async move {
        let calls: Vec<_> = (0..12)
            .map(|_| {
                let host = host.clone();
                tokio::spawn(
                    async move { AppClient::new().get(outbound, &host, "/delay/300").await },
                )
            })
            .collect();
        let mut overflow = 0;
        for c in calls {
            overflow += usize::from(c.await??.status == 503);
        }
        Ok::<_, anyhow::Error>(overflow)
    };
    eventually(
        "port 9090 to be limited",
        Duration::from_secs(10),
        || async {
            let n = burst(format!("{HOST}:9090")).await?;
            anyhow::ensure!(n >= 5, "{n} overflowed on 9090");
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        burst(format!("{HOST}:80")).await?,
        0,
        "port 80 has no limits"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_retire_after_max_requests_and_when_idle() -> anyhow::Result<()> {
    let (mut mesh, outbound) = reviews().await?;
    let admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let opened =
        || isthmus_tests::metric_sum(admin, "isthmus_sidecar_upstream_connections_total", &[]);
    // Without caps, connections are reused.
    let before = opened().await?;
    workloads(outbound, 10, &[]).await?;
    assert!(opened().await? - before <= 2.0, "reused without caps");

    let dr = |pool: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      http: {{{pool}}}\n")
    };
    mesh.apply(
        "east",
        "reviews-dr.yaml",
        &dr("maxRequestsPerConnection: 1"),
    )
    .await?;
    eventually(
        "one connection per request",
        Duration::from_secs(5),
        || async {
            let before = opened().await?;
            workloads(outbound, 10, &[]).await?;
            let n = opened().await? - before;
            anyhow::ensure!(n >= 10.0, "{n} connections for 10 requests");
            Ok(())
        },
    )
    .await?;

    mesh.apply("east", "reviews-dr.yaml", &dr("idleTimeout: 300ms"))
        .await?;
    eventually(
        "idle connections to be replaced",
        Duration::from_secs(5),
        || async {
            workloads(outbound, 2, &[]).await?;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let before = opened().await?;
            workloads(outbound, 1, &[]).await?;
            anyhow::ensure!(opened().await? - before >= 1.0, "reused an idle connection");
            Ok(())
        },
    )
    .await?;
    Ok(())
}
