//! Istio's ServiceEntry with real sidecars: mesh-internal entries (by workloadSelector and
//! by inline endpoints) route like Services, with mTLS to the workload's sidecar; a
//! MESH_EXTERNAL host is reached through the calling sidecar, plain, at the address its
//! resolution gives (a local stand-in server plays the external API), with its
//! VirtualService applied; TLS passes through by CONNECT, or is originated by the sidecar
//! as a DestinationRule's `tls` says; unknown hosts stay refused.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use isthmus::client::AppClient;
use isthmus_tests::{eventually, Mesh, TestCa, NAMESPACE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn entry(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n{spec}"
    )
}

/// A plain HTTP server outside the mesh, standing in for an external API.
async fn external_api(ip: Ipv4Addr) -> anyhow::Result<isthmus::echo::Bound> {
    isthmus::echo::build(isthmus::echo::Config {
        listen: SocketAddr::new(IpAddr::V4(ip), 0),
        cluster: "outside".into(),
        workload: "external-api".into(),
        tcp_listen: None,
    })
    .await
}

/// A TCP echo server outside the mesh, standing in for a TLS endpoint (bytes are bytes).
async fn external_tcp() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

async fn get(
    outbound: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<isthmus::client::Reply> {
    AppClient::new().get(outbound, host, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_internal_service_entries_route_like_services() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let echo_ip = mesh.workload("east", "echo-east").ip;
    mesh.apply(
        "east",
        "entries.yaml",
        &format!(
            "{}---\n{}",
            entry(
                "legacy",
                "  hosts: [legacy.corp.internal]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{number: 80, name: http, targetPort: 8080}]\n  workloadSelector: {labels: {app: echo}}\n"
            ),
            entry(
                "vm",
                &format!("  hosts: [vm.corp.internal]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, targetPort: 8080}}]\n  endpoints: [{{address: {echo_ip}, serviceAccount: echo}}]\n")
            )
        ),
    )
    .await?;
    for host in ["legacy.corp.internal", "vm.corp.internal"] {
        let answer = eventually(host, Duration::from_secs(10), || async {
            let reply = get(outbound, host, "/hello").await?;
            anyhow::ensure!(reply.status == 200, "status {}", reply.status);
            reply.answer()
        })
        .await?;
        assert_eq!(answer.workload, "echo-east", "{host}");
        assert!(
            answer.caller.ends_with("/ns/demo/sa/frontend"),
            "mTLS from the calling sidecar: {answer:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_external_host_is_reached_through_the_sidecar_with_its_routes() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let api = external_api(Ipv4Addr::LOCALHOST).await?;
    let tls = external_tcp().await?;
    mesh.apply(
        "east",
        "external.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}",
            entry(
                "api",
                &format!("  hosts: [api.partner.example]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]\n", api.address.port())
            ),
            entry(
                "by-dns",
                &format!("  hosts: [dns.partner.example]\n  resolution: DNS\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {}}}]\n  endpoints: [{{address: localhost}}]\n", api.address.port())
            ),
            entry(
                "tls",
                &format!("  hosts: ['*.secure.example']\n  resolution: STATIC\n  ports: [{{number: 443, name: tls, protocol: TLS}}]\n  endpoints: [{{address: 127.0.0.1, ports: {{tls: {}}}}}]\n", tls.port())
            ),
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: demo}\nspec:\n  hosts: [api.partner.example]\n  http:\n  - match: [{uri: {prefix: /teapot}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: api.partner.example}}]\n  - route: [{destination: {host: api.partner.example}}]\n    headers: {request: {set: {x-partner-key: abc}}}\n",
        ),
    )
    .await?;

    let answer = eventually("the external API", Duration::from_secs(10), || async {
        let reply = get(outbound, "api.partner.example", "/v1/items?page=2").await?;
        anyhow::ensure!(reply.status == 200, "status {}", reply.status);
        reply.answer()
    })
    .await?;
    assert_eq!(answer.workload, "external-api");
    assert_eq!(answer.path, "/v1/items?page=2");
    assert_eq!(
        answer.authority, "api.partner.example",
        "the Host the app used"
    );
    assert_eq!(answer.caller, "", "no mesh identity leaves the mesh");
    assert_eq!(
        answer.headers.get("x-partner-key").map(String::as_str),
        Some("abc"),
        "route headers apply"
    );
    assert!(
        answer
            .headers
            .keys()
            .all(|h| !h.starts_with("x-isthmus-") && h != "x-forwarded-client-cert"),
        "internal headers stay inside: {:?}",
        answer.headers
    );
    let teapot = get(outbound, "api.partner.example", "/teapot").await?;
    assert_eq!(teapot.status, 418, "the VirtualService's fault applies");

    let answer = get(outbound, "dns.partner.example", "/").await?.answer()?;
    assert_eq!(
        answer.workload, "external-api",
        "resolved by DNS (localhost)"
    );

    // TLS passes through: CONNECT by name, bytes both ways.
    let mut s = tokio::net::TcpStream::connect(outbound).await?;
    s.write_all(
        b"CONNECT billing.secure.example:443 HTTP/1.1\r\nHost: billing.secure.example:443\r\n\r\n",
    )
    .await?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).await?;
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"\x16\x03\x01 client hello bytes").await?;
    let mut back = [0u8; 22];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"\x16\x03\x01 client hello bytes");

    // A host no ServiceEntry names stays refused.
    let unknown = get(outbound, "evil.example", "/").await?;
    assert_eq!(
        unknown.status,
        404,
        "{:?}",
        String::from_utf8_lossy(&unknown.body)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_passes_unknown_hosts_through_for_the_workloads_its_sidecar_selects(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.add_workload("east", "locked", None, "frontend")
        .await?;
    let open = mesh.workload("east", "client").outbound();
    let locked = mesh.workload("east", "locked").outbound();
    let api = external_api(Ipv4Addr::LOCALHOST).await?;
    let tcp = external_tcp().await?;
    let unknown = format!("localhost:{}", api.address.port());
    assert_eq!(
        get(open, &unknown, "/").await?.status,
        404,
        "REGISTRY_ONLY by default"
    );

    // A namespace-wide Sidecar allows any host; `locked` has a WorkloadEntry that a Sidecar
    // of its own selects, which keeps REGISTRY_ONLY.
    let locked_ip = mesh.workload("east", "locked").ip;
    mesh.apply(
        "east",
        "sidecars.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {NAMESPACE}}}\nspec:\n  egress: [{{hosts: ['./*']}}]\n  outboundTrafficPolicy: {{mode: ALLOW_ANY}}\n---\n\
apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: locked, namespace: {NAMESPACE}}}\nspec:\n  workloadSelector: {{labels: {{app: locked}}}}\n  egress: [{{hosts: ['./*']}}]\n  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\n---\n\
apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: locked, namespace: {NAMESPACE}}}\nspec: {{address: {locked_ip}, labels: {{app: locked}}, serviceAccount: frontend}}\n"
        ),
    )
    .await?;
    let answer = eventually("passthrough", Duration::from_secs(10), || async {
        let reply = get(open, &unknown, "/anything").await?;
        anyhow::ensure!(reply.status == 200, "status {}", reply.status);
        reply.answer()
    })
    .await?;
    assert_eq!(answer.workload, "external-api");
    assert_eq!(answer.authority, unknown, "the host asked for, untouched");
    let mut s = tokio::net::TcpStream::connect(open).await?;
    s.write_all(
        format!(
            "CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
            tcp.port()
        )
        .as_bytes(),
    )
    .await?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).await?;
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"ping");
    assert_eq!(
        get(locked, &unknown, "/").await?.status,
        404,
        "not selected: still refused"
    );
    Ok(())
}

