//! An OpenTelemetry collector stand-in: the OTLP/gRPC trace, metrics and logs services
//! (tonic servers for the published protos), keeping whatever they are sent with the
//! headers that came with it, for tests to read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
pub use opentelemetry_proto::tonic::logs::v1::LogRecord;
pub use opentelemetry_proto::tonic::metrics::v1::Metric;
pub use opentelemetry_proto::tonic::trace::v1::Span;

/// What the receiver got: every span, metric and log record, each with its resource's
/// attributes; and the metadata of every export.
#[derive(Default)]
pub struct Received {
    pub spans: Vec<(Vec<KeyValue>, Span)>,
    pub metrics: Vec<(Vec<KeyValue>, Metric)>,
    pub logs: Vec<(Vec<KeyValue>, LogRecord)>,
    pub headers: Vec<tonic::metadata::MetadataMap>,
    /// TLS handshakes that failed (a client that does not trust the receiver's
    /// certificate ends its handshake with an alert).
    pub tls_failures: usize,
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Received>>);

impl Store {
    fn with<T>(&self, f: impl FnOnce(&mut Received) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A running receiver: OTLP/gRPC at `address`, OTLP/HTTP (protobuf bodies POSTed to
/// `/v1/traces`, `/v1/metrics`, `/v1/logs`) at `http_address`; stops when dropped.
pub struct OtlpReceiver {
    pub address: SocketAddr,
    pub http_address: SocketAddr,
    /// `https` when both listeners speak TLS (see [`OtlpReceiver::start_tls`]).
    scheme: &'static str,
    store: Store,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl OtlpReceiver {
    pub async fn start(ip: std::net::IpAddr) -> anyhow::Result<Self> {
        Self::start_inner(ip, None).await
    }

    /// Like [`OtlpReceiver::start`], with both listeners behind TLS with the certificate
    /// `cert_pem` (a chain, leaf first) and its key.
    pub async fn start_tls(
        ip: std::net::IpAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<Self> {
        let certs =
            rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
            .ok_or_else(|| anyhow::anyhow!("no private key"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::start_inner(ip, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_inner(
        ip: std::net::IpAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let address = listener.local_addr()?;
        let store = Store::default();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .add_service(MetricsServiceServer::new(store.clone()))
            .add_service(LogsServiceServer::new(store.clone()));
        let grpc = match tls.clone() {
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tokio::spawn(async move {
                    let _ = router.serve_with_incoming(incoming).await;
                })
            }
            Some(acceptor) => {
                // Handshakes on tasks of their own; finished ones go to the server.
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                let failures = store.clone();
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        let failures = failures.clone();
                        tokio::spawn(async move {
                            match acceptor.accept(tcp).await {
                                Ok(tls) => {
                                    let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                                }
                                Err(_) => failures.with(|r| r.tls_failures += 1),
                            }
                        });
                    }
                });
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
                tokio::spawn(async move {
                    let _ = router.serve_with_incoming(incoming).await;
                })
            }
        };
        let http = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let http_address = http.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let http = tokio::spawn(serve_http(http, store.clone(), tls));
        Ok(Self {
            address,
            http_address,
            scheme,
            store,
            tasks: vec![grpc, http],
        })
    }

    /// `http://http_address`, as a proxy's --otlp-endpoint with `http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.http_address)
    }

    /// `http://address`, as a proxy's --otlp-endpoint.
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.address)
    }

    /// Reads what was received so far.
    pub fn read<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        self.store.with(|r| f(r))
    }
}

/// The string value of attribute `key`, if any.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone();
        self.with(|r| {
            r.headers.push(headers);
            for rs in request.into_inner().resource_spans {
                let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        r.spans.push((resource.clone(), span));
                    }
                }
            }
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone();
        self.with(|r| {
            r.headers.push(headers);
            for rm in request.into_inner().resource_metrics {
                let resource = rm.resource.map(|r| r.attributes).unwrap_or_default();
                for sm in rm.scope_metrics {
                    for m in sm.metrics {
                        r.metrics.push((resource.clone(), m));
                    }
                }
            }
        });
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone();
        self.with(|r| {
            r.headers.push(headers);
            for rl in request.into_inner().resource_logs {
                let resource = rl.resource.map(|r| r.attributes).unwrap_or_default();
                for sl in rl.scope_logs {
                    for l in sl.log_records {
                        r.logs.push((resource.clone(), l));
                    }
                }
            }
        });
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// OTLP/HTTP: each POST's protobuf body goes to the same handlers as gRPC exports.
async fn serve_http(
    listener: tokio::net::TcpListener,
    store: Store,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    use http_body_util::BodyExt;
    use prost::Message;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (store, tls) = (store.clone(), tls.clone());
        let failures = store.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
                        let ok = match parts.uri.path() {
                            "/v1/traces" => match ExportTraceServiceRequest::decode(bytes) {
                                Ok(m) => TraceService::export(&store, with_metadata(m, &metadata))
                                    .await
                                    .is_ok(),
                                Err(_) => false,
                            },
                            "/v1/metrics" => match ExportMetricsServiceRequest::decode(bytes) {
                                Ok(m) => {
                                    MetricsService::export(&store, with_metadata(m, &metadata))
                                        .await
                                        .is_ok()
                                }
                                Err(_) => false,
                            },
                            "/v1/logs" => match ExportLogsServiceRequest::decode(bytes) {
                                Ok(m) => LogsService::export(&store, with_metadata(m, &metadata))
                                    .await
                                    .is_ok(),
                                Err(_) => false,
                            },
                            _ => false,
                        };
                        let status = if ok { 200 } else { 400 };
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "application/x-protobuf")
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                    }
                });
            let http1 = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = http1
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                }
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => {
                        let _ = http1
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    }
                    Err(_) => failures.with(|r| r.tls_failures += 1),
                },
            }
        });
    }
}

fn with_metadata<T>(message: T, metadata: &tonic::metadata::MetadataMap) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    *r.metadata_mut() = metadata.clone();
    r
}
