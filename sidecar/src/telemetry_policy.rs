//! Puts the workload's telemetry policy in force: the tracers, access log sinks and metric
//! shape the controller resolved from Istio's Telemetry resources and the mesh config
//! (`TelemetryPolicy` in the Workload resource), built when the policy changes and swapped
//! in whole, with no restart and no dropped request. Without a policy the sidecar's flags
//! decide (`--otlp-endpoint`, `--trace-sampling`, `--access-log`).
//!
//! Exporters are kept per collector (and, for traces, per sampling and reporting choice):
//! a change that names the same collector keeps its exporter and what it has buffered; a
//! collector no longer named is flushed and closed.

use std::collections::HashMap;
use std::sync::Arc;

use isthmus_proto::discovery as xds;
use opentelemetry::logs::LoggerProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};

use crate::access_log::{Sink, Style};
use crate::state::MeshState;
use crate::telemetry::{Active, Side, Tag, Telemetry, Tracing};

/// Istio's default longest tag value (`maxTagLength`).
const DEFAULT_MAX_TAG_LENGTH: usize = 256;

/// Builds what a policy names, keeping exporters across policies.
pub struct Builder {
    /// This proxy's OpenTelemetry resource.
    resource: Vec<(String, String)>,
    /// What the flags configure, in force while no policy is pushed.
    flags: Arc<Active>,
    dropped: Counter,
    /// Owns the flushes of exporters no longer used.
    drain: isthmus_core::drain::Drain,
    tracers: HashMap<String, SdkTracerProvider>,
    loggers: HashMap<String, SdkLoggerProvider>,
    writers: HashMap<String, mpsc::Sender<String>>,
}

impl Builder {
    pub fn new(
        resource: Vec<(String, String)>,
        flags: Arc<Active>,
        dropped: Counter,
        drain: isthmus_core::drain::Drain,
    ) -> Self {
        Self {
            resource,
            flags,
            dropped,
            drain,
            tracers: HashMap::new(),
            loggers: HashMap::new(),
            writers: HashMap::new(),
        }
    }

    /// The telemetry `policy` puts in force. What cannot be built (a collector whose
    /// address is not a URL, a file that cannot be opened) is logged and left out; the
    /// rest applies.
    pub fn build(&mut self, policy: &xds::TelemetryPolicy) -> Active {
        let mut used = Used::default();
        let client = Side {
            tracing: self.tracing(policy.client_tracing.as_ref(), &mut used),
            logs: self.sinks(&policy.client_access_logs, &mut used),
            log_headers: Vec::new(),
        };
        let server = Side {
            tracing: self.tracing(policy.server_tracing.as_ref(), &mut used),
            logs: self.sinks(&policy.server_access_logs, &mut used),
            log_headers: Vec::new(),
        };
        self.close_unused(&used);
        Active {
            client: with_headers(client),
            server: with_headers(server),
        }
    }

    fn tracing(&mut self, t: Option<&xds::TracingPolicy>, used: &mut Used) -> Option<Tracing> {
        let t = t?;
        let collector = t.collector.as_ref()?;
        let key = format!(
            "{}|{}|{}",
            collector_key(collector),
            t.sampling_percent,
            t.disable_reporting
        );
        let provider = match self.tracers.get(&key) {
            Some(p) => p.clone(),
            None => {
                let made = isthmus_core::otlp::Config::for_collector(
                    collector,
                    t.sampling_percent,
                    &self.resource,
                )
                .and_then(|c| isthmus_core::otlp::tracer_provider(&c, !t.disable_reporting));
                match made {
                    Ok(p) => {
                        self.tracers.insert(key.clone(), p.clone());
                        p
                    }
                    Err(e) => {
                        tracing::warn!(provider = %collector.provider, error = %e, "tracing provider left out");
                        return None;
                    }
                }
            }
        };
        used.tracers.push(key);
        let tags = t
            .custom_tags
            .iter()
            .filter_map(|tag| {
                use xds::custom_tag::Value;
                let key = opentelemetry::Key::new(tag.name.clone());
                Some(match tag.value.as_ref()? {
                    Value::Literal(v) => Tag::Fixed(key, v.clone()),
                    Value::Environment(name) => Tag::Fixed(
                        key,
                        std::env::var(name).unwrap_or_else(|_| tag.default_value.clone()),
                    ),
                    Value::Header(h) => Tag::Header {
                        key,
                        header: http::HeaderName::from_bytes(h.as_bytes()).ok()?,
                        default: tag.default_value.clone(),
                    },
                })
            })
            .collect();
        Some(Tracing {
            tracer: provider.tracer("isthmus-sidecar"),
            tags,
            max_tag_length: match t.max_tag_length {
                0 => DEFAULT_MAX_TAG_LENGTH,
                n => n as usize,
            },
        })
    }

