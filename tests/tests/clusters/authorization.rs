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
    mesh_with(|_| {}).await
}

/// [`mesh`], with `configure` applied to the mesh's settings first.
async fn mesh_with(
    configure: impl FnOnce(&mut Mesh),
) -> anyhow::Result<(Mesh, SocketAddr, SocketAddr, SocketAddr)> {
    let mut mesh = Mesh::start_configured(&["east", "west"], configure).await?;
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
    signed("test-1", &der, &claims)
}

/// `claims` signed with ES256 by the PKCS#8 key `der`, naming key `kid`.
fn signed(kid: &str, der: &[u8], claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(der),
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

/// An OpenID issuer on loopback, over HTTPS with its own CA: its discovery document names
/// its key set, which the test swaps (a key rotation) or stops serving.
struct Issuer {
    url: String,
    ca_pem: String,
    jwks: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// An EC P-256 key: its PKCS#8 DER (to sign with) and its public half as a JWK.
fn ec_key(kid: &str) -> (Vec<u8>, serde_json::Value) {
    use base64::Engine;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let point = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..65])});
    (key.serialize_der(), jwk)
}

impl Issuer {
    async fn start() -> anyhow::Result<Self> {
        let ca = isthmus_tests::TestCa::new("the issuer's CA")?;
        let (cert, key) = ca.issue(&["127.0.0.1"])?;
        let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            isthmus_core::tls::parse_certs(&cert)?,
            isthmus_core::tls::parse_private_key(&key)?,
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let jwks = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let discovery =
            serde_json::json!({"issuer": url, "jwks_uri": format!("{url}/keys")}).to_string();
        let (keys, count) = (jwks.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, keys, count, discovery) = (
                    acceptor.clone(),
                    keys.clone(),
                    count.clone(),
                    discovery.clone(),
                );
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or_default();
                    let body = match path {
                        "/.well-known/openid-configuration" => Some(discovery),
                        "/keys" => {
                            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            keys.lock().expect("keys").clone()
                        }
                        _ => None,
                    };
                    let answer = match body {
                        Some(b) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                            b.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                    };
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(Self {
            url,
            ca_pem: ca.pem,
            jwks,
            fetches,
        })
    }

    fn serve(&self, keys: &[&serde_json::Value]) {
        *self.jwks.lock().expect("keys") = Some(serde_json::json!({ "keys": keys }).to_string());
    }

