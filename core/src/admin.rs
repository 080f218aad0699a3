//! The admin listener every component serves (port 15000 on proxies, 15014 on
//! controllers): `/ready`, `/stats/prometheus`, `/config_dump`, `/logging`.

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
/// Changes the log filter (`/logging?level=...`); returns the filter now in force.
pub type LogControl = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    pub dump: ConfigDump,
    pub logging: Option<LogControl>,
}

/// A bound admin listener.
pub struct AdminServer {
    listener: TcpListener,
    admin: Admin,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, admin: Admin) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            admin,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub async fn run(self, drain: Drain) {
        loop {
            let Ok((tcp, _)) = self.listener.accept().await else {
                continue;
            };
            let (admin, d) = (self.admin.clone(), drain.clone());
            drain.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(handle(&admin, req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = d
                    .serve_http(builder.serve_connection(TokioIo::new(tcp), svc))
                    .await;
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
