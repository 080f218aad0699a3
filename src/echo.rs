//! The sample application: answers HTTP/1.1, HTTP/2 and a small gRPC service
//! (`isthmus.echo.v1.Echo/Say`) with its cluster, its workload name and the caller identity
//! its sidecar told it (`x-forwarded-client-cert`), so the demo and the tests need nothing
//! else. Test paths: `/status/<code>` answers with that status, `/delay/<ms>` answers after
//! a pause, `/flaky` fails every other request with 503, `/fail-if/<workload>` fails with 503
//! on that workload only, `?set-header=name:value` adds that header to the response, and
//! `/stall-body` sends its headers and a first chunk, then nothing.
//!
//! Health, for HealthChecks: `GET /healthz` answers 200 while the app is serving and 503
//! while it is not, as gRPC's `grpc.health.v1.Health/Check` answers SERVING or NOT_SERVING
//! (for the server, "", and for `isthmus.echo.v1.Echo`); `POST /healthz/not-serving` and
//! `POST /healthz/serving` switch it. Every other path answers as before either way, as an
//! app that drains would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_proto::echo::echo_server::{Echo, EchoServer};
use isthmus_proto::echo::{EchoReply, EchoRequest};
use isthmus_proto::health::health_check_response::ServingStatus;
use isthmus_proto::health::health_server::{Health, HealthServer};
use isthmus_proto::health::{HealthCheckRequest, HealthCheckResponse};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tower::Service;

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub cluster: String,
    pub workload: String,
    /// A plain TCP echo listener, for opaque TCP through the mesh.
    pub tcp_listen: Option<SocketAddr>,
}

/// What the echo app reports about itself and its caller.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub cluster: String,
    pub workload: String,
    /// SPIFFE ID of the caller, empty when the request did not come through a sidecar.
    pub caller: String,
    pub method: String,
    /// Path and query as the app received them.
    pub path: String,
    pub protocol: String,
    /// The Host (HTTP/1.1) or :authority (HTTP/2) the app received.
    #[serde(default)]
    pub authority: String,
    /// Request headers the app received, lower-cased names.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The request body the app received (as text, its first 64 KiB), and its length.
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub body_len: usize,
}

/// The caller's SPIFFE ID from Envoy-style `x-forwarded-client-cert` (`...;URI=<id>`).
pub fn caller_from_xfcc(xfcc: &str) -> String {
    xfcc.split(';')
        .find_map(|kv| kv.trim().strip_prefix("URI="))
        .unwrap_or_default()
        .to_owned()
}

#[derive(Clone)]
struct EchoGrpc(Arc<Config>);

/// The app's `grpc.health.v1` answers, from its serving switch.
#[derive(Clone)]
struct HealthGrpc(Arc<AtomicBool>);

#[tonic::async_trait]
impl Health for HealthGrpc {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = req.into_inner().service;
        if !service.is_empty() && service != "isthmus.echo.v1.Echo" {
            return Err(tonic::Status::not_found(format!("no service `{service}`")));
        }
        let status = if self.0.load(Ordering::Relaxed) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(tonic::Response::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}

#[tonic::async_trait]
impl Echo for EchoGrpc {
    async fn say(
        &self,
        req: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let caller = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .map(caller_from_xfcc)
            .unwrap_or_default();
        Ok(tonic::Response::new(EchoReply {
            message: req.into_inner().message,
            cluster: self.0.cluster.clone(),
            workload: self.0.workload.clone(),
            caller,
        }))
    }
}

pub struct Bound {
    pub address: SocketAddr,
    running: isthmus_core::drain::Running,
    serving: Arc<AtomicBool>,
}

impl Bound {
    /// Switches what the app's health answers (`/healthz`, `grpc.health.v1`) say, as
    /// `POST /healthz/serving` and `/healthz/not-serving` do.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    pub async fn wait_termination(&mut self) -> anyhow::Result<()> {
        self.running.wait_any().await;
        Ok(())
    }

    /// Stops the app; its port refuses connections afterwards.
    pub fn abort(self) {
        self.running.abort();
    }

    /// Stops accepting, lets open connections finish until `deadline`, then stops.
    pub async fn shutdown(self, deadline: std::time::Duration) {
        self.running.shutdown(deadline).await;
    }
}

