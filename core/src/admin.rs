//! The admin listener every component serves (port 15000 on proxies, 15014 on
//! controllers): `/ready`, `/stats/prometheus`, `/config_dump`, `/logging`. It binds
//! loopback by default, and the one endpoint that changes state (`POST /logging`) answers
//! only callers on loopback, wherever it is bound. An optional metrics listener serves
//! `/ready` and `/stats/prometheus` alone, for scrapers on other hosts (Envoy's 15090).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::drain::Drain;
use crate::readiness::Readiness;

/// Produces the JSON served on `/config_dump`.
pub type ConfigDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;
/// Answers `/explain?<query>` (sidecars: how a request would be routed), or says what is
/// wrong with the query.
pub type Explain = Arc<dyn Fn(&str) -> Result<serde_json::Value, String> + Send + Sync>;
/// Changes the log filter (`/logging?level=...`); returns the filter now in force.
pub type LogControl = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    pub dump: ConfigDump,
    pub logging: Option<LogControl>,
    /// `/explain`, where the component has one.
    pub explain: Option<Explain>,
}

/// Seconds since the Unix epoch, as every `/config_dump` writes times (`*_unix`) and the
/// `*_timestamp_seconds` gauges hold them.
pub fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Istio's `istio_build{component, tag} 1`: which version of which component serves,
/// as Istio's dashboards read it (`proxy` for sidecars and gateways, `pilot` for a
/// cluster's controller).
pub fn register_build(registry: &mut Registry, component: &str) {
    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct Build {
        component: String,
        tag: String,
    }
    let family = prometheus_client::metrics::family::Family::<
        Build,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    family
        .get_or_create(&Build {
            component: component.to_owned(),
            tag: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    registry.register("istio_build", "the component's build (always 1)", family);
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Everything: readiness, metrics, config dump, log level.
    Admin,
    /// Readiness and metrics only.
    Metrics,
}

/// The bound admin listener, and the metrics listener when one is asked for.
pub struct AdminServer {
    listener: TcpListener,
    metrics: Option<TcpListener>,
    admin: Admin,
}

impl AdminServer {
    pub async fn bind(
        addr: SocketAddr,
        metrics: Option<SocketAddr>,
        admin: Admin,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let metrics = match metrics {
            Some(m) => Some(TcpListener::bind(m).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("metrics listener on {m}: {e}"))
            })?),
            None => None,
        };
        Ok(Self {
            listener,
            metrics,
            admin,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    pub async fn run(self, drain: Drain) {
        let admin = serve(
            self.listener,
            self.admin.clone(),
            Scope::Admin,
            drain.clone(),
        );
        match self.metrics {
            Some(m) => {
                tokio::join!(admin, serve(m, self.admin, Scope::Metrics, drain));
            }
            None => admin.await,
        }
    }
}

async fn serve(listener: TcpListener, admin: Admin, scope: Scope, drain: Drain) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (admin, d) = (admin.clone(), drain.clone());
        drain.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, scope, peer, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = d
                .serve_http(builder.serve_connection(TokioIo::new(tcp), svc))
                .await;
        });
    }
}

/// Why a request is refused before it is served, if it is.
fn refusal(scope: Scope, method: &Method, path: &str, peer: SocketAddr) -> Option<StatusCode> {
    let read_only = matches!(
        (method, path),
        (&Method::GET, "/ready" | "/stats/prometheus" | "/metrics")
    );
    if scope == Scope::Metrics && !read_only {
        return Some(StatusCode::NOT_FOUND);
    }
    if *method != Method::GET && !peer.ip().is_loopback() {
        return Some(StatusCode::FORBIDDEN);
    }
    None
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    admin: &Admin,
    scope: Scope,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    match refusal(scope, req.method(), req.uri().path(), peer) {
        Some(StatusCode::FORBIDDEN) => {
            return text(
                StatusCode::FORBIDDEN,
                "state-changing admin endpoints answer only on loopback\n",
            )
        }
        Some(status) => return text(status, "this port serves /ready and /stats/prometheus\n"),
        None => {}
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            let pending = admin.readiness.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {}\n", pending.join(", ")),
                )
            }
        }
        (&Method::GET, "/stats/prometheus") | (&Method::GET, "/metrics") => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &admin.registry) {
                Ok(()) => {
                    let mut resp = text(StatusCode::OK, out);
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    resp
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&(admin.dump)()).unwrap_or_default();
            text(StatusCode::OK, body)
        }
        (&Method::GET, "/explain") if admin.explain.is_some() => {
            let explain = admin.explain.as_ref().expect("checked");
            match explain(req.uri().query().unwrap_or_default()) {
                Ok(v) => text(
                    StatusCode::OK,
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (&Method::POST, "/logging") => {
            let Some(control) = &admin.logging else {
                return text(StatusCode::NOT_FOUND, "log control not available\n");
            };
            let query = req.uri().query().unwrap_or_default().to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
            match control(&level) {
                Ok(now) => text(StatusCode::OK, format!("{now}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /ready, /stats/prometheus, /config_dump, POST /logging?level=\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn the_metrics_listener_serves_metrics_and_nothing_else() {
        let admin = Admin {
            registry: Arc::new(Registry::default()),
            readiness: Readiness::default(),
            dump: Arc::new(|| serde_json::json!({"secret": "config"})),
            logging: None,
            explain: None,
        };
        let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let server = AdminServer::bind(local, Some(local), admin)
            .await
            .expect("bind");
        let (admin_addr, metrics) = (server.address(), server.metrics_address().expect("metrics"));
        let (_trigger, drain) = crate::drain::new();
        tokio::spawn(server.run(drain));
        assert!(get(metrics, "GET", "/stats/prometheus")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(metrics, "GET", "/ready")
            .await
            .starts_with("HTTP/1.1 200"));
        let dump = get(metrics, "GET", "/config_dump").await;
        assert!(
            dump.starts_with("HTTP/1.1 404") && !dump.contains("secret"),
            "{dump}"
        );
        assert!(get(admin_addr, "GET", "/config_dump")
            .await
            .contains("secret"));
    }

    #[test]
    fn only_loopback_callers_change_state_and_the_metrics_port_serves_metrics_alone() {
        let local: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let remote: SocketAddr = "10.1.2.3:4000".parse().expect("addr");
        let post = Method::POST;
        assert_eq!(refusal(Scope::Admin, &post, "/logging", local), None);
        assert_eq!(
            refusal(Scope::Admin, &post, "/logging", remote),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            refusal(Scope::Admin, &Method::GET, "/config_dump", remote),
            None
        );
        for path in ["/ready", "/stats/prometheus", "/metrics"] {
            assert_eq!(refusal(Scope::Metrics, &Method::GET, path, remote), None);
        }
        assert_eq!(
            refusal(Scope::Metrics, &Method::GET, "/config_dump", remote),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(
            refusal(Scope::Metrics, &post, "/logging", local),
            Some(StatusCode::NOT_FOUND)
        );
    }
}
