//! A plain HTTP client as an app uses it against its sidecar: HTTP/1.1 or HTTP/2 (prior
//! knowledge), the mesh service named in the Host header. Used by the demo and the tests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::echo::Answer;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One response as the app sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The sample app's answer in the body.
    pub fn answer(&self) -> anyhow::Result<Answer> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {} body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Clone)]
pub struct AppClient {
    h1: Client<HttpConnector, Full<Bytes>>,
}

/// One HTTP/2 request on a fresh prior-knowledge connection to `addr`.
async fn h2_request(
    addr: SocketAddr,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    Ok(send.send_request(req).await?)
}

impl Default for AppClient {
    fn default() -> Self {
        Self::new()
    }
}

impl AppClient {
    pub fn new() -> Self {
        Self {
            h1: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// GET `path` from `host` through the listener at `addr`, over HTTP/1.1.
    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
        self.send(addr, host, path, false, &[]).await
    }

    /// Sends a GET to `host` (the mesh service) through the listener at `addr`. Over
    /// HTTP/1.1 the service goes in the Host header; over HTTP/2 (prior knowledge) in the
    /// `:authority`, on a connection made to `addr`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        h2: bool,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let uri = if h2 {
            format!("http://{host}{path}")
        } else {
            format!("http://{addr}{path}")
        };
        let mut req = http::Request::builder().uri(uri);
        if !h2 {
            req = req.header("host", host);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let resp = if h2 {
            tokio::time::timeout(REQUEST_TIMEOUT, h2_request(addr, req))
                .await
                .context("request timed out")??
        } else {
            tokio::time::timeout(REQUEST_TIMEOUT, self.h1.request(req))
                .await
                .context("request timed out")??
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
