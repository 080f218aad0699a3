//! Envoy's access log format strings (`%RESPONSE_CODE% "%REQ(:PATH)%"`), as Istio's
//! `envoyFileAccessLog.logFormat` writes them: `text` is one format string, `labels` a
//! JSON object whose values are format strings.
//!
//! Command operators Isthmus knows the value of are filled in; those Envoy has and
//! Isthmus does not track (`%UPSTREAM_LOCAL_ADDRESS%`, ...) write `-`, as Envoy does for a
//! value it does not have; any other is refused when the format is checked.

use std::borrow::Cow;

/// A value a format reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    StartTime,
    Protocol,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamCluster,
    GrpcStatus,
    TraceId,
    SourcePrincipal,
    /// `REQ(a?b)`: request header `a`, else `b` (`:path`, `:method`, `:authority` too),
    /// lower-case.
    Request(String, Option<String>),
    /// Known to Envoy, not tracked here: `-`.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Field, Option<usize>),
}

/// A checked format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format(Vec<Piece>);

/// What a format reads its values from.
pub trait Values {
    fn value(&self, field: &Field) -> Cow<'_, str>;
}

/// Checks `text`.
pub fn check(text: &str) -> Result<(), String> {
    Format::parse(text).map(|_| ())
}

const NOT_TRACKED: [&str; 18] = [
    "RESPONSE_CODE_DETAILS",
    "CONNECTION_TERMINATION_DETAILS",
    "UPSTREAM_HOST",
    "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
    "UPSTREAM_SERVICE_TIME",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "REQUESTED_SERVER_NAME",
    "ROUTE_NAME",
    "UPSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_LOCAL_URI_SAN",
    "RESP",
    "DYNAMIC_METADATA",
    "FILTER_STATE",
];

impl Format {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 1..];
            let end = after
                .find('%')
                .ok_or_else(|| format!("`%` at `{}` is not closed", &rest[start..]))?;
            let op = &after[..end];
            rest = &after[end + 1..];
            if op.is_empty() {
                pieces.push(Piece::Text("%".into())); // `%%` is a literal `%`
                continue;
            }
            pieces.push(operator(op)?);
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Self(pieces))
    }

    /// The request headers it reads (lower-case), to keep them when a request arrives.
    pub fn headers(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|p| match p {
            Piece::Field(Field::Request(a, b), _) => {
                [Some(a.as_str()), b.as_deref()].into_iter().flatten()
            }
            _ => [None, None].into_iter().flatten(),
        })
    }

    pub fn write(&self, v: &dyn Values) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f, max) => {
                    let value = v.value(f);
                    match max.and_then(|m| value.char_indices().nth(m)) {
                        Some((cut, _)) => out.push_str(&value[..cut]),
                        None => out.push_str(&value),
                    }
                }
            }
        }
        out
    }
}

fn operator(op: &str) -> Result<Piece, String> {
    // `NAME(args):max`
    let (head, max) = match op.rsplit_once(':') {
        Some((h, m))
            if !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with('?') =>
        {
            (h, m.parse().ok())
        }
        _ => (op, None),
    };
    let (name, args) = match head.split_once('(') {
        Some((n, a)) => (
            n,
            Some(
                a.strip_suffix(')')
                    .ok_or_else(|| format!("`%{op}%`: `(` is not closed"))?,
            ),
        ),
        None => (head, None),
    };
    let field = match (name, args) {
        ("START_TIME", _) => Field::StartTime,
        ("PROTOCOL", None) => Field::Protocol,
        ("RESPONSE_CODE", None) => Field::ResponseCode,
        ("RESPONSE_FLAGS", None) => Field::ResponseFlags,
        ("BYTES_RECEIVED", None) => Field::BytesReceived,
        ("BYTES_SENT", None) => Field::BytesSent,
        ("DURATION", None) => Field::Duration,
        ("UPSTREAM_CLUSTER", None) => Field::UpstreamCluster,
        ("GRPC_STATUS" | "GRPC_STATUS_NUMBER", None) => Field::GrpcStatus,
        ("TRACE_ID", None) => Field::TraceId,
        ("DOWNSTREAM_PEER_URI_SAN", None) => Field::SourcePrincipal,
        ("REQ", Some(a)) => {
            let (first, alt) = match a.split_once('?') {
                Some((x, y)) => (x, Some(y)),
                None => (a, None),
            };
            let header = |h: &str| {
                let h = h.to_ascii_lowercase();
                let bare = h.strip_prefix(':').unwrap_or(&h);
                if bare.is_empty() || http::HeaderName::from_bytes(bare.as_bytes()).is_err() {
                    Err(format!("`%{op}%`: `{h}` is not a header name"))
                } else {
                    Ok(h)
                }
            };
            Field::Request(header(first)?, alt.map(header).transpose()?)
        }
        (n, _) if NOT_TRACKED.contains(&n) => Field::Unknown,
        _ => {
            return Err(format!(
                "`%{op}%` is not a command operator Isthmus supports (START_TIME, REQ(...), \
                 RESPONSE_CODE, RESPONSE_FLAGS, BYTES_RECEIVED, BYTES_SENT, DURATION, PROTOCOL, \
                 UPSTREAM_CLUSTER, GRPC_STATUS, TRACE_ID, ...)"
            ))
        }
    };
    Ok(Piece::Field(field, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct V;
    impl Values for V {
        fn value(&self, f: &Field) -> Cow<'_, str> {
            match f {
                Field::ResponseCode => "503".into(),
                Field::Request(h, _) if h == ":path" => "/a/very/long/path".into(),
                Field::Request(h, Some(alt)) if h == "x-envoy-original-path" => {
                    format!("alt:{alt}").into()
                }
                _ => "-".into(),
            }
        }
    }

    #[test]
    fn envoy_formats_write_what_they_name() {
        let f = Format::parse("%RESPONSE_CODE% \"%REQ(:PATH):7%\" %UPSTREAM_HOST% 100%% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\n")
            .expect("valid");
        assert_eq!(f.write(&V), "503 \"/a/very\" - 100% alt::path\n");
        assert_eq!(
            f.headers().collect::<Vec<_>>(),
            [":path", "x-envoy-original-path", ":path"]
        );
    }

    #[test]
    fn unknown_operators_are_refused_by_name() {
        for (text, says) in [
            ("%NOPE%", "`%NOPE%` is not a command operator"),
            ("%RESPONSE_CODE", "not closed"),
            ("%REQ(:PATH%", "`(` is not closed"),
            ("%REQ(bad header)%", "not a header name"),
        ] {
            let e = Format::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
