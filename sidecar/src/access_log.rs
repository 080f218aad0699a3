//! Access logs: one line per request in Envoy's default format as Istio configures it
//! (`--access-log text`), or as JSON with Istio's field names (`--access-log json`), to
//! standard output; and, with OTLP on, as an OpenTelemetry log record (the text line as
//! its body, every field as an attribute).
//!
//! Lines go to standard output through a bounded queue and a writer task, so a slow
//! reader of the sidecar's output never holds up a request; when the queue is full, lines
//! are dropped and counted (`isthmus_sidecar_access_log_dropped_total`).

use std::time::SystemTime;

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use isthmus_core::otlp::AccessLogFormat;

use crate::metrics::Reporter;
use crate::telemetry::Outcome;

/// Lines waiting for standard output.
const QUEUE: usize = 4096;

/// Longest request text (path, user agent, ...) kept in a line.
const MAX_FIELD: usize = 2048;

/// Where access logs go.
pub struct AccessLog {
    format: AccessLogFormat,
    stdout: Option<mpsc::Sender<String>>,
    otlp: Option<opentelemetry_sdk::logs::SdkLogger>,
    dropped: Counter,
}

/// What a request was, read as it arrived.
pub struct Request {
    start: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    user_agent: String,
    request_id: String,
    forwarded_for: String,
}

fn header(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "-".to_owned(), bounded)
}

fn bounded(s: &str) -> String {
    match s.char_indices().nth(MAX_FIELD) {
        Some((cut, _)) => s[..cut].to_owned(),
        None => s.to_owned(),
    }
}

impl Request {
    pub fn of<B>(req: &http::Request<B>) -> Self {
        let head = req.headers();
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| header(head, "host"));
        Self {
            start: SystemTime::now(),
            method: req.method().as_str().to_owned(),
            path: bounded(req.uri().path_and_query().map_or("/", |p| p.as_str())),
            protocol: match req.version() {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2",
                _ => "HTTP/1.1",
            },
            authority: bounded(&authority),
            user_agent: header(head, "user-agent"),
            request_id: header(head, "x-request-id"),
            forwarded_for: header(head, "x-forwarded-for"),
        }
    }
}

