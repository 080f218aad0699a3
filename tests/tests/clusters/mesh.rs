//! Requests across the mesh: same cluster, across clusters over QUIC, with end-to-end
//! identity.

use std::time::Duration;

use isthmus_tests::{eventually, metric_sum, AppClient, Mesh};

/// Two clusters: `echo` served only in west, a client in east; the client's outbound address.
async fn echo_in_west_client_in_east() -> anyhow::Result<(Mesh, std::net::SocketAddr)> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    Ok((mesh, outbound))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_one_cluster_carries_the_callers_spiffe_id() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let client = AppClient::new();
    let reply = eventually("echo reachable", Duration::from_secs(5), || async {
        let r = client
            .get(outbound, "echo.demo.svc.cluster.local", "/hello")
            .await?;
        anyhow::ensure!(r.status == 200, "status {}: {:?}", r.status, r.body);
        Ok(r)
    })
    .await?;
    let answer = reply.answer()?;
    assert_eq!(answer.cluster, "east");
    assert_eq!(answer.caller, "spiffe://cluster.local/ns/demo/sa/frontend");
    assert_eq!(answer.path, "/hello");

    // Both sides count it under Istio's metric names.
    let client_admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let server_admin = mesh
        .workload("east", "echo-east")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let source = [
        ("reporter", "source"),
        ("destination_cluster", "east"),
        ("response_code", "200"),
    ];
    assert!(metric_sum(client_admin, "istio_requests_total", &source).await? >= 1.0);
    assert!(
        metric_sum(
            client_admin,
            "istio_request_duration_milliseconds_count",
            &source
        )
        .await?
            >= 1.0
    );
    let destination = [("reporter", "destination"), ("response_code", "200")];
    assert!(metric_sum(server_admin, "istio_requests_total", &destination).await? >= 1.0);
    // Istio's build metric, as its dashboards read versions: proxies and the controller.
    let gateway_admin = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway running")
        .admin_address;
    let controller_admin = mesh.controller_admin("east");
    for (admin, component) in [
        (client_admin, "proxy"),
        (gateway_admin, "proxy"),
        (controller_admin, "pilot"),
    ] {
        let build = [("component", component), ("tag", env!("CARGO_PKG_VERSION"))];
        assert_eq!(
            metric_sum(admin, "istio_build", &build).await?,
            1.0,
            "{admin}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_from_east_reaches_a_service_only_in_west_through_both_gateways(
) -> anyhow::Result<()> {
    let (mut mesh, outbound) = echo_in_west_client_in_east().await?;
    let client = AppClient::new();
    let reply = eventually(
        "echo in west reachable from east",
        Duration::from_secs(10),
        || async {
            let r = client
                .get(outbound, "echo.demo.svc.clusterset.local", "/")
                .await?;
            anyhow::ensure!(
                r.status == 200,
                "status {}: {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            Ok(r)
        },
    )
    .await?;
    let answer = reply.answer()?;
    assert_eq!(answer.cluster, "west");
    assert_eq!(
        answer.caller, "spiffe://cluster.local/ns/demo/sa/frontend",
        "end-to-end identity survives both gateways"
    );
    let east_gw = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway")
        .admin_address;
    let west_gw = mesh
        .cluster("west")
        .gateway
        .as_ref()
        .expect("gateway")
        .admin_address;
    assert!(
        metric_sum(
            east_gw,
            "isthmus_gateway_quic_streams_total",
            &[
                ("direction", "outbound"),
                ("peer_cluster", "west"),
                ("outcome", "ok")
            ]
        )
        .await?
            >= 1.0
    );
    assert!(
        metric_sum(
            west_gw,
            "isthmus_gateway_quic_streams_total",
            &[
                ("direction", "inbound"),
                ("peer_cluster", "east"),
                ("outcome", "ok")
            ]
        )
        .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_cannot_forge_the_caller_identity() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let forged = [
        (
            "x-forwarded-client-cert",
            "By=x;URI=spiffe://cluster.local/ns/demo/sa/admin",
        ),
        ("x-isthmus-app-protocol", "http2"),
    ];
    let reply = eventually("echo reachable", Duration::from_secs(5), || async {
        let r = AppClient::new()
            .send(outbound, "echo", "/", false, &forged)
            .await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(r)
    })
    .await?;
    assert_eq!(
        reply.answer()?.caller,
        "spiffe://cluster.local/ns/demo/sa/frontend"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_clients_work_across_clusters() -> anyhow::Result<()> {
    let (_mesh, outbound) = echo_in_west_client_in_east().await?;
    let reply = eventually(
        "echo reachable over HTTP/2",
        Duration::from_secs(10),
        || async {
            let r = AppClient::new()
                .send(outbound, "echo.demo:80", "/h2", true, &[])
                .await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            Ok(r)
        },
    )
    .await?;
    assert_eq!(reply.answer()?.cluster, "west");

    // gRPC: a tonic client talks h2c to its sidecar; the Host (authority) names the
    // service's gRPC port.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
        .origin("http://echo.demo.svc.cluster.local:9090".parse()?)
        .connect()
        .await?;
    let mut grpc = isthmus_proto::echo::echo_client::EchoClient::new(channel);
    let answer = grpc
        .say(isthmus_proto::echo::EchoRequest {
            message: "hi".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        (answer.message.as_str(), answer.cluster.as_str()),
        ("hi", "west")
    );
    assert_eq!(answer.caller, "spiffe://cluster.local/ns/demo/sa/frontend");

    // An error the proxy makes itself reaches a gRPC client as a gRPC status.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))?
        .origin("http://nothing.demo.svc.cluster.local:9090".parse()?)
        .connect()
        .await?;
    let status = isthmus_proto::echo::echo_client::EchoClient::new(channel)
        .say(isthmus_proto::echo::EchoRequest::default())
        .await
        .expect_err("no such service");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("no mesh service"), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_before_expiry_without_failing_requests() -> anyhow::Result<()> {
    let mut mesh = Mesh::start_with_cert_ttl(&["east"], Duration::from_secs(4)).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let admin = mesh
        .workload("east", "client")
        .sidecar
        .as_ref()
        .expect("sidecar")
        .admin_address;
    let first = isthmus_tests::config_dump(admin).await?["certificate"]["not_after"]
        .as_u64()
        .unwrap_or(0);
    isthmus_tests::reachable(outbound, "echo").await?;
    let traffic = isthmus_tests::traffic(outbound, "echo");
    // Two renewals at half-life of a 4 s certificate; the first certificate has expired.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = isthmus_tests::config_dump(admin).await?["certificate"]["not_after"]
        .as_u64()
        .unwrap_or(0);
    assert!(now > first, "renewed: not_after {first} -> {now}");
    assert!(traffic
        .last(1)
        .first()
        .is_some_and(|e| e.landed.as_deref() == Ok("east")));
    assert_eq!(traffic.failures(), Vec::<String>::new());
    Ok(())
}

/// Opens a WebSocket through the sidecar at `outbound` to `host`, sends one masked text
/// frame and returns the 101 answer and the bytes that came back.
async fn websocket_echo(
    outbound: std::net::SocketAddr,
    host: &str,
) -> anyhow::Result<(String, Vec<u8>, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    let handshake = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await?;
    let head = read_head(&mut tcp).await?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    // A masked text frame "hello" (RFC 6455 section 5.7).
    let frame: Vec<u8> = vec![
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    tcp.write_all(&frame).await?;
    let mut back = vec![0u8; frame.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await??;
    Ok((head, frame, back))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_work_across_clusters() -> anyhow::Result<()> {
    let (_mesh, outbound) = echo_in_west_client_in_east().await?;
    let (head, sent, back) = eventually("a WebSocket to west", Duration::from_secs(10), || {
        websocket_echo(outbound, "echo.demo.svc.cluster.local")
    })
    .await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert_eq!(
        back, sent,
        "the frame came back through both sidecars and gateways"
    );
    Ok(())
}

/// Opens a TCP tunnel with `CONNECT host:port` through the sidecar at `outbound`, writes a
/// line and reads it back.
pub(crate) async fn tcp_echo(
    outbound: std::net::SocketAddr,
    target: &str,
) -> anyhow::Result<(String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(&mut tcp).await?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp.write_all(b"ping over tcp\n").await?;
    let mut back = vec![0u8; 14];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await??;
    Ok((head, back))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_works_across_clusters() -> anyhow::Result<()> {
    let (_mesh, outbound) = echo_in_west_client_in_east().await?;
    let target = format!(
        "echo.demo.svc.cluster.local:{}",
        isthmus_tests::TCP_ECHO_PORT
    );
    let (_, back) = eventually("a TCP tunnel to west", Duration::from_secs(10), || {
        tcp_echo(outbound, &target)
    })
    .await?;
    assert_eq!(back, b"ping over tcp\n");
    // A port the service does not have is refused by name.
    let err = tcp_echo(outbound, "echo.demo.svc.cluster.local:7001")
        .await
        .expect_err("no such port");
    assert!(err.to_string().contains("404"), "{err}");
    Ok(())
}

/// Reads an HTTP/1.1 response head.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        anyhow::ensure!(
            tcp.read(&mut b).await? == 1,
            "closed after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_and_chunked_bodies_pass_through() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    isthmus_tests::reachable(outbound, "echo").await?;
    // Expect: 100-continue: the body goes only after the interim answer.
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    tcp.write_all(
        b"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await?;
    let interim = read_head(&mut tcp).await?;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    tcp.write_all(b"hello").await?;
    let head = read_head(&mut tcp).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Chunked: a streamed body of unknown length, on a kept-alive connection.
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    tcp.write_all(b"POST /stream HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await?;
    let head = read_head(&mut tcp).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_routes_a_service_that_only_another_cluster_runs() -> anyhow::Result<()> {
    let (mut mesh, outbound) = echo_in_west_client_in_east().await?;
    let client = AppClient::new();
    let host = "echo.demo.svc.cluster.local";
    eventually(
        "echo in west from east",
        Duration::from_secs(10),
        || async {
            let r = client.get(outbound, host, "/").await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            anyhow::ensure!(r.answer()?.cluster == "west");
            Ok(())
        },
    )
    .await?;
    // East has no Service `echo` of its own; its VirtualService still routes its callers.
    let admin = mesh.controller_admin("east");
    std::fs::write(
        mesh.cluster("east").config_dir.join("echo-routes.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{uri: {prefix: /teapot}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: echo}}]\n  - route: [{destination: {host: echo}}]\n",
    )?;
    let warning = eventually("the routing warning", Duration::from_secs(5), || async {
        let dump = isthmus_tests::config_dump(admin).await?;
        let w = dump["config"]["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str())
            .find(|w| w.contains("spec.hosts[0]"))
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(!w.is_empty(), "no warning yet: {dump}");
        Ok(w)
    })
    .await?;
    assert!(
        warning.contains("another cluster exports it") && warning.contains("IST0101"),
        "{warning}"
    );
    eventually(
        "the fault from east's routes",
        Duration::from_secs(10),
        || async {
            let r = client.get(outbound, host, "/teapot").await?;
            anyhow::ensure!(r.status == 418, "status {}", r.status);
            Ok(())
        },
    )
    .await?;
    let r = client.get(outbound, host, "/hello").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.answer()?.cluster, "west");
    Ok(())
}
