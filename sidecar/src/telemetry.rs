//! What a request or connection leaves behind when it ends: Istio's metrics (see
//! `metrics`), with sizes counted as the bytes flow and the outcome (status, gRPC status,
//! Envoy's response flags) read from the response.
//!
//! A request is measured by [`Exchange`], carried by its response body ([`MeteredBody`])
//! and completed when that body ends, so the duration and response size are those of the
//! whole response, as Istio reports them. An opaque connection is measured by
//! [`MeteredIo`] around the stream that faces the source: its reads are the request
//! direction (`istio_tcp_received_bytes_total`), its writes the response direction
//! (`istio_tcp_sent_bytes_total`), counted as they happen, so a long connection's bytes
//! show before it closes.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{Metrics, Series, TcpHandles};
use crate::peer::Workload;
use crate::pool::{BoxError, ProxyBody};

/// The workload that answered a request, as its sidecar described itself (a response
/// extension the attempt sets for the outbound path).
#[derive(Clone, Debug)]
pub struct Answered(pub Arc<Workload>);

/// Bytes of a request, counted as its body is forwarded.
#[derive(Clone, Debug, Default)]
pub struct RequestBytes(pub Arc<AtomicU64>);

/// The size a header block takes on the wire, near enough: names, values and separators.
pub fn header_bytes(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// Envoy's response flag for a reason the proxies give their own answers
/// (`x-isthmus-error`): UH no healthy upstream, UF upstream connect failure, UR upstream
/// reset, UT upstream timeout, UO overflow (circuit breaker), NR no route, RL rate limited,
/// FI fault injected, DC/DPE downstream broke or sent what cannot be served, UPE upstream
/// protocol error; `-` for answers that carry no flag in Envoy (policy denials).
pub fn response_flag(reason: &str) -> &'static str {
    match reason {
        "no-route" | "tunnel-unsupported" => "NR",
        "no-healthy-upstream" => "UH",
        "upstream-connect-failure" | "app-unavailable" | "app-connect-timeout" => "UF",
        "upstream-reset" | "app-reset" | "peer-unavailable" => "UR",
        "fault-abort" => "FI",
        "timeout" | "per-try-timeout" => "UT",
        "overflow" => "UO",
        "rate-limited" => "RL",
        "downstream-body" | "downstream-timeout" => "DC",
        "invalid-request" | "request-headers-too-large" => "DPE",
        "response-headers-too-large" => "UPE",
        _ => "-",
    }
}

/// What a sidecar does with a finished request beyond its metrics: a span (when tracing
/// is on) and access log lines, as the telemetry in force says for each side of its
/// traffic. The telemetry in force is swapped whole when the workload's policy changes;
/// a request keeps the one it started with.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    active: std::sync::RwLock<Arc<Active>>,
}

/// The telemetry in force: for requests the app makes (client) and those it answers
/// (server).
#[derive(Default)]
pub struct Active {
    pub client: Side,
    pub server: Side,
}

impl Active {
    fn side(&self, kind: &opentelemetry::trace::SpanKind) -> &Side {
        match kind {
            opentelemetry::trace::SpanKind::Client => &self.client,
            _ => &self.server,
        }
    }
}

/// Telemetry for one side of a workload's traffic.
#[derive(Default)]
pub struct Side {
    pub tracing: Option<Tracing>,
    pub logs: Vec<crate::access_log::Sink>,
    /// Request headers the logs read (formats and filters), kept as a request arrives.
    pub log_headers: Vec<String>,
}

/// Spans of one side: where they go, and the tags each carries.
pub struct Tracing {
    pub tracer: opentelemetry_sdk::trace::SdkTracer,
    pub tags: Vec<Tag>,
    /// Longest tag value kept.
    pub max_tag_length: usize,
}

/// A custom tag: a value known when the policy is applied (a literal, an environment
/// variable), or a request header's.
pub enum Tag {
    Fixed(opentelemetry::Key, String),
    Header {
        key: opentelemetry::Key,
        header: http::HeaderName,
        default: String,
    },
}

impl Telemetry {
    /// Metrics only.
    pub fn metrics_only(metrics: Arc<Metrics>) -> Self {
        Self::new(metrics, Arc::default())
    }

    pub fn new(metrics: Arc<Metrics>, active: Arc<Active>) -> Self {
        Self {
            metrics,
            active: std::sync::RwLock::new(active),
        }
    }

    /// The telemetry in force now.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `active` in force for requests that start from now on.
    pub fn replace(&self, active: Arc<Active>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = active;
    }
}

/// One request, measured until its response ends.
pub struct Exchange {
    telemetry: Arc<Telemetry>,
    active: Arc<Active>,
    kind: opentelemetry::trace::SpanKind,
    series: Option<Series>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    code: u16,
    grpc_status: Option<u16>,
    flags: &'static str,
    span: Option<opentelemetry_sdk::trace::Span>,
    log: Option<Box<crate::access_log::Request>>,
}

impl Exchange {
    /// A request as it arrives: its size starts counting (its body is counted where it is
    /// forwarded, into [`Exchange::request_bytes`]); with tracing on, a
    /// span of `kind` starts as a child of the caller's context, and the request carries
    /// the span's context on to the next hop.
    pub fn start(
        telemetry: &Arc<Telemetry>,
        started: Instant,
        req: &mut http::Request<hyper::body::Incoming>,
        kind: opentelemetry::trace::SpanKind,
    ) -> Self {
        let counted = RequestBytes::default();
        counted
            .0
            .store(header_bytes(req.headers()), Ordering::Relaxed);
        let active = telemetry.active();
        let side = active.side(&kind);
        let log = (!side.logs.is_empty())
            .then(|| Box::new(crate::access_log::Request::of(req, &side.log_headers)));
        let span = side
            .tracing
            .as_ref()
            .map(|tracing| crate::spans::start(tracing, req, kind.clone()));
        Self {
            telemetry: telemetry.clone(),
            active,
            kind,
            series: None,
            started,
            request_bytes: counted.0,
            response_bytes: 0,
            code: 0,
            grpc_status: None,
            flags: "-",
            span,
            log,
        }
    }