/// An HTTPS server outside the mesh for `api.secure.test`; with `clients`, it requires a
/// client certificate from that CA. It answers each request with what its TLS saw: the
/// SNI name and whether a client certificate came.
async fn https_api(server: &TestCa, clients: Option<&TestCa>) -> anyhow::Result<SocketAddr> {
    let (cert, key) = server.issue(&["api.secure.test", "alt.secure.test"])?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in isthmus_core::tls::parse_certs(&ca.pem)? {
                roots.add(c)?;
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(
        isthmus_core::tls::parse_certs(&cert)?,
        isthmus_core::tls::parse_private_key(&key)?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let said = format!(
                    "sni={} client-cert={}",
                    conn.server_name().unwrap_or("-"),
                    conn.peer_certificates().is_some_and(|c| !c.is_empty())
                );
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{said}",
                            said.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_originates_tls_and_mutual_tls_to_an_external_host() -> anyhow::Result<()>
{
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    let outbound = mesh.workload("east", "client").outbound();
    let (server_ca, client_ca) = (TestCa::new("api's CA")?, TestCa::new("clients' CA")?);
    let simple = https_api(&server_ca, None).await?;
    let mutual = https_api(&server_ca, Some(&client_ca)).await?;
    // The files a sidecar's host holds.
    let dir = mesh.dir.path().join("certs");
    std::fs::create_dir_all(&dir)?;
    let (client_cert, client_key) = client_ca.issue(&["frontend.demo"])?;
    for (name, pem) in [
        ("ca.pem", &server_ca.pem),
        ("wrong-ca.pem", &client_ca.pem),
        ("client.pem", &client_cert),
        ("client-key.pem", &client_key),
    ] {
        std::fs::write(dir.join(name), pem)?;
    }
    let file = |name: &str| dir.join(name).display().to_string();
    // The app calls http://api.secure.test/ (port 80); its sidecar speaks TLS to port 443
    // of the entry's endpoint.
    let entries = |port: u16| {
        entry(
            "api",
            &format!("  hosts: [api.secure.test]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]\n  endpoints: [{{address: 127.0.0.1}}]\n"),
        )
    };
    let rule = |tls: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: demo}}\nspec:\n  host: api.secure.test\n  trafficPolicy:\n    portLevelSettings:\n    - port: {{number: 80}}\n      tls: {tls}\n")
    };
    let answer = |want: u16| async move {
        eventually(
            &format!("answered {want}"),
            Duration::from_secs(10),
            || async {
                let reply = get(outbound, "api.secure.test", "/").await?;
                anyhow::ensure!(
                    reply.status == want,
                    "status {}: {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.body)
                );
                Ok(String::from_utf8_lossy(&reply.body).into_owned())
            },
        )
        .await
    };

    // SIMPLE: verified with the given CA, SNI from the host.
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(simple.port()),
            rule(&format!(
                "{{mode: SIMPLE, caCertificates: {}}}",
                file("ca.pem")
            ))
        ),
    )
    .await?;
    assert_eq!(answer(200).await?, "sni=api.secure.test client-cert=false");
    // A certificate from a CA the rule does not trust: refused, and the reason says so.
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(simple.port()),
            rule(&format!(
                "{{mode: SIMPLE, caCertificates: {}}}",
                file("wrong-ca.pem")
            ))
        ),
    )
    .await?;
    let refused = answer(503).await?;
    assert!(refused.contains("TLS"), "{refused}");
    // subjectAltNames the certificate lacks: refused; ones it has, with another SNI: served.
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(simple.port()),
            rule(&format!(
                "{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [other.secure.test]}}",
                file("ca.pem")
            ))
        ),
    )
    .await?;
    answer(503).await?;
    mesh.apply(
        "east",
        "api.yaml",
        &format!("{}---\n{}", entries(simple.port()), rule(&format!("{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [alt.secure.test], sni: alt.secure.test}}", file("ca.pem")))),
    )
    .await?;
    assert_eq!(answer(200).await?, "sni=alt.secure.test client-cert=false");
    // insecureSkipVerify: no CA needed.
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(simple.port()),
            rule("{mode: SIMPLE, insecureSkipVerify: true}")
        ),
    )
    .await?;
    answer(200).await?;

    // MUTUAL: the server requires a client certificate; SIMPLE gets none through (with
    // TLS 1.3 the server refuses after the client has finished its handshake: a reset, 502).
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(mutual.port()),
            rule(&format!(
                "{{mode: SIMPLE, caCertificates: {}}}",
                file("ca.pem")
            ))
        ),
    )
    .await?;
    answer(502).await?;
    mesh.apply(
        "east",
        "api.yaml",
        &format!(
            "{}---\n{}",
            entries(mutual.port()),
            rule(&format!(
                "{{mode: MUTUAL, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
                file("ca.pem"),
                file("client.pem"),
                file("client-key.pem")
            ))
        ),
    )
    .await?;
    assert_eq!(answer(200).await?, "sni=api.secure.test client-cert=true");
    Ok(())
}
