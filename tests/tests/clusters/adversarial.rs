//! Hostile clients and misbehaving apps against a real mesh. Every case is an assertion
//! twice over: the bad request gets its own specific answer, and a well-behaved client
//! sending steady traffic alongside sees no failed request (and no endpoint is ejected, so
//! its traffic stays home).
//!
//! Raw HTTP/1.1 goes over plain TCP; HTTP/2 floods are written frame by frame, so the
//! sidecar meets exactly the bytes a hostile client would send.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_tests::{eventually, metric_sum, reachable, traffic, AppClient, Mesh, Traffic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "echo.demo.svc.cluster.local";

/// echo in east and west, a client in east whose traffic settles in east; an ejection of
/// the east endpoint would move it to west, so "still east" means "never ejected".
async fn two_clusters(
    limits: isthmus_sidecar::ingress::Limits,
) -> anyhow::Result<(Mesh, SocketAddr, Traffic)> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.cluster("east").limits = limits;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("west", "echo-west", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "client").await?;
    let outbound = mesh.workload("east", "client").outbound();
    reachable(outbound, HOST).await?;
    eventually("west to be known", Duration::from_secs(10), || async {
        let dump = isthmus_tests::config_dump(admin_of(outbound)).await?;
        let remote = dump["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == HOST)
            .and_then(|s| s["remote"].as_array().map(Vec::len));
        anyhow::ensure!(remote == Some(1), "remote clusters: {remote:?}");
        Ok(())
    })
    .await?;
    let t = traffic(outbound, HOST);
    isthmus_tests::settles_in(&t, "east", 10, Duration::from_secs(10)).await?;
    Ok((mesh, outbound, t))
}

/// A sidecar's admin address: its pod's address, port 15000.
fn admin_of(outbound: SocketAddr) -> SocketAddr {
    SocketAddr::new(outbound.ip(), 15000)
}

/// Asserts the well-behaved traffic never failed and still lands in east, and that no
/// endpoint was ejected by the client's sidecar.
async fn others_unharmed(traffic: &Traffic, outbound: SocketAddr) -> anyhow::Result<()> {
    isthmus_tests::settles_in(traffic, "east", 10, Duration::from_secs(5)).await?;
    assert_eq!(
        traffic.failures(),
        Vec::<String>::new(),
        "a well-behaved client saw failures"
    );
    let ejections = metric_sum(admin_of(outbound), "isthmus_sidecar_ejections_total", &[]).await?;
    assert_eq!(ejections, 0.0, "an endpoint was ejected");
    Ok(())
}

async fn upstream_connections(outbound: SocketAddr) -> anyhow::Result<f64> {
    metric_sum(
        admin_of(outbound),
        "isthmus_sidecar_upstream_connections_total",
        &[],
    )
    .await
}

/// Writes `request` on a fresh connection and reads until the server closes it or
/// `wait` passes; returns what came back and when the server closed (if it did).
async fn raw_h1(
    addr: SocketAddr,
    request: &[u8],
    wait: Duration,
) -> anyhow::Result<(String, Option<Duration>)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let started = Instant::now();
    tcp.write_all(request).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Ok((
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(started.elapsed()),
                ))
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Ok((String::from_utf8_lossy(&out).into_owned(), None)),
        }
    }
}

fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_gets_431_and_leaves_the_shared_connection_alone() -> anyhow::Result<()>
{
    let (_mesh, outbound, traffic) = two_clusters(Default::default()).await?;
    let client = AppClient::new();
    let opened = upstream_connections(outbound).await?;
    // Requests in flight on the shared sidecar-to-sidecar connection meanwhile.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get(outbound, HOST, "/delay/700").await })
        })
        .collect();
    let big = "a".repeat(100 * 1024);
    let r = client
        .send(outbound, HOST, "/", false, &[("x-big", &big)])
        .await?;
    assert_eq!(r.status, 431, "100 KiB header over HTTP/1.1");
    let just_over = "a".repeat(61 * 1024);
    let r = client
        .send(outbound, HOST, "/", false, &[("x-big", &just_over)])
        .await?;
    assert_eq!(r.status, 431, "61 KiB header over HTTP/1.1");
    assert_eq!(
        r.headers.get("x-isthmus-error").map(|v| v.as_bytes()),
        Some(&b"request-headers-too-large"[..])
    );
    let r = client
        .send(outbound, HOST, "/", true, &[("x-big", &just_over)])
        .await?;
    assert_eq!(r.status, 431, "61 KiB header over HTTP/2");
    let names: Vec<String> = (0..101).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let r = client.send(outbound, HOST, "/", true, &many).await?;
    assert_eq!(r.status, 431, "101 headers over HTTP/2");
    // 100 KiB over HTTP/2 is past what the listener's SETTINGS allow: refused per stream.
    let refused = client
        .send(outbound, HOST, "/", true, &[("x-big", &big)])
        .await;
    assert!(
        refused.as_ref().map(|r| r.status == 431).unwrap_or(true),
        "{refused:?}"
    );
    // 59 KiB is within the limit and crosses the mesh.
    let fits = "a".repeat(59 * 1024);
    let r = client
        .send(outbound, HOST, "/", false, &[("x-big", &fits)])
        .await?;
    assert_eq!(r.status, 200);
    for s in slow {
        assert_eq!(s.await??.status, 200, "a request in flight was hurt");
    }
    assert_eq!(
        upstream_connections(outbound).await?,
        opened,
        "the shared connection was replaced"
    );
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_client_cancellations_never_make_the_peer_close_the_shared_connection(
) -> anyhow::Result<()> {
    let (mut mesh, outbound, traffic) = two_clusters(Default::default()).await?;
    let opened = upstream_connections(outbound).await?;
    let tcp = TcpStream::connect(outbound).await?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    // Like an h2load run cut short: hundreds of requests started and abandoned at once.
    for round in 0..20u64 {
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let mut send = send.clone();
            let req = http::Request::get(format!("http://{HOST}/delay/200"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            // Cancelled after 0 to 2 ms: some before the sidecar forwards them, many while
            // its HEADERS and the reset travel to the peer together.
            let after = Duration::from_micros((round * 100 + i * 7) % 2000);
            tasks.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(after, send.send_request(req)).await;
            }));
        }
        for t in tasks {
            t.await?;
        }
    }
    let r = AppClient::new().get(outbound, HOST, "/").await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        upstream_connections(outbound).await?,
        opened,
        "the peer closed the shared connection"
    );

    // What a destination sidecar meets when many of a peer's clients cancel at once: the
    // streams and their resets arrive together, before it has accepted them. Sent frame by
    // frame over mTLS as the calling sidecar would.
    use frames::*;
    let identity = isthmus_core::tls::TlsIdentity::new(
        mesh.ca_client("east", "east", "client", "client")?
            .fetch(None)
            .await?,
    );
    let td = identity.id().trust_domain().to_owned();
    let tls = tokio_rustls::TlsConnector::from(identity.client_config(
        isthmus_core::tls::PeerPolicy::TrustDomain(td),
        &[isthmus_core::tls::ALPN_H2],
    ));
    let echo_east = SocketAddr::new(mesh.workload("east", "echo-east").ip.into(), 15008);
    let tcp = TcpStream::connect(echo_east).await?;
    let mut peer = tls.connect(isthmus_core::tls::server_name(), tcp).await?;
    let mut burst = PREFACE.to_vec();
    burst.extend(frame(SETTINGS, 0, 0, &[]));
    burst.extend(open_and_reset(500, &format!("{HOST}:80"), "/"));
    peer.write_all(&burst).await?;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, peer.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!goaway_in(&seen), "the destination sidecar sent GOAWAY");
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_faults_are_answered_to_the_client_and_never_eject_the_destination(
) -> anyhow::Result<()> {
    let limits = isthmus_sidecar::ingress::Limits {
        stream_idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (_mesh, outbound, traffic) = two_clusters(limits).await?;
    let head = |len: usize| {
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n")
    };
    for _ in 0..4 {
        // A large upload cut off mid-body: the client disconnects.
        let mut tcp = TcpStream::connect(outbound).await?;
        tcp.write_all(head(200_000).as_bytes()).await?;
        tcp.write_all(&vec![b'x'; 40_000]).await?;
        drop(tcp);
        // A small body shorter than its Content-Length, then the client half-closes.
        let mut tcp = TcpStream::connect(outbound).await?;
        tcp.write_all(head(5_000).as_bytes()).await?;
        tcp.write_all(b"only a little").await?;
        tcp.shutdown().await?;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut rest)).await;
    }
    // A malformed chunk.
    let (r, _) = raw_h1(
        outbound,
        format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await?;
    assert_eq!(status_of(&r), Some(400), "malformed chunk: {r}");
    // A client that goes silent mid-body: 408 after the stream idle timeout.
    for len in [200_000, 5_000] {
        let started = Instant::now();
        let mut req = head(len).into_bytes();
        req.extend_from_slice(&[b'y'; 1000]);
        let (r, _) = raw_h1(outbound, &req, Duration::from_secs(5)).await?;
        assert_eq!(status_of(&r), Some(408), "silent client ({len} bytes): {r}");
        assert!(r.contains("downstream-timeout"), "{r}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_served_as_http1_and_unknown_upgrades_get_403() -> anyhow::Result<()> {
    let (_mesh, outbound, traffic) = two_clusters(Default::default()).await?;
    for _ in 0..4 {
        let (r, _) = raw_h1(
            outbound,
            format!("GET /h2c HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n").as_bytes(),
            Duration::from_secs(3),
        )
        .await?;
        assert!(r.starts_with("HTTP/1.1 200"), "h2c: {r}");
        assert!(r.contains("\"path\":\"/h2c\""), "{r}");
        // Neither the app nor the client sees the upgrade.
        assert!(
            !r.contains("\"upgrade\"") && !r.contains("http2-settings"),
            "{r}"
        );
        assert!(!r.to_ascii_lowercase().contains("upgrade: h2c"), "{r}");
        let (r, _) = raw_h1(
            outbound,
            format!(
                "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(3),
        )
        .await?;
        assert_eq!(status_of(&r), Some(403), "unknown upgrade: {r}");
        assert!(r.contains("upgrade-refused"), "{r}");
    }
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_app_can_forge_the_proxies_signals() -> anyhow::Result<()> {
    let (_mesh, outbound, traffic) = two_clusters(Default::default()).await?;
    let client = AppClient::new();
    let forged = "/?set-header=x-isthmus-error:app-unavailable&set-header=x-isthmus-upstream-cluster:forged&set-header=x-isthmus-upgrade:websocket";
    for _ in 0..5 {
        let r = client.get(outbound, HOST, forged).await?;
        assert_eq!(r.status, 200, "the app's own 200 stands");
        assert_eq!(r.headers.get("x-isthmus-error"), None);
        assert_eq!(
            r.headers
                .get("x-isthmus-upstream-cluster")
                .map(|v| v.as_bytes()),
            Some(&b"east"[..])
        );
        assert_eq!(r.headers.get("x-isthmus-upgrade"), None);
    }
    let r = client
        .send(
            outbound,
            HOST,
            "/",
            false,
            &[
                (
                    "x-forwarded-client-cert",
                    "By=x;URI=spiffe://cluster.local/ns/demo/sa/admin",
                ),
                ("x-isthmus-app-protocol", "http2"),
                ("x-isthmus-route", "forged"),
                ("x-isthmus-target-port", "22"),
            ],
        )
        .await?;
    let answer = r.answer()?;
    assert_eq!(answer.caller, "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(answer.protocol, "HTTP/1.1");
    let internal: Vec<&String> = answer
        .headers
        .keys()
        .filter(|k| k.starts_with("x-isthmus-"))
        .collect();
    assert!(internal.is_empty(), "the app saw {internal:?}");
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_normalized_path_and_the_app_receives_it() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "client").await?;
    mesh.cluster("east").limits.path_normalization =
        isthmus_core::path::Normalization::DecodeAndMergeSlashes;
    mesh.add_workload("east", "strict", None, "client").await?;
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http:\n  - match: [{uri: {prefix: /admin}}]\n    directResponse: {status: 403, body: {string: admin is closed}}\n  - route:\n    - destination: {host: echo}\n";
    mesh.apply("east", "echo-vs.yaml", vs).await?;
    mesh.wait_routes("east", "client", HOST, 2).await?;
    mesh.wait_routes("east", "strict", HOST, 2).await?;
    let base = mesh.workload("east", "client").outbound();
    let strict = mesh.workload("east", "strict").outbound();
    let client = AppClient::new();
    // (path sent, BASE answer, DECODE_AND_MERGE_SLASHES answer); 200 answers carry the
    // path the app received.
    let table: &[(&str, &str, &str)] = &[
        ("/admin", "403", "403"),
        ("/x/../admin", "403", "403"),
        ("/./admin", "403", "403"),
        ("/x/%2e%2e/admin", "403", "403"),
        ("/x/%2E%2E/admin/users", "403", "403"),
        ("/%61dmin", "403", "403"),
        (
            "/public/../x?q=/../admin",
            "/x?q=/../admin",
            "/x?q=/../admin",
        ),
        ("/a/./b", "/a/b", "/a/b"),
        ("//admin", "//admin", "403"),
        ("/x/..%2fadmin", "/x/..%2Fadmin", "403"),
        ("/a%2fb", "/a%2Fb", "/a/b"),
        ("/%7euser/%5fx", "/~user/_x", "/~user/_x"),
        ("/a%00b", "400", "400"),
    ];
    for (path, base_want, strict_want) in table {
        for (outbound, want, mode) in [(base, base_want, "BASE"), (strict, strict_want, "DECODE")] {
            let r = client.get(outbound, HOST, path).await?;
            let got = if r.status == 200 {
                r.answer()?.path
            } else {
                r.status.as_u16().to_string()
            };
            assert_eq!(&got, want, "{mode} {path}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_malformed_requests_get_envoys_answers() -> anyhow::Result<()> {
    let limits = isthmus_sidecar::ingress::Limits {
        request_headers_timeout: Duration::from_secs(1),
        stream_idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (_mesh, outbound, traffic) = two_clusters(limits).await?;
    // A request head that never ends is cut at the request-headers timeout.
    let (r, closed) = raw_h1(
        outbound,
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: 1").as_bytes(),
        Duration::from_secs(5),
    )
    .await?;
    let closed = closed.expect("the sidecar closes a half-sent head");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "{closed:?} {r}"
    );
    let cases: &[(&str, &str, u16)] = &[
        ("asterisk target", "OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\n\r\n", 400),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: {HOST}\r\nHost: other.demo\r\n\r\n",
            400,
        ),
        (
            "two different Content-Lengths",
            "POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
            400,
        ),
    ];
    for (what, req, want) in cases {
        let (r, _) = raw_h1(
            outbound,
            req.replace("{HOST}", HOST).as_bytes(),
            Duration::from_secs(3),
        )
        .await?;
        assert_eq!(status_of(&r), Some(*want), "{what}: {r}");
        assert!(!r.contains("/smuggled"), "{what}: {r}");
    }
    // Content-Length and Transfer-Encoding together (request smuggling): the chunked
    // framing wins (RFC 9112 §6.3), the connection closes after the one answer, and the
    // request hidden in the body is never served.
    let (r, closed) = raw_h1(
        outbound,
        format!("POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await?;
    assert!(closed.is_some(), "the connection closes: {r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
    assert!(!r.contains("/smuggled"), "{r}");
    // A response body that stalls is cut at the stream idle timeout.
    let started = Instant::now();
    let (r, closed) = raw_h1(
        outbound,
        format!("GET /stall-body HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await?;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("first chunk"),
        "{r}"
    );
    let closed = closed.expect("a stalled response is cut");
    assert!(
        closed < Duration::from_secs(3) && started.elapsed() >= Duration::from_millis(900),
        "{closed:?}"
    );
    others_unharmed(&traffic, outbound).await
}

/// HTTP/2 frames written by hand, as a hostile client sends them.
mod frames {
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const CONTINUATION: u8 = 9;
    pub const END_STREAM: u8 = 1;
    pub const END_HEADERS: u8 = 4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn literal(out: &mut Vec<u8>, prefix: u8, name: &str, value: &[u8]) {
        out.push(prefix);
        int(out, name.len(), 7);
        out.extend_from_slice(name.as_bytes());
        int(out, value.len(), 7);
        out.extend_from_slice(value);
    }

    /// HPACK integer with an `n`-bit prefix (the first byte's high bits are zero).
    fn int(out: &mut Vec<u8>, mut v: usize, n: u8) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(v as u8);
            return;
        }
        out.push(max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128 + 128) as u8);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A GET for `authority` `path`, headers not indexed.
    pub fn get(authority: &str, path: &str) -> Vec<u8> {
        let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
        literal(&mut b, 0x00, ":path", path.as_bytes());
        literal(&mut b, 0x00, ":authority", authority.as_bytes());
        b
    }

    /// `n` streams, each opened (a GET for `authority` `path`) and reset at once.
    pub fn open_and_reset(n: u32, authority: &str, path: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            let id = 2 * i + 1;
            out.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                id,
                &get(authority, path),
            ));
            out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        out
    }

    /// Adds `name: value` to the dynamic table (literal with incremental indexing).
    pub fn indexed_insert(b: &mut Vec<u8>, name: &str, value: &[u8]) {
        literal(b, 0x40, name, value);
    }

    /// References dynamic table entry 62 (the newest) once.
    pub fn newest(b: &mut Vec<u8>) {
        b.push(0x80 | 62);
    }
}

/// What a flooding client saw: whether the sidecar ended its connection (GOAWAY or
/// close), and the frames it sent back (kind, stream, payload).
struct Flood {
    ended: bool,
    frames: Vec<(u8, u32, Vec<u8>)>,
}

impl Flood {
    /// Whether any stream was answered `200` (`:status 200` is HPACK static entry 8).
    fn answered_200(&self) -> bool {
        self.frames
            .iter()
            .any(|(kind, _, payload)| *kind == frames::HEADERS && payload.first() == Some(&0x88))
    }
}

/// Writes `bytes` to the outbound listener, then reads for `wait` or until the sidecar
/// ends the connection.
async fn h2_flood(outbound: SocketAddr, bytes: Vec<u8>, wait: Duration) -> anyhow::Result<Flood> {
    let mut tcp = TcpStream::connect(outbound).await?;
    let mut all = frames::PREFACE.to_vec();
    all.extend(frames::frame(frames::SETTINGS, 0, 0, &[]));
    all.extend(bytes);
    // The sidecar may close mid-write: that is one of the answers we accept.
    let _ = tcp.write_all(&all).await;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = Vec::new();
    let ended = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                seen.extend_from_slice(&buf[..n]);
                if goaway_in(&seen) {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    Ok(Flood {
        ended,
        frames: frames_in(&seen),
    })
}

/// The whole frames in `b`: (kind, stream, payload).
fn frames_in(mut b: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        if b.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
        out.push((b[3], stream, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

fn goaway_in(b: &[u8]) -> bool {
    frames_in(b).iter().any(|(kind, _, _)| *kind == 7)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_end_only_the_flooding_connection() -> anyhow::Result<()> {
    use frames::*;
    let (_mesh, outbound, traffic) = two_clusters(Default::default()).await?;
    // Rapid reset (CVE-2023-44487): streams opened and reset at once, by the thousand.
    let rapid = open_and_reset(2000, HOST, "/delay/100");
    assert!(
        h2_flood(outbound, rapid, Duration::from_secs(5))
            .await?
            .ended,
        "rapid reset is cut off"
    );
    // CONTINUATION flood: one header block that never ends.
    let mut cont = frame(HEADERS, 0, 1, &get(HOST, "/"));
    let mut piece = vec![0x40, 1, b'x', 100];
    piece.extend([b'v'; 100]);
    for _ in 0..5000 {
        cont.extend(frame(CONTINUATION, 0, 1, &piece));
    }
    assert!(
        h2_flood(outbound, cont, Duration::from_secs(5))
            .await?
            .ended,
        "a header block that never ends is cut off"
    );
    // HPACK bomb: one 4 KiB entry in the dynamic table, referenced a thousand times.
    let mut block = get(HOST, "/");
    indexed_insert(&mut block, "x-bomb", &[b'b'; 4000]);
    for _ in 0..1000 {
        newest(&mut block);
    }
    let mut bomb = Vec::new();
    let mut chunks = block.chunks(16_000).peekable();
    let first = chunks.next().unwrap_or_default();
    let last_first = chunks.peek().is_none();
    bomb.extend(frame(
        HEADERS,
        END_STREAM | if last_first { END_HEADERS } else { 0 },
        1,
        first,
    ));
    while let Some(c) = chunks.next() {
        let end = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bomb.extend(frame(CONTINUATION, end, 1, c));
    }
    // 4 MB of headers from 8 KB of HPACK: refused (431 on the stream, or the connection
    // cut), never decoded and forwarded.
    let bomb = h2_flood(outbound, bomb, Duration::from_secs(3)).await?;
    assert!(!bomb.answered_200(), "the HPACK bomb was served");
    // PING and SETTINGS floods from clients that never read: the sidecar answers each in
    // turn and stops reading when the answers cannot be written (no queue grows), and
    // nobody else notices.
    let mut pings = Vec::new();
    for i in 0..20_000u64 {
        pings.extend(frame(PING, 0, 0, &i.to_be_bytes()));
    }
    let mut settings = Vec::new();
    for _ in 0..20_000 {
        settings.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
    }
    let mut silent = Vec::new();
    for flood in [pings, settings] {
        let mut tcp = TcpStream::connect(outbound).await?;
        let mut all = PREFACE.to_vec();
        all.extend(flood);
        silent.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), tcp.write_all(&all)).await;
            tcp
        }));
    }
    for s in silent {
        drop(s.await?);
    }
    // A reader that opens no window: its request waits, nobody else does.
    let mut tcp = TcpStream::connect(outbound).await?;
    let mut zero = PREFACE.to_vec();
    zero.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    zero.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get(HOST, "/")));
    tcp.write_all(&zero).await?;
    let _ = DATA;
    // Everyone else: still served, nothing ejected.
    let r = AppClient::new()
        .send(outbound, HOST, "/", true, &[])
        .await?;
    assert_eq!(r.status, 200);
    drop(tcp);
    others_unharmed(&traffic, outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_quic_port_does_not_disturb_cross_cluster_traffic() -> anyhow::Result<()> {
    let (mesh, _, traffic) = Mesh::with_traffic_from_east(&["east", "west"], &["west"]).await?;
    let quic: Vec<SocketAddr> = ["east", "west"]
        .iter()
        .map(|c| mesh.gateway_quic(c))
        .collect();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let started = Instant::now();
    let mut n: u64 = 0;
    while started.elapsed() < Duration::from_secs(2) {
        for addr in &quic {
            // Random bytes, and bytes shaped like QUIC long-header Initial packets.
            let mut pkt: Vec<u8> = (0..1200).map(|i| (n.wrapping_mul(31) + i) as u8).collect();
            if n.is_multiple_of(2) {
                pkt[0] = 0xc0;
                pkt[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            socket.send_to(&pkt, addr).await?;
            n += 1;
        }
        if n.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    let during = traffic.since(started);
    assert!(during.len() > 20, "traffic kept flowing: {}", during.len());
    isthmus_tests::settles_in(&traffic, "west", 10, Duration::from_secs(5)).await?;
    assert_eq!(traffic.failures(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_app_connections_are_closed_and_busy_ones_are_not() -> anyhow::Result<()> {
    let limits = isthmus_sidecar::ingress::Limits {
        idle_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let (_mesh, outbound, traffic) = two_clusters(limits).await?;
    // HTTP/1.1 kept alive after one answer: closed about a second later.
    let started = Instant::now();
    let (r, closed) = raw_h1(
        outbound,
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await?;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let closed = closed.expect("an idle HTTP/1.1 connection is closed");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "{closed:?}"
    );
    // HTTP/2: the same, with GOAWAY.
    let tcp = TcpStream::connect(outbound).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{HOST}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    assert_eq!(send.send_request(req).await?.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection is closed");
    // A request in progress longer than the idle timeout is not cut.
    let r = AppClient::new().get(outbound, HOST, "/delay/1500").await?;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() > Duration::from_secs(1));
    others_unharmed(&traffic, outbound).await
}
