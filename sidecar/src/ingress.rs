//! What a request must be to enter the mesh. The outbound listener is where an app's
//! requests enter, so it is where one request's fault is stopped before it can reach the
//! shared connections between proxies: header limits (Envoy's defaults, 60 KiB and 100
//! headers) answer `431`, an unroutable target (`*`) or a second `Host` answers `400`, and
//! the path is normalized as Istio's `pathNormalization` says, so routes (and policies)
//! match what the app will receive.

use std::time::Duration;

use http::request::Parts;
use http::Uri;
use isthmus_core::path::{normalize_target, Normalization};

use crate::errors::ProxyError;

/// Limits and timeouts of the sidecar's listeners, with Envoy's defaults where it has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sum of header name and value bytes of a request (Envoy's `max_request_headers_kb`).
    pub max_header_bytes: usize,
    /// Header fields of a request (Envoy's `max_headers_count`).
    pub max_headers: usize,
    /// Time for an HTTP/1.1 client to send a whole request head; on HTTP/1.1 it also bounds
    /// how long a kept-alive connection may sit idle between requests.
    pub request_headers_timeout: Duration,
    /// Longest silence within one request or response body (Envoy's stream idle timeout).
    pub stream_idle_timeout: Duration,
    /// An app's connection with no request in progress for this long is closed (Envoy's
    /// `idle_timeout`).
    pub idle_timeout: Duration,
    /// Pooled connections to peers with no request for this long are closed
    /// (a DestinationRule's `idleTimeout` overrides it).
    pub upstream_idle_timeout: Duration,
    pub path_normalization: Normalization,
    /// Upgrade tokens carried through the mesh (`websocket`); `h2c` is always served as
    /// plain HTTP/1.1, any other token is refused with 403.
    pub upgrades: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            request_headers_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(3600),
            upstream_idle_timeout: Duration::from_secs(3600),
            path_normalization: Normalization::Base,
            upgrades: vec!["websocket".into()],
        }
    }
}

impl Limits {
    /// The header list an app's HTTP/2 connection may send: the limit plus the per-field
    /// overhead HTTP/2 counts, so the limit itself is judged (and answered) per request.
    pub fn h2_header_list(&self) -> u32 {
        (self.max_header_bytes + 32 * self.max_headers) as u32
    }

    /// Refuses what cannot enter the mesh and normalizes the path in place.
    pub fn admit(&self, parts: &mut Parts) -> Result<(), ProxyError> {
        self.check_headers(&parts.headers)?;
        let hosts = parts.headers.get_all(http::header::HOST).iter().count();
        if hosts > 1 {
            return Err(ProxyError::InvalidRequest(format!(
                "{hosts} Host headers; a request has one"
            )));
        }
        if parts.version == http::Version::HTTP_2 {
            if let (Some(a), Some(h)) =
                (parts.uri.authority(), parts.headers.get(http::header::HOST))
            {
                if a.as_str().as_bytes() != h.as_bytes() {
                    return Err(ProxyError::InvalidRequest(
                        ":authority and Host disagree".into(),
                    ));
                }
            }
        }
        if parts.method == http::Method::CONNECT {
            return Ok(());
        }
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if target == "*" {
            return Err(ProxyError::InvalidRequest(
                "the request target `*` names no resource to route".into(),
            ));
        }
        let normalized = normalize_target(target, self.path_normalization)
            .map_err(|e| ProxyError::InvalidRequest(format!("path `{target}`: {e}")))?;
        if let Some(path) = normalized {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.path_and_query = Some(
                path.parse()
                    .map_err(|_| ProxyError::InvalidRequest(format!("path `{path}`")))?,
            );
            parts.uri = Uri::from_parts(uri)
                .map_err(|e| ProxyError::InvalidRequest(format!("path `{path}`: {e}")))?;
        }
        Ok(())
    }

    /// Header count and bytes of a request (or, at the inbound side, an app's response).
    pub fn check_headers(&self, headers: &http::HeaderMap) -> Result<(), ProxyError> {
        if headers.len() > self.max_headers {
            return Err(ProxyError::HeadersTooLarge(format!(
                "{} header fields, at most {}",
                headers.len(),
                self.max_headers
            )));
        }
        let bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        if bytes > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge(format!(
                "{bytes} bytes of headers, at most {}",
                self.max_header_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn oversized_and_numerous_headers_are_refused_with_431() {
        let limits = Limits::default();
        let mut big = parts(
            http::Request::get("/")
                .header("x-big", "a".repeat(61 * 1024))
                .body(())
                .expect("request"),
        );
        let err = limits.admit(&mut big).expect_err("too large");
        assert_eq!(err.status(), 431);
        let mut many = http::Request::get("/");
        for i in 0..101 {
            many = many.header(format!("x-h{i}"), "v");
        }
        let err = limits
            .admit(&mut parts(many.body(()).expect("request")))
            .expect_err("too many");
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn the_path_is_normalized_in_place_and_the_query_kept() {
        let mut p = parts(
            http::Request::get("http://echo/x/%2e%2e/admin?q=/../x")
                .body(())
                .expect("request"),
        );
        Limits::default().admit(&mut p).expect("admitted");
        assert_eq!(p.uri.to_string(), "http://echo/admin?q=/../x");
    }

    #[test]
    fn asterisk_targets_and_duplicate_hosts_answer_400() {
        let limits = Limits::default();
        let mut star = parts(http::Request::options("*").body(()).expect("request"));
        assert_eq!(limits.admit(&mut star).expect_err("*").status(), 400);
        let mut two = parts(
            http::Request::get("/")
                .header("host", "a")
                .header("host", "b")
                .body(())
                .expect("request"),
        );
        assert_eq!(limits.admit(&mut two).expect_err("hosts").status(), 400);
    }
}