    /// Where the forwarding path counts the request body's bytes.
    pub fn request_bytes(&self) -> RequestBytes {
        RequestBytes(self.request_bytes.clone())
    }

    /// Reads the outcome from the response head, and wraps its body to finish the
    /// measurement when the body ends. `series` names who called whom.
    pub fn respond(
        mut self,
        resp: http::Response<ProxyBody>,
        mut series: Series,
    ) -> http::Response<ProxyBody> {
        self.code = resp.status().as_u16();
        self.response_bytes = header_bytes(resp.headers());
        self.grpc_status = isthmus_core::headers::grpc_status(resp.headers());
        if let Some(reason) = resp
            .headers()
            .get(isthmus_core::headers::ERROR_REASON)
            .and_then(|v| v.to_str().ok())
        {
            self.flags = response_flag(reason);
        }
        if let Some(Answered(w)) = resp.extensions().get::<Answered>() {
            series.destination = w.clone();
        }
        self.series = Some(series);
        resp.map(|body| {
            crate::body::boxed(MeteredBody {
                inner: body,
                exchange: Some(self),
            })
        })
    }

    fn finish(mut self, flags: Option<&'static str>) {
        let flags = match (self.flags, flags) {
            ("-", Some(f)) => f,
            (f, _) => f,
        };
        let Some(series) = self.series.take() else {
            return;
        };
        let duration = self.started.elapsed();
        let received = self.request_bytes.load(Ordering::Relaxed);
        let key = series.key(self.code, self.grpc_status, flags);
        self.telemetry
            .metrics
            .request(&key, duration, received, self.response_bytes);
        let trace = self.span.as_ref().map(|s| {
            use opentelemetry::trace::Span as _;
            s.span_context().clone()
        });
        let outcome = Outcome {
            trace,
            series: &series,
            code: self.code,
            grpc_status: self.grpc_status,
            flags,
            duration,
            received,
            sent: self.response_bytes,
        };
        if let Some(span) = self.span.take() {
            crate::spans::end(span, &outcome);
        }
        if let Some(request) = self.log.take() {
            crate::access_log::write(&self.active.side(&self.kind).logs, &request, &outcome);
        }
    }
}

/// How a request ended, for its span and its access log line.
pub struct Outcome<'a> {
    /// The request's span at this hop, when traced: access logs name it.
    pub trace: Option<opentelemetry::trace::SpanContext>,
    pub series: &'a Series,
    pub code: u16,
    pub grpc_status: Option<u16>,
    pub flags: &'static str,
    pub duration: std::time::Duration,
    /// Bytes of the request (headers and body) and of the response.
    pub received: u64,
    pub sent: u64,
}

/// A response body that completes its request's measurement when it ends (or is dropped
/// before its end: the client went away, Envoy's `DC`).
pub struct MeteredBody {
    inner: ProxyBody,
    exchange: Option<Exchange>,
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(ex) = this.exchange.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        ex.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        ex.response_bytes += header_bytes(trailers);
                        ex.grpc_status =
                            isthmus_core::headers::grpc_status(trailers).or(ex.grpc_status);
                    }
                }
                if this.inner.is_end_stream() {
                    if let Some(ex) = this.exchange.take() {
                        ex.finish(None);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(ex) = this.exchange.take() {
                    ex.finish(None);
                }
            }
            // The upstream broke the response under way.
            Poll::Ready(Some(Err(_))) => {
                if let Some(ex) = this.exchange.take() {
                    ex.finish(Some("UR"));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(ex) = self.exchange.take() {
            let gone = (!self.inner.is_end_stream()).then_some("DC");
            ex.finish(gone);
        }
    }
}

/// Counts a request body's bytes into a [`RequestBytes`] as they are forwarded.
pub struct CountedBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, count: &RequestBytes) -> Self {
        Self {
            inner,
            count: count.0.clone(),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What an opaque connection is counted as, until its stream is at hand (a request
/// extension on the receiving side's CONNECT).
#[derive(Clone)]
pub struct Meter {
    pub metrics: Arc<Metrics>,
    pub series: Series,
}

impl Meter {
    /// Counts `stream`, the source's side of the connection, as opened.
    pub fn io<S>(&self, stream: S) -> MeteredIo<S> {
        let handles = self.metrics.connection(&self.series.key(0, None, "-"));
        MeteredIo {
            inner: stream,
            handles: Some(handles),
        }
    }

    /// `stream` counted by `meter`, or passed through untouched without one.
    pub fn maybe<S>(meter: Option<&Meter>, stream: S) -> MeteredIo<S> {
        match meter {
            Some(m) => m.io(stream),
            None => MeteredIo {
                inner: stream,
                handles: None,
            },
        }
    }
}

/// An opaque connection's stream on the source's side, counting its bytes as they pass and
/// its close when dropped.
pub struct MeteredIo<S> {
    inner: S,
    handles: Option<TcpHandles>,
}

impl<S> Drop for MeteredIo<S> {
    fn drop(&mut self) {
        if let Some(h) = &self.handles {
            h.closed.inc();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if let (Some(h), true) = (&self.handles, read > 0) {
            h.received.inc_by(read as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some(h), Poll::Ready(Ok(n))) = (&self.handles, &polled) {
            h.sent.inc_by(*n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