    fn sinks(&mut self, sinks: &[xds::AccessLogSink], used: &mut Used) -> Vec<Sink> {
        sinks.iter().filter_map(|s| self.sink(s, used)).collect()
    }

    fn sink(&mut self, s: &xds::AccessLogSink, used: &mut Used) -> Option<Sink> {
        // The controller checked the filter; one that does not parse here (a newer
        // controller's) leaves the sink out rather than logging what it should not.
        let filter = match s.filter.as_str() {
            "" => None,
            text => match isthmus_core::cel::Filter::parse(text) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(provider = %s.provider, error = %e, "access log filter does not parse; sink left out");
                    return None;
                }
            },
        };
        match s.sink.as_ref()? {
            xds::access_log_sink::Sink::File(f) => {
                let style = match style(f) {
                    Ok(style) => style,
                    Err(e) => {
                        tracing::warn!(provider = %s.provider, error = %e, "access log format left out");
                        return None;
                    }
                };
                let tx = match self.writers.get(&f.path) {
                    Some(tx) => tx.clone(),
                    None => match crate::access_log::writer(&f.path) {
                        Ok(tx) => {
                            self.writers.insert(f.path.clone(), tx.clone());
                            tx
                        }
                        Err(e) => {
                            tracing::warn!(path = %f.path, error = %e, "access log file cannot be opened; left out");
                            return None;
                        }
                    },
                };
                Some(Sink::lines(tx, style, self.dropped.clone(), filter))
            }
            xds::access_log_sink::Sink::Otlp(c) => {
                let key = collector_key(c);
                let provider = match self.loggers.get(&key) {
                    Some(p) => p.clone(),
                    None => {
                        let made =
                            isthmus_core::otlp::Config::for_collector(c, 0.0, &self.resource)
                                .and_then(|c| isthmus_core::otlp::logger_provider(&c));
                        match made {
                            Ok(p) => {
                                self.loggers.insert(key.clone(), p.clone());
                                p
                            }
                            Err(e) => {
                                tracing::warn!(provider = %c.provider, error = %e, "access log provider left out");
                                return None;
                            }
                        }
                    }
                };
                used.loggers.push(key);
                Some(Sink::otlp(provider.logger("isthmus-sidecar"), filter))
            }
        }
    }

    /// Flushes and closes the exporters no side uses any more, off the request path.
    fn close_unused(&mut self, used: &Used) {
        let tracers: Vec<_> = self
            .tracers
            .extract_if(|k, _| !used.tracers.contains(k))
            .map(|(_, p)| p)
            .collect();
        let loggers: Vec<_> = self
            .loggers
            .extract_if(|k, _| !used.loggers.contains(k))
            .map(|(_, p)| p)
            .collect();
        if tracers.is_empty() && loggers.is_empty() {
            return;
        }
        // The SDK's shutdown blocks until the exporters have flushed.
        self.drain.spawn(async move {
            let _ = tokio::task::spawn_blocking(move || {
                for t in tracers {
                    let _ = t.shutdown();
                }
                for l in loggers {
                    let _ = l.shutdown();
                }
            })
            .await;
        });
    }
}

#[derive(Default)]
struct Used {
    tracers: Vec<String>,
    loggers: Vec<String>,
}

fn collector_key(c: &xds::OtlpCollector) -> String {
    format!(
        "{}|{}|{:?}|{}",
        c.endpoint, c.protocol, c.headers, c.timeout_ms
    )
}

fn style(f: &xds::FileSink) -> Result<Style, String> {
    use isthmus_core::access_format::Format;
    Ok(if !f.json_labels.is_empty() {
        Style::Labels(
            f.json_labels
                .iter()
                .map(|(k, v)| Ok((k.clone(), Format::parse(v)?)))
                .collect::<Result<_, String>>()?,
        )
    } else if !f.text_format.is_empty() {
        let mut text = f.text_format.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Style::Text(Format::parse(&text)?)
    } else if f.json {
        Style::Json
    } else {
        Style::Envoy
    })
}

