//! WasmPlugins (Istio's kind, the proxy-wasm ABI): plugins written with the AssemblyScript
//! proxy-wasm SDK (`tests/plugins/`) run in real sidecars, in their phases around the
//! built-in filters, across clusters; a trapping plugin fails open or closed by its
//! strategy and harms no other request; a plugin swapped under traffic fails no request;
//! a module fetched over HTTP with the wrong digest is refused.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus::client::AppClient;
use isthmus_tests::{config_dump, eventually, metric_sum, plugins, Mesh};

const HOST: &str = "echo.demo.svc.cluster.local";

fn plugin_yaml(name: &str, module: &str, extra: &str) -> anyhow::Result<String> {
    let path = plugins::module(module)?;
    Ok(format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  url: file://{}\n  pluginName: {module}\n{extra}---\n",
        path.display()
    ))
}

/// The plugins of a sidecar's dump, as (name, loaded, error).
async fn loaded(admin: SocketAddr) -> anyhow::Result<Vec<(String, bool, String)>> {
    let dump = config_dump(admin).await?;
    Ok(dump["wasm_plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["loaded"].as_bool().unwrap_or_default(),
                p["error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

async fn wait_loaded(admin: SocketAddr, names: &[&str]) -> anyhow::Result<()> {
    eventually("the plugins to load", Duration::from_secs(10), || async {
        let got = loaded(admin).await?;
        anyhow::ensure!(
            got.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>() == names
                && got.iter().all(|(_, ok, _)| *ok),
            "{got:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_plugins_add_headers_refuse_count_and_run_by_phase_across_clusters(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let yaml = [
        plugin_yaml("stamp", "add_header", "  pluginConfig: {version: one}\n")?,
        plugin_yaml(
            "api-key",
            "require_header",
            "  phase: AUTHZ\n  pluginConfig: {header: x-api-key}\n",
        )?,
        // The AssemblyScript SDK reads its configuration on start even when there is
        // none, through a size pointer it passes wrong: every plugin here gets one.
        plugin_yaml("counter", "count", "  phase: STATS\n  pluginConfig: {}\n")?,
    ]
    .concat();
    mesh.apply("west", "plugins.yaml", &yaml).await?;
    let echo_admin = mesh.workload("west", "echo-west").admin();
    wait_loaded(echo_admin, &["demo/api-key", "demo/counter", "demo/stamp"]).await?;

    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let refused = eventually(
        "echo in west to answer",
        Duration::from_secs(10),
        || async {
            let r = client.get(outbound, HOST, "/").await?;
            anyhow::ensure!(r.status != 503 && r.status != 404, "{}", r.status);
            Ok(r)
        },
    )
    .await?;
    // AUTHZ: the plugin answered in the app's place, naming the caller's identity it read.
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    assert_eq!(
        String::from_utf8_lossy(&refused.body),
        "refused by require_header: no x-api-key from spiffe://cluster.local/ns/demo/sa/frontend\n"
    );
    let passed = client
        .send(outbound, HOST, "/", false, &[("x-api-key", "k")])
        .await?;
    assert_eq!(passed.status, 200);
    let answer = passed.answer()?;
    assert_eq!(answer.cluster, "west");
    assert_eq!(
        answer.headers.get("x-wasm-request").map(String::as_str),
        Some(r#"{"version":"one"}"#),
        "the app saw the header the plugin added"
    );
    assert_eq!(
        passed.headers.get("x-wasm-response").map(|v| v.as_bytes()),
        Some(&br#"{"version":"one"}"#[..]),
        "the caller saw the response header"
    );
    // STATS runs after AUTHZ: only the request that passed is counted, in the plugin's
    // own metric on the sidecar's Prometheus endpoint.
    for _ in 0..4 {
        let r = client
            .send(outbound, HOST, "/", true, &[("x-api-key", "k")])
            .await?;
        assert_eq!(r.status, 200, "over HTTP/2 too");
    }
    let counted = metric_sum(
        echo_admin,
        "wasmcustom_requests_seen_total",
        &[("plugin", "demo/counter")],
    )
    .await?;
    assert_eq!(counted, 5.0, "one refused, five passed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_fails_open_or_closed_for_its_request_alone() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let echo_admin = mesh.workload("east", "echo-a").admin();
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();

    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml(
            "trap",
            "trap",
            "  failStrategy: FAIL_OPEN\n  pluginConfig: {}\n",
        )?,
    )
    .await?;
    wait_loaded(echo_admin, &["demo/trap"]).await?;
    let failed = |strategy: &'static str| async move {
        metric_sum(
            echo_admin,
            "isthmus_sidecar_wasm_plugin_failures_total",
            &[("plugin", "demo/trap"), ("strategy", strategy)],
        )
        .await
    };
    let status = |path: &'static str| {
        let client = client.clone();
        async move { Ok::<_, anyhow::Error>(client.get(outbound, HOST, path).await?.status) }
    };
    assert_eq!(
        status("/trap").await?,
        200,
        "FAIL_OPEN: the request goes on"
    );
    assert_eq!(status("/").await?, 200);

    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml(
            "trap",
            "trap",
            "  failStrategy: FAIL_CLOSE\n  pluginConfig: {}\n",
        )?,
    )
    .await?;
    eventually("FAIL_CLOSE to apply", Duration::from_secs(10), || async {
        anyhow::ensure!(status("/trap").await? == 503);
        Ok(())
    })
    .await?;
    let closed_before = failed("fail_close").await?;
    // Requests in between, before and after the trap, never meet it: each has an
    // instance of its own, and a trapped one is never reused.
    let mut statuses = Vec::new();
    for path in ["/", "/trap", "/", "/trap", "/"] {
        statuses.push(status(path).await?);
    }
    assert_eq!(statuses, [200, 503, 200, 503, 200]);
    // A plugin that never returns is stopped (its fuel runs out): the request is failed
    // in bounded time, and the next one is served.
    let started = Instant::now();
    assert_eq!(status("/loop").await?, 503);
    let stopped_after = started.elapsed();
    eprintln!("a looping plugin was stopped after {stopped_after:?}");
    assert!(stopped_after < Duration::from_secs(3), "{stopped_after:?}");
    assert_eq!(status("/").await?, 200);
    let refused = client.get(outbound, HOST, "/trap").await?;
    assert_eq!(
        String::from_utf8_lossy(&refused.body).trim(),
        "WasmPlugin demo/trap failed",
        "the caller is not told what the plugin did"
    );
    assert!(isthmus_tests::reachable(outbound, HOST).await.is_ok());
    assert!(failed("fail_open").await? >= 1.0, "the /trap let through");
    assert_eq!(
        failed("fail_close").await? - closed_before,
        4.0,
        "two /trap, a /loop, one more /trap"
    );

    // A module that cannot be loaded: FAIL_CLOSE refuses every request it would see, and
    // the dump says why.
    mesh.apply(
        "east",
        "plugins.yaml",
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: missing, namespace: demo}\nspec:\n  url: file:///nonexistent/plugin.wasm\n",
    )
    .await?;
    let error = eventually(
        "the missing module to show",
        Duration::from_secs(10),
        || async {
            let got = loaded(echo_admin).await?;
            match got.as_slice() {
                [(name, false, error)] if name == "demo/missing" => Ok(error.clone()),
                other => anyhow::bail!("{other:?}"),
            }
        },
    )
    .await?;
    assert!(
        error.contains("reading /nonexistent/plugin.wasm"),
        "{error}"
    );
    assert_eq!(status("/").await?, 503);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_swapped_under_steady_traffic_fails_no_request() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let echo_admin = mesh.workload("east", "echo-a").admin();
    let outbound = mesh.workload("east", "client").outbound();
    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml("stamp", "add_header", "  pluginConfig: {v: 1}\n")?,
    )
    .await?;
    wait_loaded(echo_admin, &["demo/stamp"]).await?;
    // Steady traffic on kept-alive connections: what each response carried.
    let seen: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
    let sender = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let client = AppClient::new();
            loop {
                let got = match client.get(outbound, HOST, "/").await {
                    Ok(r) if r.status == 200 => Ok(r
                        .headers
                        .get("x-wasm-response")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_owned()),
                    Ok(r) => Err(format!("status {}", r.status)),
                    Err(e) => Err(format!("{e:#}")),
                };
                seen.lock().expect("seen").push(got);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let swapped = Instant::now();
    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml("stamp", "add_header", "  pluginConfig: {v: 2}\n")?,
    )
    .await?;
    eventually(
        "the new plugin to answer",
        Duration::from_secs(10),
        || async {
            let last = seen.lock().expect("seen").last().cloned();
            anyhow::ensure!(last == Some(Ok(r#"{"v":2}"#.to_owned())), "{last:?}");
            Ok(())
        },
    )
    .await?;
    eprintln!("swapped in {:?}", swapped.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sender.abort();
    let seen = seen.lock().expect("seen").clone();
    let failed: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "no request failed: {failed:?}");
    let versions: std::collections::BTreeSet<&str> =
        seen.iter().filter_map(|r| r.as_deref().ok()).collect();
    assert_eq!(
        versions,
        [r#"{"v":1}"#, r#"{"v":2}"#].into_iter().collect(),
        "every response carried one version or the other"
    );
    Ok(())
}

/// Serves `bytes` at `/plugin.wasm` over plain HTTP on a loopback address.
async fn serve_module(bytes: Vec<u8>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((isthmus_tests::fresh_ip(0, 7), 0)).await?;
    let addr = listener.local_addr()?;
    let bytes = bytes::Bytes::from(bytes);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| {
                        let bytes = bytes.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_fetched_over_http_is_checked_against_its_sha256() -> anyhow::Result<()> {
    let module = std::fs::read(plugins::module("add_header")?)?;
    let digest = isthmus_core::tls::bundle::sha256_hex(&module);
    let server = serve_module(module).await?;
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let echo_admin = mesh.workload("east", "echo-a").admin();
    let outbound = mesh.workload("east", "client").outbound();
    let yaml = |sha: &str| {
        format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: fetched, namespace: demo}}\nspec:\n  url: http://{server}/plugin.wasm\n  sha256: {sha}\n  pluginName: add_header\n  pluginConfig: {{from: http}}\n")
    };
    let wrong = "0".repeat(64);
    mesh.apply("east", "plugins.yaml", &yaml(&wrong)).await?;
    let error = eventually(
        "the wrong digest to show",
        Duration::from_secs(10),
        || async {
            match loaded(echo_admin).await?.as_slice() {
                [(_, false, error)] => Ok(error.clone()),
                other => anyhow::bail!("{other:?}"),
            }
        },
    )
    .await?;
    assert!(
        error.contains(&format!("has SHA-256 {digest}, not the {wrong}")),
        "{error}"
    );
    let client = AppClient::new();
    assert_eq!(
        client.get(outbound, HOST, "/").await?.status,
        503,
        "FAIL_CLOSE"
    );

    mesh.apply("east", "plugins.yaml", &yaml(&digest)).await?;
    wait_loaded(echo_admin, &["demo/fetched"]).await?;
    let r = client.get(outbound, HOST, "/").await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("x-wasm-response").map(|v| v.as_bytes()),
        Some(&br#"{"from":"http"}"#[..])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_mode_plugin_runs_on_the_callers_own_requests_only() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let path = plugins::module("add_header")?;
    // Namespace-wide (no selector), CLIENT only: the client's requests out, and not the
    // echo's requests in.
    mesh.apply(
        "east",
        "plugins.yaml",
        &format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: outgoing, namespace: demo}}\nspec:\n  url: {}\n  pluginName: add_header\n  pluginConfig: {{side: client}}\n  match: [{{mode: CLIENT, ports: [{{number: 80}}]}}]\n", path.display()),
    )
    .await?;
    let client_admin = mesh.workload("east", "client").admin();
    wait_loaded(client_admin, &["demo/outgoing"]).await?;
    let outbound = mesh.workload("east", "client").outbound();
    let r = AppClient::new().get(outbound, HOST, "/").await?;
    assert_eq!(r.status, 200);
    let answer = r.answer()?;
    assert_eq!(
        answer.headers.get("x-wasm-request").map(String::as_str),
        Some(r#"{"side":"client"}"#),
        "added once, by the caller's sidecar"
    );
    assert_eq!(
        r.headers.get_all("x-wasm-response").iter().count(),
        1,
        "{:?}",
        r.headers
    );
    // Port 9090 (grpc) is not matched: nothing added.
    let other = AppClient::new()
        .get(outbound, "echo.demo.svc.cluster.local:9090", "/")
        .await?;
    assert_eq!(other.status, 200);
    assert!(!other.answer()?.headers.contains_key("x-wasm-request"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_pauses_a_request_to_ask_a_mesh_service_in_another_cluster() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "policy-west", Some("policy"), "policy")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let policy = |path: &str| {
        plugin_yaml(
            "ask-policy",
            "callout",
            &format!("  phase: AUTHZ\n  pluginConfig: {{upstream: policy.demo.svc.cluster.local, path: \"{path}\"}}\n"),
        )
    };
    mesh.apply("east", "plugins.yaml", &policy("/status/200")?)
        .await?;
    let echo_admin = mesh.workload("east", "echo-east").admin();
    wait_loaded(echo_admin, &["demo/ask-policy"]).await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    // The callout goes out through echo-east's own sidecar, with its identity, across the
    // gateways to the only policy endpoint, in west; the request waits for it.
    let answer = eventually(
        "the policy in west to answer",
        Duration::from_secs(10),
        || async {
            let r = client.get(outbound, HOST, "/").await?;
            anyhow::ensure!(r.status == 200, "{} {:?}", r.status, r.body);
            r.answer()
        },
    )
    .await?;
    assert_eq!(answer.cluster, "east", "the request itself stays in east");
    assert_eq!(
        answer.headers.get("x-policy-cluster").map(String::as_str),
        Some("west"),
        "the plugin read the callout's answer from west"
    );
    mesh.apply("east", "plugins.yaml", &policy("/status/503")?)
        .await?;
    let refused = eventually(
        "the new policy to apply",
        Duration::from_secs(10),
        || async {
            let r = client.get(outbound, HOST, "/").await?;
            anyhow::ensure!(r.status == 403, "{}", r.status);
            Ok(r)
        },
    )
    .await?;
    assert_eq!(String::from_utf8_lossy(&refused.body), "policy said 503\n");
    Ok(())
}

/// `curl` POSTs `body` to the echo service through the sidecar at `outbound`: status and
/// response body.
async fn curl_post(outbound: SocketAddr, body: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let mut curl = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Host: {HOST}"),
            "--data-binary",
            "@-",
            &format!("http://{outbound}/upload"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = curl.stdin.take().expect("piped");
    stdin.write_all(body.as_bytes()).await?;
    drop(stdin);
    let out = curl.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once('\n')
        .ok_or_else(|| anyhow::anyhow!("curl printed {text:?}"))?;
    Ok((code.parse()?, body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_read_change_and_refuse_bodies_and_add_trailers() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml("bodies", "body", "  pluginConfig: {}\n")?,
    )
    .await?;
    wait_loaded(mesh.workload("east", "echo-a").admin(), &["demo/bodies"]).await?;
    let outbound = mesh.workload("east", "client").outbound();

    // The plugin held the body to its end, then upper-cased it; the app got that, and the
    // plugin appended a line to the JSON answer.
    let (status, body) = curl_post(outbound, "hello wasm").await?;
    assert_eq!(status, 200, "{body}");
    let (json, tail) = body
        .split_once("\n-- seen by wasm")
        .ok_or_else(|| anyhow::anyhow!("no appended line: {body}"))?;
    let answer: isthmus::echo::Answer = serde_json::from_str(json)?;
    assert_eq!(answer.body, "HELLO WASM");
    assert_eq!(tail, "\n");
    assert_eq!(answer.method, "POST");
    // A body of many frames (200 KiB) is held whole and changed whole.
    let big = "abcdefghij".repeat(20 << 10);
    let (status, body) = curl_post(outbound, &big).await?;
    assert_eq!(status, 200);
    let answer: isthmus::echo::Answer =
        serde_json::from_str(body.split("\n-- seen by wasm").next().unwrap_or_default())?;
    assert_eq!(answer.body_len, big.len());
    assert!(answer.body.starts_with("ABCDEFGHIJABCDEFGHIJ"));
    // Refused from the body: the caller gets the plugin's answer, not the app's.
    let (status, body) = curl_post(outbound, "this is forbidden").await?;
    assert_eq!(
        (status, body.as_str()),
        (403, "refused by body: 17 bytes\n")
    );

    // gRPC passes untouched, and its response gets the plugin's trailer.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
        .origin("http://echo.demo.svc.cluster.local:9090".parse()?)
        .connect()
        .await?;
    let reply = isthmus_proto::echo::echo_client::EchoClient::new(channel)
        .say(isthmus_proto::echo::EchoRequest {
            message: "hi".into(),
        })
        .await?;
    assert_eq!(
        reply.metadata().get("x-wasm-trailer").map(|v| v.as_bytes()),
        Some(&b"seen"[..]),
        "{:?}",
        reply.metadata()
    );
    assert_eq!(reply.into_inner().message, "hi");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_timer_queue_and_shared_data_reach_its_requests() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-a", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.apply(
        "east",
        "plugins.yaml",
        &plugin_yaml("ticker", "ticker", "  pluginConfig: {}\n")?,
    )
    .await?;
    wait_loaded(mesh.workload("east", "echo-a").admin(), &["demo/ticker"]).await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let ticks = || async {
        let a = client.get(outbound, HOST, "/").await?.answer()?;
        let n: u32 = a
            .headers
            .get("x-ticks")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let last = a.headers.get("x-last-queued").cloned().unwrap_or_default();
        Ok::<_, anyhow::Error>((n, last))
    };
    // The root ticks every 50 ms, queues each tick, and keeps the last one it took off
    // the queue in shared data, which each request's own instance reads.
    let (first, last) = eventually(
        "ticks to reach requests",
        Duration::from_secs(5),
        || async {
            let (n, last) = ticks().await?;
            anyhow::ensure!(n >= 2, "{n} {last}");
            Ok((n, last))
        },
    )
    .await?;
    assert_eq!(last, format!("tick {first}"), "the queue carried each tick");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (later, _) = ticks().await?;
    assert!(
        later >= first + 5,
        "about ten ticks in 500 ms: {first} then {later}"
    );
    Ok(())
}
