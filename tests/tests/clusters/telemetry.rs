//! Telemetry as a user's monitoring sees it: a real Prometheus server (Debian's
//! `prometheus`, which `.ci/run` installs) scrapes every sidecar, gateway and controller of
//! a two-cluster mesh, and PromQL in the shape of Istio's dashboards returns the traffic
//! the test sent.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isthmus_tests::{eventually, AppClient, Mesh};

const HOST: &str = "echo.demo.svc.cluster.local";

/// A Prometheus server on loopback, stopped on drop.
struct Prometheus {
    child: Child,
    address: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job name → admin addresses) every second.
    fn start(dir: &std::path::Path, targets: &[(&str, Vec<SocketAddr>)]) -> anyhow::Result<Self> {
        let jobs: String = targets
            .iter()
            .map(|(job, addrs)| {
                let list: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
                format!(
                    "  - job_name: {job}\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: [{}]\n",
                    list.join(", ")
                )
            })
            .collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"),
        )?;
        let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "starting `prometheus` (Debian's package; .ci/run installs it): {e}"
                )
            })?;
        Ok(Self { child, address })
    }

    /// The result vector of an instant PromQL query.
    async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let reply = AppClient::new()
            .get(
                self.address,
                &self.address.to_string(),
                &format!("/api/v1/query?query={encoded}"),
            )
            .await?;
        let body: serde_json::Value = serde_json::from_slice(&reply.body)?;
        anyhow::ensure!(body["status"] == "success", "{promql}: {body}");
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of each series of `promql`, by the value of `label`.
    async fn by(&self, promql: &str, label: &str) -> anyhow::Result<Vec<(String, f64)>> {
        Ok(self
            .query(promql)
            .await?
            .iter()
            .map(|s| {
                (
                    s["metric"][label].as_str().unwrap_or_default().to_owned(),
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN),
                )
            })
            .collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_two_cluster_mesh_and_answers_dashboard_queries() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload_labeled(
        "west",
        "echo-west",
        Some("echo"),
        "echo",
        &[("version", "v1")],
    )
    .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let admin = |w: &isthmus_tests::Workload| w.sidecar.as_ref().expect("sidecar").admin_address;
    let sidecars = vec![
        admin(mesh.workload("east", "client")),
        admin(mesh.workload("west", "echo-west")),
    ];
    let gateways: Vec<SocketAddr> = ["east", "west"]
        .iter()
        .map(|c| {
            mesh.cluster(c)
                .gateway
                .as_ref()
                .expect("gateway")
                .admin_address
        })
        .collect();
    let controllers = vec![mesh.controller_admin("east"), mesh.controller_admin("west")];
    let prometheus = Prometheus::start(
        mesh.dir.path(),
        &[
            ("sidecars", sidecars),
            ("gateways", gateways),
            ("controllers", controllers),
        ],
    )?;

    // Every target scraped and up.
    eventually("every target up", Duration::from_secs(20), || async {
        let up = prometheus.by("up", "job").await?;
        anyhow::ensure!(up.len() == 6 && up.iter().all(|(_, v)| *v == 1.0), "{up:?}");
        Ok(())
    })
    .await?;
    // Requests from east to the service that runs only in west, through both gateways,
    // spread over a few scrapes so that rates see them.
    let client = AppClient::new();
    let sent = 20;
    for _ in 0..sent {
        eventually(
            "a request through both gateways",
            Duration::from_secs(10),
            || async {
                let r = client.get(outbound, HOST, "/").await?;
                anyhow::ensure!(r.status == 200, "status {}", r.status);
                Ok(())
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Istio's service dashboard: requests by destination service and response code, from
    // the destination's side and from the source's.
    for reporter in ["destination", "source"] {
        let q = format!(
            "sum by (destination_service, response_code) (istio_requests_total{{reporter=\"{reporter}\", destination_service=\"{HOST}\"}})"
        );
        eventually(&q, Duration::from_secs(15), || async {
            let series = prometheus.query(&q).await?;
            let ok: f64 = series
                .iter()
                .filter(|s| s["metric"]["response_code"] == "200")
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .sum();
            anyhow::ensure!(ok >= sent as f64, "{reporter}: {ok} of {sent}: {series:?}");
            Ok(())
        })
        .await?;
    }
    // Where traffic went by cluster, and the p50 of request duration from the histogram.
    let clusters = prometheus
        .by(
            &format!("sum by (destination_cluster) (istio_requests_total{{reporter=\"source\", destination_service=\"{HOST}\"}})"),
            "destination_cluster",
        )
        .await?;
    assert!(
        clusters
            .iter()
            .any(|(c, v)| c == "west" && *v >= sent as f64),
        "{clusters:?}"
    );
    let p50 = "histogram_quantile(0.5, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter=\"source\"}[1m])))";
    eventually(p50, Duration::from_secs(15), || async {
        let v = prometheus.by(p50, "le").await?;
        anyhow::ensure!(v.len() == 1 && v[0].1.is_finite() && v[0].1 > 0.0, "{v:?}");
        Ok(())
    })
    .await?;
    // gRPC and opaque TCP to the same service, so every metric has series on both sides.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
        .origin(format!("http://{HOST}:9090").parse()?)
        .connect()
        .await?;
    let mut grpc = isthmus_proto::echo::echo_client::EchoClient::new(channel);
    for _ in 0..5 {
        grpc.say(isthmus_proto::echo::EchoRequest {
            message: "hi".into(),
        })
        .await?;
    }
    let tcp_target = format!("{HOST}:{}", isthmus_tests::TCP_ECHO_PORT);
    // Spread over scrapes, as the requests above, so that rates see them.
    for _ in 0..3 {
        eventually("a TCP tunnel to west", Duration::from_secs(10), || {
            crate::mesh::tcp_echo(outbound, &tcp_target)
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // Kiali's graph and Istio's workload dashboard: who called whom, over what security.
    let edges = "sum by (source_workload, source_cluster, destination_workload, destination_version, destination_cluster, connection_security_policy) (rate(istio_requests_total{reporter=\"destination\"}[1m]))";
    eventually(edges, Duration::from_secs(15), || async {
        let series = prometheus.query(edges).await?;
        let edge = series.iter().find(|s| {
            let m = &s["metric"];
            m["source_workload"] == "client"
                && m["source_cluster"] == "east"
                && m["destination_workload"] == "echo-west"
                && m["destination_cluster"] == "west"
                && m["destination_version"] == "v1"
                && m["connection_security_policy"] == "mutual_tls"
        });
        let rate = edge
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        anyhow::ensure!(rate > 0.0, "{series:?}");
        Ok(())
    })
    .await?;
    let grpc_status = "sum by (destination_workload, grpc_response_status) (istio_requests_total{reporter=\"source\", request_protocol=\"grpc\"})";
    eventually(grpc_status, Duration::from_secs(15), || async {
        let v = prometheus.by(grpc_status, "grpc_response_status").await?;
        anyhow::ensure!(v.iter().any(|(s, n)| s == "0" && *n >= 5.0), "{v:?}");
        Ok(())
    })
    .await?;
    // TCP byte rates in both directions, as each reporter saw them (the echo sends back
    // what it got: both directions carry the same bytes).
    for reporter in ["source", "destination"] {
        for metric in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let q = format!("sum by (destination_workload) (rate({metric}{{reporter=\"{reporter}\", destination_service=\"{HOST}\"}}[1m]))");
            eventually(&q, Duration::from_secs(15), || async {
                let v = prometheus.by(&q, "destination_workload").await?;
                anyhow::ensure!(v.iter().any(|(w, r)| w == "echo-west" && *r > 0.0), "{v:?}");
                Ok(())
            })
            .await?;
        }
        let closed = format!("sum(istio_tcp_connections_closed_total{{reporter=\"{reporter}\"}})");
        eventually(&closed, Duration::from_secs(15), || async {
            let v = prometheus.by(&closed, "").await?;
            anyhow::ensure!(v.first().is_some_and(|(_, n)| *n >= 3.0), "{v:?}");
            Ok(())
        })
        .await?;
    }
    every_label_is_present_on_both_reporters(&prometheus).await?;
    // Versions as Istio's dashboards read them, and the control plane's own view.
    let builds = prometheus
        .by("count by (component) (istio_build)", "component")
        .await?;
    assert!(
        builds.contains(&("proxy".to_owned(), 4.0)) && builds.contains(&("pilot".to_owned(), 2.0)),
        "{builds:?}"
    );
    let connected = prometheus
        .by("sum(isthmus_controller_xds_connected_proxies)", "")
        .await?;
    assert!(
        connected.first().is_some_and(|(_, v)| *v >= 4.0),
        "two sidecars and two gateways: {connected:?}"
    );
    Ok(())
}

/// Istio's documented labels of its standard metrics
/// (istio.io/latest/docs/reference/config/metrics): all of them on request metrics; TCP
/// metrics have no response code or gRPC status.
const ISTIO_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Labels a request between two mesh workloads must know (never `unknown`), by reporter:
/// all but the client's app and version (it has no labels), the gRPC status of plain HTTP,
/// and the security policy at the source (Istio writes `unknown` there too).
fn known(reporter: &str, label: &str) -> bool {
    let unknowable = match label {
        "source_app" | "source_version" | "grpc_response_status" => true,
        "connection_security_policy" => reporter == "source",
        _ => false,
    };
    !unknowable
}

/// Every series of every Istio metric, on both reporters, carries every documented label
/// with a value; for the client's traffic to echo, the values a mesh knows are not
/// `unknown`.
async fn every_label_is_present_on_both_reporters(prometheus: &Prometheus) -> anyhow::Result<()> {
    let metrics = [
        ("istio_requests_total", true),
        ("istio_request_duration_milliseconds_bucket", true),
        ("istio_request_bytes_bucket", true),
        ("istio_response_bytes_bucket", true),
        ("istio_tcp_sent_bytes_total", false),
        ("istio_tcp_received_bytes_total", false),
        ("istio_tcp_connections_opened_total", false),
        ("istio_tcp_connections_closed_total", false),
    ];
    for (metric, http) in metrics {
        for reporter in ["source", "destination"] {
            let q = format!("{metric}{{reporter=\"{reporter}\", destination_service=\"{HOST}\"}}");
            let series = prometheus.query(&q).await?;
            anyhow::ensure!(!series.is_empty(), "no series for {q}");
            for s in &series {
                let m = &s["metric"];
                for label in ISTIO_LABELS {
                    if !http && matches!(label, "response_code" | "grpc_response_status") {
                        anyhow::ensure!(m.get(label).is_none(), "{metric} has {label}: {m}");
                        continue;
                    }
                    let value = m[label].as_str().unwrap_or_default();
                    anyhow::ensure!(!value.is_empty(), "{metric} {reporter}: no {label} in {m}");
                    anyhow::ensure!(
                        value != "unknown" || !known(reporter, label),
                        "{metric} {reporter}: {label} unknown in {s}; all: {series:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// One request from east to west with the caller's trace context: an OTLP receiver (the
/// OpenTelemetry collector's gRPC services) gets one trace with a span per hop — client
/// sidecar, east gateway, west gateway, server sidecar — linked parent to child under the
/// caller's span; the app behind the server sidecar continues that trace; and the same
/// request's metrics and access-log records arrive, the log records naming the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cross_cluster_request_is_one_trace_with_a_span_per_hop_over_otlp() -> anyhow::Result<()>
{
    use isthmus_tests::otlp::{attribute, OtlpReceiver};
    let receiver = OtlpReceiver::start(isthmus_tests::fresh_ip(0, 9)).await?;
    let endpoint = receiver.endpoint();
    let mut mesh = Mesh::start_configured(&["east", "west"], |m| {
        m.telemetry.otlp = Some(isthmus_core::otlp::Config {
            endpoint,
            protocol: isthmus_core::otlp::Protocol::Grpc,
            headers: vec![("x-tenant".into(), "team-a".into())],
            metrics_interval: Duration::from_secs(1),
            sampling: 100.0,
            ..Default::default()
        });
    })
    .await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();

    // The caller's own span, as an instrumented app would send it.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller_span}-01");
    let answer = eventually(
        "a traced request to west",
        Duration::from_secs(10),
        || async {
            let r = AppClient::new()
                .send(
                    outbound,
                    HOST,
                    "/traced",
                    false,
                    &[("traceparent", &traceparent)],
                )
                .await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            r.answer()
        },
    )
    .await?;
    assert_eq!(answer.cluster, "west");

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let spans = eventually(
        "four spans of the trace",
        Duration::from_secs(15),
        || async {
            let spans: Vec<_> = receiver.read(|r| {
                r.spans
                    .iter()
                    .filter(|(_, s)| hex(&s.trace_id) == trace)
                    .cloned()
                    .collect()
            });
            let by = |name: &str| {
                spans
                    .iter()
                    .filter(|(res, _)| attribute(res, "isthmus.role") == Some(name))
                    .count()
            };
            anyhow::ensure!(by("sidecar") >= 2 && by("gateway") >= 2, "{spans:#?}");
            Ok(spans)
        },
    )
    .await?;
    // The successful request's hops, found by role, cluster and kind.
    let find = |role: &str, cluster: &str, kind: i32| {
        spans
            .iter()
            .filter(|(res, s)| {
                attribute(res, "isthmus.role") == Some(role)
                    && attribute(res, "isthmus.cluster") == Some(cluster)
                    && s.kind == kind
                    && s.status.as_ref().is_none_or(|st| st.code != 2)
            })
            .map(|(_, s)| s.clone())
            .next_back()
            .unwrap_or_else(|| panic!("no {role} span in {cluster} of kind {kind}: {spans:#?}"))
    };
    const SERVER: i32 = 2;
    const CLIENT: i32 = 3;
    let client = find("sidecar", "east", CLIENT);
    let east_gw = find("gateway", "east", CLIENT);
    let west_gw = find("gateway", "west", SERVER);
    let server = find("sidecar", "west", SERVER);
    assert_eq!(
        hex(&client.parent_span_id),
        caller_span,
        "the client sidecar continues the caller"
    );
    assert_eq!(
        east_gw.parent_span_id, client.span_id,
        "east gateway under the client sidecar"
    );
    assert_eq!(
        west_gw.parent_span_id, east_gw.span_id,
        "west gateway under east's"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the server sidecar serves the client's request"
    );
    assert_eq!(
        attribute(&server.attributes, "isthmus.source.workload"),
        Some("client")
    );
    assert_eq!(
        attribute(&client.attributes, "isthmus.destination.workload"),
        Some("echo-west")
    );
    assert_eq!(
        attribute(&client.attributes, "isthmus.destination.cluster"),
        Some("west")
    );
    // The app got the server sidecar's context: its own spans continue the trace.
    assert_eq!(
        answer.headers.get("traceparent").map(String::as_str),
        Some(format!("00-{trace}-{}-01", hex(&server.span_id)).as_str())
    );

    // The same request in the metrics (both reporters) and in access-log records.
    eventually(
        "the request's metrics over OTLP",
        Duration::from_secs(15),
        || async {
            let reporters: Vec<String> = receiver.read(|r| {
                r.metrics
                    .iter()
                    .filter(|(_, m)| m.name == "istio_requests")
                    .flat_map(|(_, m)| match &m.data {
                        Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) => {
                            s.data_points.clone()
                        }
                        _ => Vec::new(),
                    })
                    .filter(|p| attribute(&p.attributes, "destination_service") == Some(HOST))
                    .filter(|p| attribute(&p.attributes, "response_code") == Some("200"))
                    .filter_map(|p| attribute(&p.attributes, "reporter").map(str::to_owned))
                    .collect()
            });
            anyhow::ensure!(
                reporters.iter().any(|r| r == "source")
                    && reporters.iter().any(|r| r == "destination"),
                "{reporters:?}"
            );
            Ok(())
        },
    )
    .await?;
    eventually(
        "the request's access logs over OTLP",
        Duration::from_secs(15),
        || async {
            let logged: Vec<String> = receiver.read(|r| {
                r.logs
                    .iter()
                    .filter(|(_, l)| hex(&l.trace_id) == trace)
                    .filter(|(_, l)| attribute(&l.attributes, "path") == Some("/traced"))
                    .filter_map(|(res, _)| attribute(res, "isthmus.cluster").map(str::to_owned))
                    .collect()
            });
            anyhow::ensure!(
                logged.iter().any(|c| c == "east") && logged.iter().any(|c| c == "west"),
                "{logged:?}"
            );
            Ok(())
        },
    )
    .await?;
    // Every export carried the configured header.
    let tenants = receiver.read(|r| {
        r.headers
            .iter()
            .all(|h| h.get("x-tenant").is_some_and(|v| v == "team-a"))
    });
    assert!(tenants, "every export carries x-tenant");
    Ok(())
}

/// OTLP over HTTP/protobuf, with access logs as JSON on standard output too: a request
/// between two sidecars of one cluster reaches the collector as two linked spans, its
/// metrics and its access-log records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_http_protobuf_carries_spans_metrics_and_logs() -> anyhow::Result<()> {
    use isthmus_tests::otlp::{attribute, OtlpReceiver};
    let receiver = OtlpReceiver::start(isthmus_tests::fresh_ip(0, 9)).await?;
    let endpoint = receiver.http_endpoint();
    let mut mesh = Mesh::start_configured(&["east"], |m| {
        m.telemetry = isthmus_core::otlp::TelemetryConfig {
            otlp: Some(isthmus_core::otlp::Config {
                endpoint,
                protocol: isthmus_core::otlp::Protocol::HttpProtobuf,
                headers: Vec::new(),
                metrics_interval: Duration::from_secs(1),
                sampling: 100.0,
                ..Default::default()
            }),
            access_log: isthmus_core::otlp::AccessLogFormat::Json,
        };
    })
    .await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    // No context from the caller: the client sidecar starts the trace (sampling 100%).
    eventually("a request to echo", Duration::from_secs(10), || async {
        let r = AppClient::new().get(outbound, HOST, "/over-http").await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(())
    })
    .await?;
    eventually(
        "two linked spans over HTTP",
        Duration::from_secs(15),
        || async {
            let spans = receiver.read(|r| r.spans.clone());
            // A root client span (earlier tries may have found no route yet) with the server
            // sidecar's span under it.
            let linked = spans.iter().any(|(_, c)| {
                c.kind == 3
                    && c.parent_span_id.is_empty()
                    && attribute(&c.attributes, "url.path") == Some("/over-http")
                    && spans.iter().any(|(_, s)| {
                        s.kind == 2 && s.parent_span_id == c.span_id && s.trace_id == c.trace_id
                    })
            });
            anyhow::ensure!(linked, "no client span with its server span: {spans:#?}");
            Ok(())
        },
    )
    .await?;
    eventually(
        "metrics and logs over HTTP",
        Duration::from_secs(15),
        || async {
            let (metrics, logs) = receiver.read(|r| {
                (
                    r.metrics
                        .iter()
                        .any(|(_, m)| m.name == "istio_request_duration_milliseconds"),
                    r.logs
                        .iter()
                        .filter(|(_, l)| attribute(&l.attributes, "path") == Some("/over-http"))
                        .count(),
                )
            });
            anyhow::ensure!(metrics && logs >= 2, "metrics {metrics}, logs {logs}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// The mesh config's providers for the Telemetry test: traces and access logs to the
/// test's OTLP receiver, and a JSON file log in a format of the provider's own.
fn telemetry_mesh_config(otlp: SocketAddr, file: &std::path::Path) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    defaultConfig:\n      tracing: {{sampling: 100}}\n    extensionProviders:\n    - name: otel\n      opentelemetry: {{service: \"{ip}\", port: {port}, grpc: {{initialMetadata: [{{name: x-tenant, value: mesh-config}}]}}}}\n    - name: otel-logs\n      envoyOtelAls: {{service: \"{ip}\", port: {port}}}\n    - name: errors-file\n      envoyFileAccessLog:\n        path: {path}\n        logFormat:\n          labels: {{code: \"%RESPONSE_CODE%\", path: \"%REQ(:PATH)%\", user: \"%REQ(X-USER)%\", flags: \"%RESPONSE_FLAGS%\"}}\n",
        ip = otlp.ip(),
        port = otlp.port(),
        path = file.display(),
    )
}

/// Mesh-wide: every request traced to `otel` with a literal and a header tag; error
/// responses logged to OTLP and, for the echo service, to the file. For echo's own
/// workloads: no request count on the server side, and no `request_protocol` label.
fn telemetry_objects(team: &str, echo_override: bool) -> String {
    let mut yaml = format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - providers: [{{name: otel}}]\n    customTags:\n      team: {{literal: {{value: {team}}}}}\n      user: {{header: {{name: x-user, defaultValue: anonymous}}}}\n  accessLogging:\n  - providers: [{{name: otel-logs}}]\n    filter: {{expression: \"response.code >= 400\"}}\n  - match: {{mode: CLIENT}}\n    providers: [{{name: errors-file}}]\n    filter: {{expression: \"response.code >= 500 && request.headers['x-user'] == 'alice'\"}}\n"
    );
    if echo_override {
        yaml.push_str("---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: echo, namespace: demo}\nspec:\n  selector: {matchLabels: {app: echo}}\n  metrics:\n  - overrides:\n    - match: {metric: REQUEST_COUNT, mode: SERVER}\n      disabled: true\n    - tagOverrides: {request_protocol: {operation: REMOVE}}\n");
    }
    yaml
}

/// The lines of a sidecar's Prometheus page for `metric` with `reporter`.
async fn series_lines(
    admin: SocketAddr,
    metric: &str,
    reporter: &str,
) -> anyhow::Result<Vec<String>> {
    let reply = AppClient::new()
        .get(admin, &admin.to_string(), "/stats/prometheus")
        .await?;
    Ok(String::from_utf8_lossy(&reply.body)
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{metric}{{")) && l.contains(&format!("reporter=\"{reporter}\""))
        })
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_telemetry_resources_choose_traces_logs_and_metrics_per_workload_live(
) -> anyhow::Result<()> {
    use isthmus_tests::otlp::{attribute, OtlpReceiver};
    let receiver = OtlpReceiver::start(isthmus_tests::fresh_ip(0, 9)).await?;
    let otlp: SocketAddr = receiver.endpoint().trim_start_matches("http://").parse()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("errors.log");
    // No telemetry flags: the mesh config and Telemetry resources decide everything.
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.apply("east", "mesh.yaml", &telemetry_mesh_config(otlp, &file))
        .await?;
    mesh.apply("east", "telemetry.yaml", &telemetry_objects("core", true))
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let alice = [("x-user", "alice")];
    eventually(
        "a traced request with the Telemetry's tags",
        Duration::from_secs(20),
        || async {
            let r = client
                .send(outbound, HOST, "/traced", false, &alice)
                .await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            let spans = receiver.read(|r| r.spans.clone());
            let tagged = |kind: i32| {
                spans.iter().any(|(_, s)| {
                    s.kind == kind
                        && attribute(&s.attributes, "url.path") == Some("/traced")
                        && attribute(&s.attributes, "team") == Some("core")
                        && attribute(&s.attributes, "user") == Some("alice")
                })
            };
            anyhow::ensure!(
                tagged(3) && tagged(2),
                "client and server spans: {spans:#?}"
            );
            Ok(())
        },
    )
    .await?;
    // From here on both sidecars run the Telemetry's config (their spans carry its tags).
    let echo_admin = mesh.workload("east", "echo-east").admin();
    let client_admin = mesh.workload("east", "client").admin();
    let destination = [("reporter", "destination")];
    let counted_before =
        isthmus_tests::metric_sum(echo_admin, "istio_requests_total", &destination).await?;
    // The config dump says what is in force, and where it came from.
    let dump = isthmus_tests::config_dump(client_admin).await?;
    let t = &dump["telemetry"];
    assert_eq!(t["from"], "mesh config", "{t}");
    assert_eq!(t["client"]["tracing"]["provider"], "otel", "{t}");
    assert_eq!(t["client"]["tracing"]["sampling_percent"], 100.0, "{t}");
    assert_eq!(
        t["client"]["access_logs"][1]["filter"], "response.code >= 400",
        "{t}"
    );
    // The provider's initialMetadata went with the exports.
    assert!(receiver.read(|r| r
        .headers
        .iter()
        .any(|h| h.get("x-tenant").is_some_and(|v| v == "mesh-config"))));

    // A failing request and a good one: only the failure is logged, by both filters.
    for (path, user) in [
        ("/status/503", "alice"),
        ("/fine", "alice"),
        ("/status/503", "bob"),
    ] {
        let r = client
            .send(outbound, HOST, path, false, &[("x-user", user)])
            .await?;
        assert_eq!(r.status, if path == "/fine" { 200 } else { 503 });
    }
    eventually(
        "OTLP access logs of failures only",
        Duration::from_secs(15),
        || async {
            let logs = receiver.read(|r| r.logs.clone());
            let paths: Vec<&str> = logs
                .iter()
                .filter_map(|(_, l)| attribute(&l.attributes, "path"))
                .collect();
            // Two 503s, each logged by the client and the server sidecar.
            let failures = paths.iter().filter(|p| **p == "/status/503").count();
            anyhow::ensure!(failures == 4, "503 records {failures}: {paths:?}");
            anyhow::ensure!(
                !paths.iter().any(|p| *p == "/fine" || *p == "/traced"),
                "a successful request was logged: {paths:?}"
            );
            Ok(())
        },
    )
    .await?;
    // The file provider's own JSON fields, for alice's failure only, from the client side.
    eventually("the file log", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(lines.len() == 1, "file lines: {text}");
        let l = &lines[0];
        anyhow::ensure!(
            l["code"] == "503" && l["path"] == "/status/503" && l["user"] == "alice",
            "line: {l}"
        );
        anyhow::ensure!(l.as_object().map(|o| o.len()) == Some(4), "fields: {l}");
        Ok(())
    })
    .await?;

    // Metrics: echo's sidecar counts no more requests as the server (series from before
    // the Telemetry applied stay as they were), and its new series have no
    // request_protocol; the client's sidecar keeps every metric and label.
    let counted =
        isthmus_tests::metric_sum(echo_admin, "istio_requests_total", &destination).await?;
    assert_eq!(
        counted, counted_before,
        "REQUEST_COUNT is off on the server side"
    );
    let durations = series_lines(
        echo_admin,
        "istio_request_duration_milliseconds_count",
        "destination",
    )
    .await?;
    let reshaped: Vec<&String> = durations
        .iter()
        .filter(|l| !l.contains("request_protocol="))
        .collect();
    assert!(
        reshaped.iter().any(|l| l.contains("response_code=\"503\"")
            && l.contains("destination_workload=\"echo-east\"")),
        "durations without request_protocol: {durations:?}"
    );
    let source = series_lines(client_admin, "istio_requests_total", "source").await?;
    assert!(
        source
            .iter()
            .any(|l| l.contains("request_protocol=\"http\"") && l.contains("response_code=\"503\"")),
        "the client's metrics keep every label: {source:?}"
    );

    // A Telemetry the controller cannot act on is refused by name, and the one in force
    // stays.
    let bad = telemetry_objects("core", true).replace(
        "response.code >= 400",
        "xds.cluster_name == 'BlackHoleCluster'",
    );
    let refused = mesh.apply("east", "telemetry.yaml", &bad).await;
    let e = format!(
        "{:#}",
        refused.expect_err("an unsupported filter is refused")
    );
    assert!(
        e.contains("spec.accessLogging[0].filter.expression") && e.contains("xds.cluster_name"),
        "{e}"
    );

    // A live change: new tags, and echo's override gone. Requests under way are not
    // disturbed, and new ones follow the new config.
    mesh.apply("east", "telemetry.yaml", &telemetry_objects("edge", false))
        .await?;
    eventually(
        "the new tag on new spans",
        Duration::from_secs(20),
        || async {
            let r = client
                .send(outbound, HOST, "/retagged", false, &alice)
                .await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            let spans = receiver.read(|r| r.spans.clone());
            anyhow::ensure!(
                spans
                    .iter()
                    .any(
                        |(_, s)| attribute(&s.attributes, "url.path") == Some("/retagged")
                            && attribute(&s.attributes, "team") == Some("edge")
                    ),
                "no retagged span yet"
            );
            Ok(())
        },
    )
    .await?;
    eventually(
        "echo's requests counted again",
        Duration::from_secs(5),
        || async {
            let _ = client.get(outbound, HOST, "/count-me").await?;
            let counted =
                isthmus_tests::metric_sum(echo_admin, "istio_requests_total", &destination).await?;
            anyhow::ensure!(counted > counted_before, "{counted} requests counted");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_to_a_collector_behind_tls_checks_its_certificate() -> anyhow::Result<()> {
    use isthmus_core::otlp::Protocol;
    use isthmus_tests::otlp::{attribute, OtlpReceiver};
    let ip = isthmus_tests::fresh_ip(0, 9);
    let ca = isthmus_tests::TestCa::new("collector CA")?;
    let (cert, key) = ca.issue(&[&ip.to_string()])?;
    let receiver = OtlpReceiver::start_tls(ip, &cert, &key).await?;
    let other_ca = isthmus_tests::TestCa::new("someone else's CA")?;
    for (protocol, endpoint, roots, path) in [
        (Protocol::Grpc, receiver.endpoint(), &ca.pem, "/tls-grpc"),
        (
            Protocol::HttpProtobuf,
            receiver.http_endpoint(),
            &ca.pem,
            "/tls-http",
        ),
        // A collector whose certificate does not chain to the configured roots gets nothing.
        (
            Protocol::Grpc,
            receiver.endpoint(),
            &other_ca.pem,
            "/untrusted",
        ),
    ] {
        assert!(endpoint.starts_with("https://"), "{endpoint}");
        let mut mesh = Mesh::start_configured(&["east"], |m| {
            m.telemetry.otlp = Some(isthmus_core::otlp::Config {
                endpoint,
                protocol,
                sampling: 100.0,
                metrics_interval: Duration::from_secs(1),
                ca_pem: Some(roots.clone()),
                ..Default::default()
            });
        })
        .await?;
        mesh.add_workload("east", "echo-east", Some("echo"), "echo")
            .await?;
        mesh.add_workload("east", "client", None, "frontend")
            .await?;
        let outbound = mesh.workload("east", "client").outbound();
        let exported = || {
            receiver.read(|r| {
                r.spans
                    .iter()
                    .any(|(_, s)| attribute(&s.attributes, "url.path") == Some(path))
            })
        };
        eventually(
            "a request through the mesh",
            Duration::from_secs(10),
            || async {
                let r = AppClient::new().get(outbound, HOST, path).await?;
                anyhow::ensure!(r.status == 200, "status {}", r.status);
                Ok(())
            },
        )
        .await?;
        if path == "/untrusted" {
            // The proxy tries, refuses the certificate, and sends nothing; requests keep
            // working.
            eventually("a refused handshake", Duration::from_secs(15), || async {
                anyhow::ensure!(receiver.read(|r| r.tls_failures) > 0, "no handshake yet");
                Ok(())
            })
            .await?;
            assert!(
                !exported(),
                "spans went to a collector the proxy does not trust"
            );
            let r = AppClient::new().get(outbound, HOST, path).await?;
            assert_eq!(r.status, 200);
        } else {
            eventually(
                &format!("spans over TLS ({path})"),
                Duration::from_secs(15),
                || async {
                    anyhow::ensure!(exported(), "no span of {path} yet");
                    Ok(())
                },
            )
            .await?;
        }
    }
    Ok(())
}