pub async fn build(config: Config) -> anyhow::Result<Bound> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding echo app on {}: {e}", config.listen))?;
    let address = listener.local_addr()?;
    let config = Arc::new(config);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let serving = Arc::new(AtomicBool::new(true));
    let switch = serving.clone();
    let grpc = tonic::service::Routes::new(EchoServer::new(EchoGrpc(config.clone())))
        .add_service(HealthServer::new(HealthGrpc(serving.clone())));
    let (mut running, drain) = isthmus_core::drain::Running::new();
    if let Some(addr) = config.tcp_listen {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding TCP echo on {addr}: {e}"))?;
        let d = drain.clone();
        running.spawn(async move {
            loop {
                let Ok((mut conn, _)) = tcp.accept().await else {
                    continue;
                };
                d.spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }
    running.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (config, grpc, d, counter, serving) = (
                config.clone(),
                grpc.clone(),
                drain.clone(),
                counter.clone(),
                serving.clone(),
            );
            drain.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (config, mut grpc, counter, serving) = (
                        config.clone(),
                        grpc.clone(),
                        counter.clone(),
                        serving.clone(),
                    );
                    async move {
                        if req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("application/grpc"))
                        {
                            let resp = grpc.call(req).await.unwrap_or_else(|never| match never {});
                            return Ok::<_, Infallible>(
                                resp.map(|b| b.map_err(Into::into).boxed_unsync()),
                            );
                        }
                        if req
                            .headers()
                            .get("upgrade")
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
                        {
                            return Ok(websocket(req));
                        }
                        if let Some(resp) = health(&serving, &req) {
                            return Ok(resp);
                        }
                        Ok(answer(&config, &counter, req).await)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = d.draining() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    Ok(Bound {
        address,
        running,
        serving: switch,
    })
}

/// The health paths: `GET /healthz`, `POST /healthz/serving`, `POST /healthz/not-serving`.
fn health(serving: &AtomicBool, req: &Request<Incoming>) -> Option<Response<Body>> {
    let post = req.method() == http::Method::POST;
    match req.uri().path() {
        "/healthz/serving" if post => serving.store(true, Ordering::Relaxed),
        "/healthz/not-serving" if post => serving.store(false, Ordering::Relaxed),
        "/healthz" => {}
        _ => return None,
    }
    let (status, text) = if serving.load(Ordering::Relaxed) {
        (StatusCode::OK, "serving\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
    };
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    Some(resp)
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455).
pub fn websocket_accept(key: &str) -> String {
    use base64::Engine;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Accepts a WebSocket upgrade and then echoes every byte back (frames come back as they
/// were sent: enough to show the connection is carried end to end).
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", http::HeaderValue::from_static("upgrade"));
    h.insert("upgrade", http::HeaderValue::from_static("websocket"));
    if let Ok(v) = http::HeaderValue::from_str(&websocket_accept(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

async fn answer(
    config: &Config,
    counter: &std::sync::atomic::AtomicU64,
    req: Request<Incoming>,
) -> Response<Body> {
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
    }
    if path == "/stall-body" {
        return stalled_body();
    }
    let flaky = (path == "/flaky" && n.is_multiple_of(2))
        || path.strip_prefix("/fail-if/") == Some(config.workload.as_str());
    let caller = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .map(caller_from_xfcc)
        .unwrap_or_default();
    let status = req
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(if flaky {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        });
    let a = Answer {
        cluster: config.cluster.clone(),
        workload: config.workload.clone(),
        caller,
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned(),
        protocol: format!("{:?}", req.version()),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body: String::new(),
        body_len: 0,
    };
    let received = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let a = Answer {
        body: String::from_utf8_lossy(&received[..received.len().min(64 << 10)]).into_owned(),
        body_len: received.len(),
        ..a
    };
    let body = serde_json::to_vec(&a).unwrap_or_default();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    for (name, value) in set_headers(&a.path) {
        resp.headers_mut().append(name, value);
    }
    resp
}

/// A response that starts and then goes silent for good.
fn stalled_body() -> Response<Body> {
    let first = futures::stream::iter([Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
        hyper::body::Frame::data(Bytes::from_static(b"first chunk\n")),
    )]);
    let body = http_body_util::StreamBody::new(futures::StreamExt::chain(
        first,
        futures::stream::pending(),
    ));
    Response::new(BodyExt::boxed_unsync(body))
}

/// The response headers a request asks for with `?set-header=name:value` (repeatable).
fn set_headers(path: &str) -> Vec<(http::HeaderName, http::HeaderValue)> {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("set-header="))
        .filter_map(|nv| nv.split_once(':'))
        .filter_map(|(n, v)| Some((n.parse().ok()?, v.parse().ok()?)))
        .collect()
}
