//! Istio's authorization tasks, with the files of `deploy/examples/security/` applied
//! verbatim: `httpbin` (the sample app) runs in `west`; `sleep` (service account `sleep`)
//! calls it from `west` and from `east`, `other` (service account `other`) from `west`.
//! Requests are written by hand on the sidecar's outbound listener, so paths reach the
//! mesh exactly as a hostile app would send them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use isthmus_tests::{eventually, Mesh, TCP_ECHO_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "httpbin.demo.svc.cluster.local";

fn example(name: &str) -> String {
    let path = format!(
        "{}/../deploy/examples/security/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One HTTP/1.1 request, written as is: its status and body.
async fn request(
    outbound: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    tcp.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nContent-Length: 0\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

async fn status(outbound: SocketAddr, method: &str, path: &str) -> anyhow::Result<u16> {
    Ok(request(outbound, method, path, &[]).await?.0)
}

/// Waits until `outbound` gets `want` for `method path`.
async fn until(outbound: SocketAddr, method: &str, path: &str, want: u16) -> anyhow::Result<()> {
    eventually(
        &format!("{method} {path} to get {want}"),
        Duration::from_secs(10),
        || async move {
            let got = status(outbound, method, path).await?;
            anyhow::ensure!(got == want, "got {got}");
            Ok(())
        },
    )
    .await
}

/// The mesh of the tasks: httpbin, sleep and other in west, sleep in east.
async fn mesh() -> anyhow::Result<(Mesh, SocketAddr, SocketAddr, SocketAddr)> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("west", "httpbin", Some("httpbin"), "httpbin")
        .await?;
    mesh.add_workload("west", "sleep", None, "sleep").await?;
    mesh.add_workload("west", "other", None, "other").await?;
    mesh.add_workload("east", "sleep-east", None, "sleep")
        .await?;
    let sleep = mesh.workload("west", "sleep").outbound();
    let other = mesh.workload("west", "other").outbound();
    let east = mesh.workload("east", "sleep-east").outbound();
    for from in [sleep, other, east] {
        until(from, "GET", "/ip", 200).await?;
    }
    Ok((mesh, sleep, other, east))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_traffic_allow_nothing_then_viewers_across_clusters() -> anyhow::Result<()> {
    let (mut mesh, sleep, other, east) = mesh().await?;
    mesh.apply("west", "allow-nothing.yaml", &example("allow-nothing.yaml"))
        .await?;
    until(sleep, "GET", "/ip", 403).await?;
    let (code, body) = request(other, "GET", "/ip", &[]).await?;
    assert_eq!((code, body.trim()), (403, "RBAC: access denied"));
    assert_eq!(status(east, "GET", "/ip").await?, 403);

    mesh.apply(
        "west",
        "httpbin-viewer.yaml",
        &example("httpbin-viewer.yaml"),
    )
    .await?;
    until(sleep, "GET", "/ip", 200).await?;
    assert_eq!(status(sleep, "POST", "/ip").await?, 403, "GET only");
    assert_eq!(status(other, "GET", "/ip").await?, 403, "sleep only");
    // The caller in east is `sleep` too: its identity crossed both gateways.
    until(east, "GET", "/ip", 200).await?;
    // A forged client certificate header from the app changes nothing.
    let forged = [(
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/demo/sa/httpbin;URI=spiffe://cluster.local/ns/demo/sa/sleep",
    )];
    assert_eq!(request(other, "GET", "/ip", &forged).await?.0, 403);

    // The policy changes: the caller from east is refused within a second.
    let changed = example("httpbin-viewer.yaml").replace("sa/sleep", "sa/other");
    let started = Instant::now();
    std::fs::write(
        mesh.cluster("west").config_dir.join("httpbin-viewer.yaml"),
        &changed,
    )?;
    while status(east, "GET", "/ip").await? != 403 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the old policy still served after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(other, "GET", "/ip").await?, 200);
    let denied = isthmus_tests::metric_sum(
        mesh.workload("west", "httpbin")
            .sidecar
            .as_ref()
            .expect("sidecar")
            .admin_address,
        "isthmus_sidecar_authz_denied_total",
        &[],
    )
    .await?;
    assert!(denied >= 5.0, "denials are counted: {denied}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_deny_by_method_header_and_path_cannot_be_bypassed() -> anyhow::Result<()> {
    let (mut mesh, sleep, _, _) = mesh().await?;
    mesh.apply(
        "west",
        "deny-method-get.yaml",
        &example("deny-method-get.yaml"),
    )
    .await?;
    until(sleep, "GET", "/ip", 403).await?;
    assert_eq!(
        request(sleep, "GET", "/ip", &[("x-token", "admin")])
            .await?
            .0,
        200,
        "the header lifts the DENY"
    );
    assert_eq!(
        status(sleep, "POST", "/ip").await?,
        200,
        "only GET is denied"
    );

    mesh.apply("west", "deny-method-get.yaml", "# removed\n")
        .await?;
    until(sleep, "GET", "/ip", 200).await?;
    mesh.apply(
        "west",
        "deny-admin-path.yaml",
        &example("deny-admin-path.yaml"),
    )
    .await?;
    until(sleep, "GET", "/admin", 403).await?;
    for sneaky in [
        "/admin/",
        "/admin/users",
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/%2E%2E/admin",
        "//admin",
        "/ADMIN",
        "/Admin/users",
        "/x%2F..%2Fadmin",
        "/admin?debug=1",
        "/./admin",
    ] {
        assert_eq!(status(sleep, "GET", sneaky).await?, 403, "{sneaky}");
    }
    assert_eq!(status(sleep, "GET", "/administrator").await?, 200);
    assert_eq!(status(sleep, "GET", "/ip").await?, 200);
    Ok(())
}

/// A TCP tunnel through the sidecar to httpbin's echo port: whether it echoes.
async fn tcp_echoes(outbound: SocketAddr) -> anyhow::Result<bool> {
    let target = format!("{HOST}:{TCP_ECHO_PORT}");
    let mut tcp = tokio::net::TcpStream::connect(outbound).await?;
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head)).await??;
    if !head.starts_with(b"HTTP/1.1 200") {
        return Ok(false);
    }
    // Skip the rest of the head, then echo.
    let mut byte = [0u8; 1];
    let mut tail = Vec::new();
    while !tail.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut byte)).await??;
        tail.push(byte[0]);
    }
    tcp.write_all(b"hello tcp\n").await?;
    let mut back = [0u8; 10];
    Ok(
        match tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut back)).await {
            Ok(Ok(_)) => &back == b"hello tcp\n",
            _ => false,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_traffic_by_port_and_a_deny_with_http_fields() -> anyhow::Result<()> {
    let (mut mesh, sleep, _, _) = mesh().await?;
    assert!(tcp_echoes(sleep).await?);
    mesh.apply("west", "tcp-policy.yaml", &example("tcp-allow-port.yaml"))
        .await?;
    // HTTP goes to the app's port, which no rule allows.
    until(sleep, "GET", "/ip", 403).await?;
    assert!(tcp_echoes(sleep).await?, "the echo port is allowed");
    // Same name, as in Istio's task: the DENY replaces the ALLOW.
    mesh.apply("west", "tcp-policy.yaml", &example("tcp-deny-get.yaml"))
        .await?;
    eventually("the TCP port denied", Duration::from_secs(10), || async {
        anyhow::ensure!(!tcp_echoes(sleep).await?, "still echoes");
        Ok(())
    })
    .await?;
    assert_eq!(
        status(sleep, "GET", "/ip").await?,
        200,
        "HTTP to the app port is not denied"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_policy_denies_nothing() -> anyhow::Result<()> {
    let (mut mesh, sleep, _, _) = mesh().await?;
    mesh.apply("west", "dry-run.yaml", &example("dry-run.yaml"))
        .await?;
    // Give the push time to land, then the request it would deny still passes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(sleep, "GET", "/headers").await?, 200);
    // The same policy without the annotation denies.
    let enforced = example("dry-run.yaml").replace(
        "\"istio.io/dry-run\": \"true\"",
        "\"istio.io/dry-run\": \"false\"",
    );
    mesh.apply("west", "dry-run.yaml", &enforced).await?;
    until(sleep, "GET", "/headers", 403).await?;
    Ok(())
}

/// The private half of the test key in `jwt-request-authentication.yaml` (PKCS#8, base64).
const TEST_KEY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgzOPM6YjdaniZkCDA2WTO0aFXmlTZGlau3rRROYf/NOOhRANCAATVUkU1r7ppb6Oc18OZmku8DftycQq8sJ4+iEcSd9RBNEy390uZ8bUreKNuny00Pn0zDAJ+fzr35j/NbArRbgEi";
const ISSUER: &str = "testing@secure.istio.io";

/// A token signed with the test key, as the issuer would mint it.
fn jwt(claims: serde_json::Value) -> String {
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(TEST_KEY)
        .expect("the test key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("test-1".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&der),
    )
    .expect("signed")
}

fn in_minutes(m: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    now + 60 * m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_validated_and_a_claim_can_be_required() -> anyhow::Result<()> {
    let (mut mesh, sleep, _, east) = mesh().await?;
    mesh.apply(
        "west",
        "jwt-request-authentication.yaml",
        &example("jwt-request-authentication.yaml"),
    )
    .await?;
    let bearer = |t: &str| format!("Bearer {t}");
    let invalid = jwt(serde_json::json!({"iss": ISSUER, "sub": ISSUER, "exp": in_minutes(-10)}));
    // An invalid token is refused; no token passes (nothing requires one yet).
    eventually("an expired token refused", Duration::from_secs(10), || {
        let h = bearer(&invalid);
        async move {
            let (code, body) = request(sleep, "GET", "/ip", &[("authorization", &h)]).await?;
            anyhow::ensure!(code == 401, "got {code}");
            anyhow::ensure!(body.trim() == "Jwt verification fails", "{body}");
            Ok(())
        }
    })
    .await?;
    assert_eq!(status(sleep, "GET", "/ip").await?, 200);
    assert_eq!(
        request(
            sleep,
            "GET",
            "/ip",
            &[("authorization", "Bearer not.a.token")]
        )
        .await?
        .0,
        401
    );
    let group1 = jwt(
        serde_json::json!({"iss": ISSUER, "sub": ISSUER, "exp": in_minutes(10), "groups": ["group1", "group2"]}),
    );
    let group2 = jwt(
        serde_json::json!({"iss": ISSUER, "sub": ISSUER, "exp": in_minutes(10), "groups": ["group2"]}),
    );
    let stranger =
        jwt(serde_json::json!({"iss": "someone@else", "sub": "x", "exp": in_minutes(10)}));
    assert_eq!(
        request(sleep, "GET", "/ip", &[("authorization", &bearer(&group2))])
            .await?
            .0,
        200
    );
    assert_eq!(
        request(
            sleep,
            "GET",
            "/ip",
            &[("authorization", &bearer(&stranger))]
        )
        .await?
        .0,
        401,
        "an issuer no rule names"
    );

    mesh.apply(
        "west",
        "jwt-require-group.yaml",
        &example("jwt-require-group.yaml"),
    )
    .await?;
    until(sleep, "GET", "/ip", 403).await?;
    assert_eq!(
        request(sleep, "GET", "/ip", &[("authorization", &bearer(&group2))])
            .await?
            .0,
        403,
        "not in group1"
    );
    // The claim travels as a header the app can read (what the app sent is replaced).
    let (code, body) = request(
        sleep,
        "GET",
        "/headers",
        &[
            ("authorization", &bearer(&group1)),
            ("x-jwt-group", "admins"),
        ],
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    // From the other cluster, the same token is accepted by the same policy.
    assert_eq!(
        request(east, "GET", "/ip", &[("authorization", &bearer(&group1))])
            .await?
            .0,
        200
    );
    Ok(())
}