    fn stop_serving(&self) {
        *self.jwks.lock().expect("keys") = None;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_issuer_keys_follow_a_rotation_and_outlive_an_outage() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    let (old_der, old) = ec_key("old");
    let (new_der, new) = ec_key("new");
    issuer.serve(&[&old]);
    let refresh = Duration::from_secs(1);
    let ca = issuer.ca_pem.clone();
    let (mut mesh, sleep, _, east) = mesh_with(move |m| {
        m.jwks_refresh = refresh;
        m.jwks_roots_pem = Some(ca);
    })
    .await?;
    // One rule finds its keys by the issuer's OpenID discovery, one by jwksUri; a token is
    // then required.
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: remote-keys, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - issuer: {url}\n  - {{issuer: by-uri, jwksUri: \"{url}/keys\", timeout: 2s, audiences: [httpbin]}}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-token, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  rules: [{{from: [{{source: {{requestPrincipals: [\"*\"]}}}}]}}]\n",
        url = issuer.url
    );
    mesh.apply("west", "remote-keys.yaml", &policy).await?;
    let claims = |iss: &str| serde_json::json!({"iss": iss, "sub": "alice", "exp": in_minutes(10)});
    let old_token = signed("old", &old_der, &claims(&issuer.url));
    let new_token = signed("new", &new_der, &claims(&issuer.url));
    let for_audience = |aud: &str| {
        let mut c = claims("by-uri");
        c["aud"] = aud.into();
        signed("old", &old_der, &c)
    };
    let (by_uri, wrong_audience) = (for_audience("httpbin"), for_audience("reviews"));
    let code = |from: SocketAddr, token: String| async move {
        let auth = format!("Bearer {token}");
        Ok::<u16, anyhow::Error>(
            request(from, "GET", "/ip", &[("authorization", &auth)])
                .await?
                .0,
        )
    };
    let settles = |from: SocketAddr, token: String, want: u16, what: &'static str| {
        eventually(what, Duration::from_secs(10), move || {
            let token = token.clone();
            async move {
                let got = code(from, token).await?;
                anyhow::ensure!(got == want, "got {got}");
                Ok(())
            }
        })
    };
    until(sleep, "GET", "/ip", 403).await?;
    settles(
        sleep,
        old_token.clone(),
        200,
        "the fetched keys accept the token",
    )
    .await?;
    assert_eq!(code(sleep, by_uri.clone()).await?, 200, "keys by jwksUri");
    assert_eq!(
        code(sleep, wrong_audience).await?,
        401,
        "an audience the rule lacks"
    );
    assert_eq!(
        code(east, old_token.clone()).await?,
        200,
        "from the other cluster"
    );
    assert_eq!(
        code(sleep, new_token.clone()).await?,
        401,
        "not yet a key of the issuer"
    );

    // The issuer rotates: the next refresh brings the new key and drops the old one.
    issuer.serve(&[&new]);
    settles(sleep, new_token.clone(), 200, "the rotated key accepted").await?;
    assert_eq!(
        code(sleep, old_token).await?,
        401,
        "the retired key refused"
    );

    // The issuer goes away: refreshes fail, the last keys keep serving.
    issuer.stop_serving();
    let admin = mesh.controller_admin("west");
    eventually(
        "failed refreshes counted",
        Duration::from_secs(10),
        || async move {
            let failed = isthmus_tests::metric_sum(
                admin,
                "isthmus_controller_jwks_fetches_total",
                &[("result", "error")],
            )
            .await?;
            anyhow::ensure!(failed >= 2.0, "{failed} failed fetches");
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        code(sleep, new_token.clone()).await?,
        200,
        "kept through the outage"
    );
    let dump = isthmus_tests::config_dump(admin).await?;
    let errors: Vec<String> = dump["jwks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["error"].as_str().map(str::to_owned))
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("/keys") && e.contains("503")),
        "the dump names the failing fetch: {dump}"
    );
    // Refreshes are periodic, not per request or per proxy.
    let before = issuer.fetches();
    for _ in 0..20 {
        code(sleep, new_token.clone()).await?;
    }
    assert!(
        issuer.fetches() - before <= 8,
        "{} fetches while 20 requests were served",
        issuer.fetches() - before
    );
    Ok(())
}

/// An external authorization provider as Istio's sample is: it allows a request that
/// carries `x-ext-authz: allow` and denies others, as a gRPC `Authorization/Check` server
/// and as an HTTP server on the same port. It notes what it was asked.
struct Provider {
    addr: SocketAddr,
    /// (path, caller principal or "-") of each check, gRPC checks marked `grpc:`.
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// While set, the provider holds every check unanswered.
    hang: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Provider {
    async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        use http_body_util::BodyExt;
        use isthmus_proto::ext_authz as pb;
        use prost::Message;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hang = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (notes, hold) = (asked.clone(), hang.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (notes, hold) = (notes.clone(), hold.clone());
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (notes, hold) = (notes.clone(), hold.clone());
                        async move {
                            while hold.load(std::sync::atomic::Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            let grpc =
                                req.uri().path() == "/envoy.service.auth.v3.Authorization/Check";
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            type Body = http_body_util::combinators::BoxBody<
                                bytes::Bytes,
                                std::convert::Infallible,
                            >;
                            let full =
                                |b: bytes::Bytes| -> Body { http_body_util::Full::new(b).boxed() };
                            let denial = "denied by ext_authz for not found header `x-ext-authz: allow` in the request";
                            if !grpc {
                                let allow = parts
                                    .headers
                                    .get("x-ext-authz")
                                    .is_some_and(|v| v == "allow");
                                notes.lock().expect("notes").push(format!(
                                    "http:{} body={}",
                                    parts.uri.path_and_query().map_or("/", |p| p.as_str()),
                                    String::from_utf8_lossy(&body)
                                ));
                                let resp = http::Response::builder()
                                    .status(if allow { 200 } else { 403 })
                                    .header(
                                        "x-ext-authz-check-result",
                                        if allow { "allowed" } else { "denied" },
                                    )
                                    .body(full(if allow {
                                        bytes::Bytes::new()
                                    } else {
                                        bytes::Bytes::from(denial)
                                    }))
                                    .expect("response");
                                return Ok::<_, hyper::Error>(resp);
                            }
                            let check =
                                pb::CheckRequest::decode(body.slice(5..)).expect("a CheckRequest");
                            let attributes = check.attributes.unwrap_or_default();
                            let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
                            let principal =
                                attributes.source.map(|s| s.principal).unwrap_or_default();
                            notes
                                .lock()
                                .expect("notes")
                                .push(format!("grpc:{} {principal}", http.path));
                            let allow = http
                                .headers
                                .get("x-ext-authz")
                                .is_some_and(|v| v == "allow");
                            let header = |k: &str, v: &str| pb::HeaderValueOption {
                                header: Some(pb::HeaderValue {
                                    key: k.into(),
                                    value: v.into(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            };
                            let answer = if allow {
                                pb::CheckResponse {
                                    status: Some(pb::RpcStatus::default()),
                                    http_response: Some(
                                        pb::check_response::HttpResponse::OkResponse(
                                            pb::OkHttpResponse {
                                                headers: vec![header(
                                                    "x-ext-authz-check-result",
                                                    "allowed",
                                                )],
                                                headers_to_remove: vec!["x-ext-authz".into()],
                                                response_headers_to_add: vec![header(
                                                    "x-ext-authz-decided-by",
                                                    "grpc",
                                                )],
                                            },
                                        ),
                                    ),
                                }
                            } else {
                                pb::CheckResponse {
                                    status: Some(pb::RpcStatus {
                                        code: 7,
                                        ..Default::default()
                                    }),
                                    http_response: Some(
                                        pb::check_response::HttpResponse::DeniedResponse(
                                            pb::DeniedHttpResponse {
                                                status: Some(pb::HttpStatus { code: 403 }),
                                                headers: vec![header(
                                                    "x-ext-authz-check-result",
                                                    "denied",
                                                )],
                                                body: denial.into(),
                                            },
                                        ),
                                    ),
                                }
                            };
                            let mut frame = vec![0u8];
                            frame.extend_from_slice(&(answer.encoded_len() as u32).to_be_bytes());
                            answer.encode(&mut frame).expect("encode");
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let frames = futures::stream::iter([
                                Ok(hyper::body::Frame::data(bytes::Bytes::from(frame))),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]);
                            let resp = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(frames).boxed())
                                .expect("response");
                            Ok(resp)
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        Ok(Self { addr, asked, hang })
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("notes").clone()
    }
}

/// The echo app's view of a request: the headers it received.
fn app_headers(body: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(body)
        .map_or(serde_json::Value::Null, |v| v["headers"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_authorization_in_another_cluster_decides_over_grpc_and_http() -> anyhow::Result<()>
{
    let (mut mesh, sleep, _, east) = mesh().await?;
    // The provider runs in east, behind its own sidecar; httpbin's sidecar in west asks it
    // through both gateways.
    let ip = mesh.take_address("east");
    let provider = Provider::start(SocketAddr::new(ip.into(), isthmus_tests::APP_PORT)).await?;
    mesh.apply(
        "east",
        "ext-authz-service.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext-authz, namespace: demo}}\nspec:\n  selector: {{app: ext-authz}}\n  ports:\n  - {{name: http, port: 8000, targetPort: {app}}}\n  - {{name: grpc, port: 9000, targetPort: {app}}}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ext-authz, namespace: demo}}\n---\n{}",
            isthmus_tests::workload_yaml("ext-authz", "ext-authz", ip, &isthmus_tests::locality_of("east"), "ext-authz"),
            app = isthmus_tests::APP_PORT,
        ),
    )
    .await?;
    mesh.add_own_workload("east", "ext-authz", "ext-authz", provider.addr)
        .await?;
    mesh.apply(
        "west",
        "ext-authz-mesh-config.yaml",
        &example("ext-authz-mesh-config.yaml"),
    )
    .await?;
    mesh.apply("west", "ext-authz.yaml", &example("ext-authz.yaml"))
        .await?;

    // Over gRPC: /headers is asked about, and refused with the provider's own answer.
    until(sleep, "GET", "/headers", 403).await?;
    let (code, body) = request(sleep, "GET", "/headers", &[]).await?;
    assert_eq!(code, 403);
    assert!(body.contains("denied by ext_authz"), "{body}");
    let (code, body) = request(sleep, "GET", "/headers", &[("x-ext-authz", "allow")]).await?;
    assert_eq!(code, 200, "{body}");
    let seen = app_headers(&body);
    assert_eq!(seen["x-ext-authz-check-result"], "allowed", "{body}");
    assert!(
        seen.get("x-ext-authz").is_none(),
        "the provider removed it: {body}"
    );
    // Other paths are not asked about; the caller's identity reached the provider.
    let before = provider.asked().len();
    assert_eq!(status(sleep, "GET", "/ip").await?, 200);
    assert_eq!(provider.asked().len(), before, "/ip is not the policy's");
    assert!(
        provider
            .asked()
            .iter()
            .any(|a| a == "grpc:/headers spiffe://cluster.local/ns/demo/sa/sleep"),
        "{:?}",
        provider.asked()
    );
    // From the other cluster too.
    assert_eq!(request(east, "GET", "/headers", &[]).await?.0, 403);
    assert_eq!(
        request(east, "GET", "/headers", &[("x-ext-authz", "allow")])
            .await?
            .0,
        200
    );

    // Over HTTP, with Istio's header lists.
    let http = example("ext-authz.yaml").replace("sample-ext-authz-grpc", "sample-ext-authz-http");
    mesh.apply("west", "ext-authz.yaml", &http).await?;
    eventually(
        "the HTTP provider asked",
        Duration::from_secs(10),
        || async {
            request(sleep, "GET", "/headers?via=http", &[]).await?;
            anyhow::ensure!(
                provider
                    .asked()
                    .iter()
                    .any(|a| a.starts_with("http:/headers?via=http")),
                "{:?}",
                provider.asked()
            );
            Ok(())
        },
    )
    .await?;
    let (code, body) = request(sleep, "GET", "/headers", &[]).await?;
    assert_eq!(code, 403);
    assert!(body.contains("denied by ext_authz"), "{body}");
    let (code, body) = request(sleep, "GET", "/headers", &[("x-ext-authz", "allow")]).await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        app_headers(&body)["x-ext-authz-check-result"],
        "allowed",
        "{body}"
    );

    // The body in the check: a longer one is refused (413), or cut with allowPartialMessage;
    // the app gets it whole either way it passes.
    let with_body = |partial: bool| {
        example("ext-authz-mesh-config.yaml").replace(
            "        port: \"8000\"\n",
            &format!("        port: \"8000\"\n        includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: {partial}}}\n"),
        )
    };
    let payload = "0123456789abcdef-and-then-some-more-bytes-the-provider-does-not-need";
    let post = || async {
        let mut tcp = tokio::net::TcpStream::connect(sleep).await?;
        tcp.write_all(format!("POST /headers HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nx-ext-authz: allow\r\nContent-Length: {}\r\n\r\n{payload}", payload.len()).as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await??;
        let text = String::from_utf8_lossy(&out).into_owned();
        Ok::<_, anyhow::Error>((text.split(' ').nth(1).unwrap_or_default().to_owned(), text))
    };
    mesh.apply("west", "ext-authz-mesh-config.yaml", &with_body(false))
        .await?;
    eventually("a long body refused", Duration::from_secs(10), || async {
        let (code, text) = post().await?;
        anyhow::ensure!(code == "413", "{text}");
        Ok(())
    })
    .await?;
    mesh.apply("west", "ext-authz-mesh-config.yaml", &with_body(true))
        .await?;
    eventually(
        "a long body cut for the check",
        Duration::from_secs(10),
        || async {
            let (code, text) = post().await?;
            anyhow::ensure!(code == "200", "{text}");
            anyhow::ensure!(
                text.contains(&format!("\"content-length\":\"{}\"", payload.len())),
                "{text}"
            );
            Ok(())
        },
    )
    .await?;
    assert!(
        provider
            .asked()
            .iter()
            .any(|a| a == "http:/headers body=0123456789abcdef"),
        "{:?}",
        provider.asked()
    );

    // A provider that does not answer in time: statusOnError, or the request with failOpen.
    let impatient = example("ext-authz-mesh-config.yaml").replace(
        "        port: \"8000\"\n",
        "        port: \"8000\"\n        timeout: 300ms\n",
    );
    mesh.apply("west", "ext-authz-mesh-config.yaml", &impatient)
        .await?;
    provider
        .hang
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    eventually(
        "refused while the provider hangs",
        Duration::from_secs(10),
        || async {
            let code = request(sleep, "GET", "/headers", &[("x-ext-authz", "allow")])
                .await?
                .0;
            anyhow::ensure!(code == 403, "got {code}");
            Ok(())
        },
    )
    .await?;
    let lenient = impatient.replace(
        "timeout: 300ms\n",
        "timeout: 300ms\n        failOpen: true\n",
    );
    mesh.apply("west", "ext-authz-mesh-config.yaml", &lenient)
        .await?;
    until(sleep, "GET", "/headers", 200).await?;
    assert!(started.elapsed() < Duration::from_secs(20));
    provider
        .hang
        .store(false, std::sync::atomic::Ordering::Relaxed);

    // A provider the mesh config does not have: the policy denies what it matches.
    let unknown = example("ext-authz.yaml").replace("sample-ext-authz-grpc", "no-such-provider");
    mesh.apply("west", "ext-authz.yaml", &unknown).await?;
    until(sleep, "GET", "/headers", 403).await?;
    assert_eq!(status(sleep, "GET", "/ip").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_for_an_aliased_trust_domain_matches_the_mesh_s_callers() -> anyhow::Result<()> {
    let (mut mesh, sleep, other, east) = mesh().await?;
    // Written before a migration, for the old trust domain.
    let viewer = example("httpbin-viewer.yaml").replace("cluster.local/", "old.example/");
    mesh.apply("west", "httpbin-viewer.yaml", &viewer).await?;
    until(sleep, "GET", "/ip", 403).await?;
    mesh.apply(
        "west",
        "mesh.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    trustDomainAliases: [old.example]\n",
    )
    .await?;
    until(sleep, "GET", "/ip", 200).await?;
    until(east, "GET", "/ip", 200).await?;
    assert_eq!(status(other, "GET", "/ip").await?, 403, "only sleep");
    Ok(())
}