impl AccessLog {
    /// Starts the standard output writer (unless `format` is off) and takes OTLP's
    /// logger. `None` when neither is wanted.
    pub fn new(
        format: AccessLogFormat,
        otlp: Option<&isthmus_core::otlp::Otlp>,
        dropped: Counter,
    ) -> Option<Self> {
        let stdout = (format != AccessLogFormat::Off).then(|| {
            let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
            tokio::spawn(async move {
                let mut out = tokio::io::stdout();
                while let Some(line) = rx.recv().await {
                    if out.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
            tx
        });
        let otlp = otlp.map(|o| o.logs.logger("isthmus-sidecar"));
        (stdout.is_some() || otlp.is_some()).then_some(Self {
            format,
            stdout,
            otlp,
            dropped,
        })
    }

    pub fn write(&self, req: &Request, outcome: &Outcome<'_>) {
        let fields = fields(req, outcome);
        let text = text_line(&fields);
        if let Some(tx) = &self.stdout {
            let line = match self.format {
                AccessLogFormat::Json => json_line(&fields),
                _ => text.clone(),
            };
            if tx.try_send(line).is_err() {
                self.dropped.inc();
            }
        }
        if let Some(logger) = &self.otlp {
            let mut record = logger.create_log_record();
            record.set_timestamp(req.start);
            record.set_observed_timestamp(SystemTime::now());
            record.set_severity_number(Severity::Info);
            record.set_severity_text("INFO");
            record.set_event_name("access_log");
            record.set_body(AnyValue::from(text.trim_end().to_owned()));
            if let Some(t) = outcome.trace.as_ref().filter(|t| t.is_valid()) {
                record.set_trace_context(t.trace_id(), t.span_id(), Some(t.trace_flags()));
            }
            for (k, v) in &fields {
                record.add_attribute(*k, v.clone());
            }
            logger.emit(record);
        }
    }
}

/// Istio's access log fields, in its JSON names and text order.
fn fields(req: &Request, o: &Outcome<'_>) -> Vec<(&'static str, String)> {
    let s = o.series;
    let port = req
        .authority
        .rsplit_once(':')
        .map_or("", |(_, p)| p)
        .to_owned();
    let upstream_cluster = match s.reporter {
        Reporter::Source => format!("outbound|{port}||{}", s.service.host),
        Reporter::Destination => format!("inbound|{port}||"),
    };
    let start = time::OffsetDateTime::from(req.start);
    let start = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        start.year(),
        u8::from(start.month()),
        start.day(),
        start.hour(),
        start.minute(),
        start.second(),
        start.millisecond()
    );
    vec![
        ("start_time", start),
        ("method", req.method.clone()),
        ("path", req.path.clone()),
        ("protocol", req.protocol.to_owned()),
        ("response_code", o.code.to_string()),
        ("response_flags", o.flags.to_owned()),
        ("bytes_received", o.received.to_string()),
        ("bytes_sent", o.sent.to_string()),
        ("duration", o.duration.as_millis().to_string()),
        ("x_forwarded_for", req.forwarded_for.clone()),
        ("user_agent", req.user_agent.clone()),
        ("request_id", req.request_id.clone()),
        ("authority", req.authority.clone()),
        ("upstream_cluster", upstream_cluster),
        ("source_workload", s.source.name.to_string()),
        ("source_namespace", s.source.namespace.to_string()),
        ("source_cluster", s.source.cluster.to_string()),
        ("destination_workload", s.destination.name.to_string()),
        ("destination_namespace", s.destination.namespace.to_string()),
        ("destination_service", s.service.host.to_string()),
        (
            "grpc_status",
            o.grpc_status
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
        ),
    ]
}

/// Envoy's default format: `[start] "METHOD path PROTOCOL" code flags ... bytes duration
/// ... "x-forwarded-for" "user-agent" "x-request-id" "authority" ...`.
fn text_line(f: &[(&'static str, String)]) -> String {
    let get = |k: &str| {
        f.iter()
            .find(|(n, _)| *n == k)
            .map_or("-", |(_, v)| v.as_str())
    };
    format!(
        "[{}] \"{} {} {}\" {} {} - - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"-\" {} - - - - - source={}/{} destination={}/{} destination_service={}\n",
        get("start_time"),
        get("method"),
        get("path"),
        get("protocol"),
        get("response_code"),
        get("response_flags"),
        get("bytes_received"),
        get("bytes_sent"),
        get("duration"),
        get("x_forwarded_for"),
        get("user_agent"),
        get("request_id"),
        get("authority"),
        get("upstream_cluster"),
        get("source_namespace"),
        get("source_workload"),
        get("destination_namespace"),
        get("destination_workload"),
        get("destination_service"),
    )
}

fn json_line(f: &[(&'static str, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = f
        .iter()
        .map(|(k, v)| {
            let value = match v.parse::<u64>() {
                Ok(n) if !matches!(*k, "request_id" | "path" | "authority") => n.into(),
                _ => v.clone().into(),
            };
            ((*k).to_owned(), value)
        })
        .collect();
    let mut line = serde_json::Value::Object(map).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{DestinationService, Series};
    use crate::peer::Workloads;

    fn outcome_line(json: bool) -> String {
        let mut req = http::Request::get("http://echo.demo:80/a?b=1")
            .header("user-agent", "curl/8")
            .header("x-request-id", "r1")
            .body(())
            .expect("request");
        *req.version_mut() = http::Version::HTTP_11;
        let request = Request::of(&req);
        let series = Series {
            reporter: Reporter::Source,
            source: Workloads::unknown(),
            destination: Workloads::unknown(),
            service: DestinationService::new("echo.demo.svc.cluster.local".into(), "echo", "demo"),
            destination_cluster: "west".into(),
            protocol: "http",
            mutual_tls: None,
        };
        let outcome = Outcome {
            trace: None,
            series: &series,
            code: 503,
            grpc_status: None,
            flags: "UH",
            duration: std::time::Duration::from_millis(12),
            received: 80,
            sent: 120,
        };
        let f = fields(&request, &outcome);
        if json {
            json_line(&f)
        } else {
            text_line(&f)
        }
    }

    #[test]
    fn text_lines_read_like_envoys() {
        let line = outcome_line(false);
        assert!(line.starts_with('['), "{line}");
        assert!(
            line.contains("] \"GET /a?b=1 HTTP/1.1\" 503 UH - - \"-\" 80 120 12 - \"-\" \"curl/8\" \"r1\" \"echo.demo:80\" \"-\" outbound|80||echo.demo.svc.cluster.local "),
            "{line}"
        );
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn json_lines_carry_istios_field_names() {
        let line = outcome_line(true);
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UH");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["request_id"], "r1");
        assert_eq!(
            v["upstream_cluster"],
            "outbound|80||echo.demo.svc.cluster.local"
        );
        assert_eq!(v["duration"], 12);
    }
}