fn with_headers(mut side: Side) -> Side {
    let mut headers: Vec<String> = side.logs.iter().flat_map(Sink::headers).collect();
    headers.sort();
    headers.dedup();
    side.log_headers = headers;
    side
}

/// What the sidecar's flags configure, for both sides: spans to the `--otlp-endpoint`
/// collector, access logs to standard output in the `--access-log` format and, with OTLP,
/// as log records.
pub fn from_flags(
    format: isthmus_core::otlp::AccessLogFormat,
    otlp: Option<&isthmus_core::otlp::Otlp>,
    dropped: &Counter,
) -> std::io::Result<Active> {
    use isthmus_core::otlp::AccessLogFormat;
    let stdout = match format {
        AccessLogFormat::Off => None,
        _ => Some(crate::access_log::writer("/dev/stdout")?),
    };
    let side = || Side {
        tracing: otlp.map(|o| Tracing {
            tracer: o.traces.tracer("isthmus-sidecar"),
            tags: Vec::new(),
            max_tag_length: DEFAULT_MAX_TAG_LENGTH,
        }),
        logs: stdout
            .iter()
            .map(|tx| {
                let style = match format {
                    AccessLogFormat::Json => Style::Json,
                    _ => Style::Envoy,
                };
                Sink::lines(tx.clone(), style, dropped.clone(), None)
            })
            .chain(otlp.map(|o| Sink::otlp(o.logs.logger("isthmus-sidecar"), None)))
            .collect(),
        log_headers: Vec::new(),
    };
    Ok(Active {
        client: side(),
        server: side(),
    })
}

/// Keeps the telemetry in force in step with the workload's policy, for as long as the
/// mesh state is published.
pub async fn follow(
    mut state: watch::Receiver<Arc<MeshState>>,
    telemetry: Arc<Telemetry>,
    mut builder: Builder,
) {
    let mut current: Option<Arc<xds::TelemetryPolicy>> = None;
    loop {
        let policy = state.borrow_and_update().telemetry.clone();
        if policy != current {
            let active = match &policy {
                Some(p) => Arc::new(builder.build(p)),
                None => {
                    builder.close_unused(&Used::default());
                    builder.flags.clone()
                }
            };
            telemetry.replace(active);
            telemetry.metrics.shape(
                policy
                    .as_ref()
                    .map(|p| (p.client_metrics.as_ref(), p.server_metrics.as_ref())),
            );
            tracing::info!(configured = policy.is_some(), "telemetry policy applied");
            current = policy;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// The telemetry in force, for `/config_dump`: from the mesh's config (its providers per
/// side), or the flags.
pub fn dump(policy: Option<&xds::TelemetryPolicy>) -> serde_json::Value {
    let Some(p) = policy else {
        return serde_json::json!({"from": "flags"});
    };
    let tracing = |t: Option<&xds::TracingPolicy>| {
        t.and_then(|t| {
            let c = t.collector.as_ref()?;
            Some(serde_json::json!({
                "provider": c.provider,
                "endpoint": c.endpoint,
                "sampling_percent": t.sampling_percent,
                "reporting": !t.disable_reporting,
                "custom_tags": t.custom_tags.iter().map(|t| &t.name).collect::<Vec<_>>(),
            }))
        })
    };
    let logs = |sinks: &[xds::AccessLogSink]| {
        sinks
            .iter()
            .map(|s| serde_json::json!({"provider": s.provider, "filter": s.filter}))
            .collect::<Vec<_>>()
    };
    let metrics = |m: Option<&xds::MetricsPolicy>| {
        m.map(|m| {
            serde_json::json!({
                "disabled": m.disabled,
                "removed_tags": m.removed_tags.iter().map(|r| format!("{}:{}", r.metric, r.tag)).collect::<Vec<_>>(),
            })
        })
    };
    serde_json::json!({
        "from": "mesh config",
        "client": {
            "tracing": tracing(p.client_tracing.as_ref()),
            "access_logs": logs(&p.client_access_logs),
            "metrics": metrics(p.client_metrics.as_ref()),
        },
        "server": {
            "tracing": tracing(p.server_tracing.as_ref()),
            "access_logs": logs(&p.server_access_logs),
            "metrics": metrics(p.server_metrics.as_ref()),
        },
    })
}
