//! Errors the sidecar answers itself. Each maps to one reason, used as the response's
//! `x-isthmus-error` header, the metrics label and the log field; gRPC callers get the
//! matching `grpc-status` instead of an HTTP error.

use http::{HeaderValue, Response, StatusCode};
use isthmus_core::headers::ERROR_REASON;

use isthmus_core::routing::Abort;

use crate::pool::{ConnectError, ProxyBody};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no mesh service is named {host}")]
    NoRoute { host: String },
    #[error("request has no host")]
    NoHost,
    #[error("no healthy endpoint for {service}")]
    NoHealthyUpstream { service: String },
    #[error("cannot reach {service}: {source}")]
    UpstreamConnect {
        service: String,
        #[source]
        source: ConnectError,
    },
    #[error("{service} reset the request: {source}")]
    UpstreamReset {
        service: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the application is not reachable: {0}")]
    AppUnavailable(String),
    #[error("the application reset the request: {0}")]
    AppReset(String),
    #[error("the application did not accept a connection in time: {0}")]
    AppConnectTimeout(String),
    #[error("this workload accepts no tunnel to that port")]
    TunnelUnsupported,
    #[error("the request body did not arrive whole: {0}")]
    RequestBody(String),
    #[error("the client sent no request body data for {0:?}")]
    RequestBodyTimeout(std::time::Duration),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("request headers too large: {0}")]
    HeadersTooLarge(String),
    #[error("upgrade to `{0}` is not allowed")]
    UpgradeRefused(String),
    #[error("the application's response headers are too large: {0}")]
    ResponseHeadersTooLarge(String),
    #[error("aborted by a fault injection rule")]
    FaultAbort(isthmus_core::routing::Abort),
    #[error("{service} did not answer within the route timeout")]
    Timeout { service: String },
    #[error("{service} has too many requests in flight (connectionPool limits)")]
    Overflow { service: String },
    #[error("rate limited; retry after {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    /// An AuthorizationPolicy denied it (Istio's answer, word for word).
    #[error("RBAC: access denied")]
    Forbidden,
    /// A RequestAuthentication refused the request's token (Envoy's answer).
    #[error("Jwt verification fails")]
    Unauthenticated(String),
    /// An external authorization provider takes the body, and this one is larger than it
    /// takes (without `allowPartialMessage`).
    #[error("the request body is larger than the {0} bytes external authorization takes")]
    PayloadTooLarge(usize),
    /// A WasmPlugin with `failStrategy: FAIL_CLOSE` could not be loaded or trapped; what
    /// went wrong is in the sidecar's log and config dump, not told to the caller.
    #[error("WasmPlugin {0} failed")]
    PluginFailed(String),
}

impl ProxyError {
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } | ProxyError::NoHost => "no-route",
            ProxyError::NoHealthyUpstream { .. } => "no-healthy-upstream",
            ProxyError::UpstreamConnect { .. } => "upstream-connect-failure",
            ProxyError::UpstreamReset { .. } => "upstream-reset",
            ProxyError::AppUnavailable(_) => "app-unavailable",
            ProxyError::AppReset(_) => "app-reset",
            ProxyError::AppConnectTimeout(_) => "app-connect-timeout",
            ProxyError::TunnelUnsupported => "tunnel-unsupported",
            ProxyError::RequestBody(_) => "downstream-body",
            ProxyError::RequestBodyTimeout(_) => "downstream-timeout",
            ProxyError::InvalidRequest(_) => "invalid-request",
            ProxyError::HeadersTooLarge(_) => "request-headers-too-large",
            ProxyError::UpgradeRefused(_) => "upgrade-refused",
            ProxyError::ResponseHeadersTooLarge(_) => "response-headers-too-large",
            ProxyError::FaultAbort(_) => "fault-abort",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::Forbidden => "rbac-denied",
            ProxyError::Unauthenticated(_) => "jwt-refused",
            ProxyError::PayloadTooLarge(_) => "payload-too-large",
            ProxyError::PluginFailed(_) => "wasm-plugin-failed",
        }
    }

    /// Whether the caller, not the destination, caused the error: such errors never count
    /// against an endpoint's health.
    pub fn downstream(&self) -> bool {
        matches!(
            self,
            ProxyError::NoHost
                | ProxyError::RequestBody(_)
                | ProxyError::RequestBodyTimeout(_)
                | ProxyError::InvalidRequest(_)
                | ProxyError::HeadersTooLarge(_)
                | ProxyError::UpgradeRefused(_)
                | ProxyError::PayloadTooLarge(_)
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoHost | ProxyError::RequestBody(_) | ProxyError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UpgradeRefused(_) => StatusCode::FORBIDDEN,
            ProxyError::ResponseHeadersTooLarge(_) => StatusCode::BAD_GATEWAY,
            ProxyError::NoHealthyUpstream { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::AppUnavailable(_)
            | ProxyError::AppConnectTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamReset { .. } | ProxyError::AppReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TunnelUnsupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::FaultAbort(Abort::Http(code)) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::FaultAbort(Abort::Grpc(_)) => StatusCode::OK,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::PluginFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code for gRPC callers.
    fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::NoRoute { .. } => 12, // UNIMPLEMENTED
            ProxyError::NoHost
            | ProxyError::RequestBody(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::HeadersTooLarge(_) => 3, // INVALID_ARGUMENT
            ProxyError::RequestBodyTimeout(_) => 4, // DEADLINE_EXCEEDED
            ProxyError::UpgradeRefused(_) | ProxyError::Forbidden => 7, // PERMISSION_DENIED
            ProxyError::TunnelUnsupported => 12,
            ProxyError::FaultAbort(Abort::Grpc(code)) => *code,
            ProxyError::Timeout { .. } => 4,     // DEADLINE_EXCEEDED
            ProxyError::RateLimited { .. } => 8, // RESOURCE_EXHAUSTED
            ProxyError::Unauthenticated(_) => 16, // UNAUTHENTICATED
            ProxyError::PayloadTooLarge(_) => 8, // RESOURCE_EXHAUSTED
            _ => 14,                             // UNAVAILABLE
        }
    }

    /// The response the caller gets.
    pub fn respond(&self, grpc: bool) -> Response<ProxyBody> {
        let message = self.to_string();
        // A gRPC-status abort answers as gRPC whatever the caller sent.
        let grpc = grpc || matches!(self, ProxyError::FaultAbort(Abort::Grpc(_)));
        let mut resp = if grpc {
            let mut r = Response::new(crate::pool::empty_body());
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_status())),
            );
            if let Ok(v) = HeaderValue::from_str(&message.replace(['\r', '\n'], " ")) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(crate::body::full(format!("{message}\n")));
            *r.status_mut() = self.status();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/plain"));
            r
        };
        resp.headers_mut()
            .insert(ERROR_REASON, HeaderValue::from_static(self.reason()));
        if let ProxyError::RateLimited { retry_after } = self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}
