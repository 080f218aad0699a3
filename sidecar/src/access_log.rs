//! Access logs: one line per request, to each sink the workload's telemetry names: a file
//! (standard output by default) in Envoy's default format as Istio configures it, as JSON
//! with Istio's field names, or in a format of the provider's own (`logFormat`); and OTLP
//! log records (the default text line as the body, every field as an attribute, the
//! span's ids for correlation). Each sink may have a filter (a CEL expression,
//! `response.code >= 400`).
//!
//! Lines go to their file through a bounded queue and a writer task, so a slow reader of
//! the sidecar's output never holds up a request; when the queue is full, lines are
//! dropped and counted (`isthmus_sidecar_access_log_dropped_total`).

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, Severity};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use isthmus_core::access_format::{Field, Format, Values};
use isthmus_core::cel::{Attr, Attributes, Filter, Value};

use crate::metrics::Reporter;
use crate::telemetry::Outcome;

/// Lines waiting for their file.
const QUEUE: usize = 4096;

/// Longest request text (path, user agent, ...) kept in a line.
const MAX_FIELD: usize = 2048;

/// Request headers a log line has a field for.
const LOGGED_HEADERS: [&str; 3] = ["user-agent", "x-request-id", "x-forwarded-for"];

/// How a file's lines are written.
pub enum Style {
    /// Envoy's default format, as Istio configures it.
    Envoy,
    /// One JSON object per line, with Istio's field names.
    Json,
    /// A provider's `logFormat.text`.
    Text(Format),
    /// A provider's `logFormat.labels`: a JSON object of these fields.
    Labels(Vec<(String, Format)>),
}

enum Out {
    Lines {
        tx: mpsc::Sender<String>,
        style: Style,
        dropped: Counter,
    },
    Otlp(opentelemetry_sdk::logs::SdkLogger),
}

/// One place access logs go, and which requests it takes.
pub struct Sink {
    filter: Option<Filter>,
    out: Out,
}

impl Sink {
    /// Lines to a file's writer (see [`writer`]).
    pub fn lines(
        tx: mpsc::Sender<String>,
        style: Style,
        dropped: Counter,
        filter: Option<Filter>,
    ) -> Self {
        Self {
            filter,
            out: Out::Lines { tx, style, dropped },
        }
    }

    /// Records to an OTLP logger.
    pub fn otlp(logger: opentelemetry_sdk::logs::SdkLogger, filter: Option<Filter>) -> Self {
        Self {
            filter,
            out: Out::Otlp(logger),
        }
    }

    /// The request headers this sink reads beyond those every line has.
    pub fn headers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Out::Lines { style, .. } = &self.out {
            let formats: Vec<&Format> = match style {
                Style::Text(f) => vec![f],
                Style::Labels(l) => l.iter().map(|(_, f)| f).collect(),
                _ => Vec::new(),
            };
            out.extend(
                formats
                    .into_iter()
                    .flat_map(|f| f.headers())
                    .filter(|h| !h.starts_with(':'))
                    .map(str::to_owned),
            );
        }
        if let Some(f) = &self.filter {
            out.extend(f.headers().map(str::to_owned));
        }
        out
    }
}

