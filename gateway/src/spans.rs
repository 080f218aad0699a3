//! The gateways' spans: a tunnel a sidecar opens through its gateway to another cluster
//! gets a client span at the local gateway and a server span at the remote one, each a
//! child of the context the tunnel carries (the sidecar's request span, then the local
//! gateway's span in the QUIC stream header). Gateways never start a trace: a tunnel that
//! carries no sampled context makes no span.
//!
//! A gateway sees connections, not requests (TLS runs end to end between sidecars), so
//! its span covers the tunnel's setup — the peer's stream opened, the endpoint connected
//! — and ends once bytes flow: the request that opened the tunnel shows both gateways in
//! its trace; later requests on the pooled tunnel show only the sidecars.

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracer, Span};

use isthmus_core::otlp::{parse_traceparent, traceparent};

/// A tunnel's span, and the context to hand the next hop.
pub struct TunnelSpan {
    span: Span,
    pub traceparent: String,
}

/// Starts a span under `parent` (a `traceparent` value), if tracing is on and the parent
/// is a valid, sampled context.
pub fn start(
    tracer: Option<&SdkTracer>,
    parent: &str,
    name: String,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
) -> Option<TunnelSpan> {
    let tracer = tracer?;
    let parent =
        parse_traceparent(parent.as_bytes(), Default::default()).filter(|p| p.is_sampled())?;
    let cx = opentelemetry::Context::new().with_remote_span_context(parent);
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(tracer, &cx);
    let traceparent = traceparent(span.span_context())
        .to_str()
        .unwrap_or_default()
        .to_owned();
    Some(TunnelSpan { span, traceparent })
}

impl TunnelSpan {
    /// Ends the span: the tunnel is up, or it failed with `error`.
    pub fn end(mut self, error: Option<&str>) {
        if let Some(e) = error {
            self.span
                .set_attribute(KeyValue::new("error.type", e.to_owned()));
            self.span.set_status(Status::error(e.to_owned()));
        }
        self.span.end();
    }
}
