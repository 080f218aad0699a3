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
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Received>>);

impl Store {
    fn with<T>(&self, f: impl FnOnce(&mut Received) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    pub address: SocketAddr,
    store: Store,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    pub async fn start(ip: std::net::IpAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let address = listener.local_addr()?;
        let store = Store::default();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .add_service(MetricsServiceServer::new(store.clone()))
            .add_service(LogsServiceServer::new(store.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        Ok(Self {
            address,
            store,
            task,
        })
    }

    /// `http://address`, as a proxy's --otlp-endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
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