/// A task writing lines to `path` (`/dev/stdout`, `/dev/stderr`, or a file appended to),
/// and the queue to it.
pub fn writer(path: &str) -> std::io::Result<mpsc::Sender<String>> {
    type Out = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
    let out: Out = match path {
        "/dev/stdout" => Box::new(tokio::io::stdout()),
        "/dev/stderr" => Box::new(tokio::io::stderr()),
        _ => Box::new(tokio::fs::File::from_std(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
    };
    let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
    // Not under the sidecar's drain: requests that finish while it drains are logged
    // too, and a task under the drain would hold its end until the deadline. It owns
    // nothing but its queue, and ends when the last sender is dropped.
    tokio::spawn(async move {
        let mut out = out;
        while let Some(line) = rx.recv().await {
            if out.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            // A file's writes are buffered by nothing else; standard output flushes itself.
            let _ = out.flush().await;
        }
    });
    Ok(tx)
}

/// What a request was, read as it arrived.
pub struct Request {
    start: SystemTime,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    scheme: &'static str,
    user_agent: String,
    request_id: String,
    forwarded_for: String,
    /// Further headers the sinks read, by lower-case name.
    headers: Vec<(String, String)>,
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
    /// The request as its log lines need it, keeping the headers in `more`.
    pub fn of<B>(req: &http::Request<B>, more: &[String]) -> Self {
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
            scheme: if req.uri().scheme_str() == Some("https") {
                "https"
            } else {
                "http"
            },
            user_agent: header(head, "user-agent"),
            request_id: header(head, "x-request-id"),
            forwarded_for: header(head, "x-forwarded-for"),
            headers: more
                .iter()
                .filter(|h| !LOGGED_HEADERS.contains(&h.as_str()))
                .filter_map(|h| {
                    let v = head.get(h.as_str())?.to_str().ok()?;
                    Some((h.clone(), bounded(v)))
                })
                .collect(),
        }
    }

    /// A request header's value, when it was kept.
    fn header(&self, name: &str) -> Option<&str> {
        let v = match name {
            ":path" => &self.path,
            ":method" => &self.method,
            ":authority" | "host" => &self.authority,
            ":scheme" => return Some(self.scheme),
            "user-agent" => &self.user_agent,
            "x-request-id" => &self.request_id,
            "x-forwarded-for" => &self.forwarded_for,
            _ => {
                return self
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            }
        };
        (v != "-").then_some(v.as_str())
    }
}

/// Writes one request to every sink whose filter takes it.
pub fn write(sinks: &[Sink], req: &Request, outcome: &Outcome<'_>) {
    let view = View { req, o: outcome };
    let mut fields: Option<Vec<(&'static str, String)>> = None;
    for sink in sinks {
        if sink.filter.as_ref().is_some_and(|f| !f.matches(&view)) {
            continue;
        }
        let fields = fields.get_or_insert_with(|| self::fields(req, outcome));
        match &sink.out {
            Out::Lines { tx, style, dropped } => {
                let line = match style {
                    Style::Envoy => text_line(fields),
                    Style::Json => json_line(fields),
                    Style::Text(f) => f.write(&view),
                    Style::Labels(labels) => {
                        let map: serde_json::Map<String, serde_json::Value> = labels
                            .iter()
                            .map(|(k, f)| (k.clone(), f.write(&view).into()))
                            .collect();
                        let mut line = serde_json::Value::Object(map).to_string();
                        line.push('\n');
                        line
                    }
                };
                if tx.try_send(line).is_err() {
                    dropped.inc();
                }
            }
            Out::Otlp(logger) => {
                let mut record = logger.create_log_record();
                record.set_timestamp(req.start);
                record.set_observed_timestamp(SystemTime::now());
                record.set_severity_number(Severity::Info);
                record.set_severity_text("INFO");
                record.set_event_name("access_log");
                record.set_body(AnyValue::from(text_line(fields).trim_end().to_owned()));
                if let Some(t) = outcome.trace.as_ref().filter(|t| t.is_valid()) {
                    record.set_trace_context(t.trace_id(), t.span_id(), Some(t.trace_flags()));
                }
                for (k, v) in fields.iter() {
                    record.add_attribute(*k, v.clone());
                }
                logger.emit(record);
            }
        }
    }
}

/// A finished request, as filters and formats read it.
struct View<'a> {
    req: &'a Request,
    o: &'a Outcome<'a>,
}

impl Attributes for View<'_> {
    fn get(&self, attr: &Attr) -> Value {
        let (r, o, s) = (self.req, self.o, self.o.series);
        let text = |v: &str| Value::Str(v.to_owned());
        match attr {
            Attr::ResponseCode => Value::Int(i64::from(o.code)),
            Attr::ResponseGrpcStatus => o
                .grpc_status
                .map_or(Value::Missing, |g| Value::Int(g.into())),
            Attr::ResponseFlags => text(o.flags),
            Attr::ResponseSize => Value::Int(o.sent as i64),
            Attr::RequestSize => Value::Int(o.received as i64),
            Attr::RequestDuration => Value::Duration(o.duration),
            Attr::RequestMethod => text(&r.method),
            Attr::RequestPath => text(&r.path),
            Attr::RequestUrlPath => text(r.path.split('?').next().unwrap_or("/")),
            Attr::RequestHost => text(&r.authority),
            Attr::RequestScheme => text(r.scheme),
            Attr::RequestProtocol => text(r.protocol),
            Attr::RequestId => r.header("x-request-id").map_or(Value::Missing, text),
            Attr::RequestUserAgent => r.header("user-agent").map_or(Value::Missing, text),
            Attr::RequestHeader(h) => r.header(h).map_or(Value::Missing, text),
            Attr::ConnectionMtls => s.mutual_tls.map_or(Value::Missing, Value::Bool),
            Attr::SourcePrincipal => text(&s.source.principal),
            Attr::SourceNamespace => text(&s.source.namespace),
            Attr::SourceWorkload => text(&s.source.name),
            Attr::DestinationService => text(&s.service.host),
            Attr::DestinationWorkload => text(&s.destination.name),
            Attr::DestinationNamespace => text(&s.destination.namespace),
        }
    }
}

impl Values for View<'_> {
    fn value(&self, field: &Field) -> Cow<'_, str> {
        let (r, o, s) = (self.req, self.o, self.o.series);
        match field {
            Field::StartTime => start_time(r.start).into(),
            Field::Protocol => r.protocol.into(),
            Field::ResponseCode => o.code.to_string().into(),
            Field::ResponseFlags => o.flags.into(),
            Field::BytesReceived => o.received.to_string().into(),
            Field::BytesSent => o.sent.to_string().into(),
            Field::Duration => o.duration.as_millis().to_string().into(),
            Field::UpstreamCluster => upstream_cluster(r, o).into(),
            Field::GrpcStatus => o
                .grpc_status
                .map_or(Cow::Borrowed("-"), |g| g.to_string().into()),
            Field::TraceId => o
                .trace
                .as_ref()
                .filter(|t| t.is_valid())
                .map_or(Cow::Borrowed("-"), |t| t.trace_id().to_string().into()),
            Field::SourcePrincipal => s.source.principal.to_string().into(),
            Field::Request(h, alt) => r
                .header(h)
                .or_else(|| alt.as_deref().and_then(|a| r.header(a)))
                .unwrap_or("-")
                .into(),
            Field::Unknown => "-".into(),
        }
    }
}

fn upstream_cluster(req: &Request, o: &Outcome<'_>) -> String {
    let port = req.authority.rsplit_once(':').map_or("", |(_, p)| p);
    match o.series.reporter {
        Reporter::Source => format!("outbound|{port}||{}", o.series.service.host),
        Reporter::Destination => format!("inbound|{port}||"),
    }
}

fn start_time(t: SystemTime) -> String {
    let start = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        start.year(),
        u8::from(start.month()),
        start.day(),
        start.hour(),
        start.minute(),
        start.second(),
        start.millisecond()
    )
}

/// Istio's access log fields, in its JSON names and text order.
fn fields(req: &Request, o: &Outcome<'_>) -> Vec<(&'static str, String)> {
    let s = o.series;
    let upstream_cluster = upstream_cluster(req, o);
    let start = start_time(req.start);
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
        let request = Request::of(&req, &[]);
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
