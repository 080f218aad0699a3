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
    h2: Client<HttpConnector, Full<Bytes>>,
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
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// GET `path` from `host` through the listener at `addr`, over HTTP/1.1.
    pub async fn get(&self, addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<Reply> {
        self.send(addr, host, path, false, &[]).await
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        h2: bool,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = http::Request::builder()
            .uri(format!("http://{addr}{path}"))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new()))?;
        let client = if h2 { &self.h2 } else { &self.h1 };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
            .await
            .context("request timed out")??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
