//! A span per request at each sidecar, when tracing is on: a client span where the app's
//! request leaves, a server span where a peer's request reaches the app. Each continues
//! the caller's W3C (or B3) context and hands its own on in the request, so a trace shows
//! every hop; the gateways in between add theirs to the tunnels they open (see
//! `gateway/src/tunnel.rs`).
//!
//! Attributes follow OpenTelemetry's HTTP semantic conventions, plus the mesh's own
//! (`isthmus.*`: source and destination workload and cluster, Envoy's response flags).

use http::Request;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Span;

use isthmus_core::otlp::TraceContext;

use crate::telemetry::{Outcome, Tag, Tracing};

/// Longest host kept in a span name; the rest is cut (the name is the caller's text).
const MAX_NAME_HOST: usize = 128;

/// Starts the span of `req` as a child of the context it carries, with the custom tags of
/// `tracing`, and rewrites that context in `req` to this span's for the next hop.
pub fn start<B>(tracing: &Tracing, req: &mut Request<B>, kind: SpanKind) -> Span {
    let tracer = &tracing.tracer;
    let caller = TraceContext::extract(req.headers());
    let parent = match &caller {
        Some(c) => opentelemetry::Context::new().with_remote_span_context(c.span.clone()),
        None => opentelemetry::Context::new(),
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("-");
    let host = match host.char_indices().nth(MAX_NAME_HOST) {
        Some((cut, _)) => &host[..cut],
        None => host,
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", req.method().as_str().to_owned()),
        KeyValue::new("url.path", req.uri().path().to_owned()),
        KeyValue::new("server.address", host.to_owned()),
        KeyValue::new("network.protocol.version", protocol_version(req.version())),
    ];
    if let Some(ua) = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        attributes.push(KeyValue::new("user_agent.original", ua.to_owned()));
    }
    let cut = |v: &str| match v.char_indices().nth(tracing.max_tag_length) {
        Some((at, _)) => v[..at].to_owned(),
        None => v.to_owned(),
    };
    for tag in &tracing.tags {
        attributes.push(match tag {
            Tag::Fixed(k, v) => KeyValue::new(k.clone(), cut(v)),
            Tag::Header {
                key,
                header,
                default,
            } => {
                let v = req
                    .headers()
                    .get(header)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(default);
                KeyValue::new(key.clone(), cut(v))
            }
        });
    }
    let span = tracer
        .span_builder(format!("{host}/*"))
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    let b3 = caller.is_some_and(|c| c.b3);
    TraceContext::inject(span.span_context(), b3, req.headers_mut());
    span
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

/// Ends the span with how the request went.
pub fn end(mut span: Span, outcome: &Outcome<'_>) {
    if !span.is_recording() {
        return;
    }
    let s = outcome.series;
    span.set_attributes([
        KeyValue::new("http.response.status_code", i64::from(outcome.code)),
        KeyValue::new("isthmus.response_flags", outcome.flags),
        KeyValue::new("isthmus.destination.service", s.service.host.to_string()),
        KeyValue::new("isthmus.source.workload", s.source.name.to_string()),
        KeyValue::new("isthmus.source.namespace", s.source.namespace.to_string()),
        KeyValue::new("isthmus.source.cluster", s.source.cluster.to_string()),
        KeyValue::new(
            "isthmus.destination.workload",
            s.destination.name.to_string(),
        ),
        KeyValue::new(
            "isthmus.destination.namespace",
            s.destination.namespace.to_string(),
        ),
        KeyValue::new("isthmus.destination.cluster", destination_cluster(s)),
        KeyValue::new("http.request.size", outcome.received as i64),
        KeyValue::new("http.response.size", outcome.sent as i64),
    ]);
    if let Some(g) = outcome.grpc_status {
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(g)));
    }
    if outcome.code >= 500 || outcome.code == 0 {
        span.set_status(Status::error(outcome.flags.to_owned()));
    }
    span.end();
}

/// The destination's cluster: as it described itself, else the one that answered.
fn destination_cluster(s: &crate::metrics::Series) -> String {
    if s.destination.id() == 0 {
        s.destination_cluster.to_string()
    } else {
        s.destination.cluster.to_string()
    }
}
