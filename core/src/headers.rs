//! Header names the proxies set and strip.

use http::HeaderName;

/// Who called, as the inbound sidecar tells the app (Envoy's format:
/// `By=<own SPIFFE ID>;URI=<caller SPIFFE ID>`). Stripped from what apps send.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// Reason of an error the proxy made itself, on the response.
pub const ERROR_REASON: HeaderName = HeaderName::from_static("x-isthmus-error");
/// Which cluster answered, on responses that crossed the mesh.
pub const UPSTREAM_CLUSTER: HeaderName = HeaderName::from_static("x-isthmus-upstream-cluster");
/// Subset labels (`k=v,k2=v2`) the destination endpoint of a gateway tunnel must carry.
pub const SUBSET: HeaderName = HeaderName::from_static("x-isthmus-subset");
/// The one endpoint (its DNS label under a headless service) a gateway tunnel must reach.
pub const ENDPOINT: HeaderName = HeaderName::from_static("x-isthmus-endpoint");
/// Target cluster of a CONNECT to the gateway.
pub const TARGET_CLUSTER: HeaderName = HeaderName::from_static("x-isthmus-cluster");
/// Protocol the inbound sidecar must speak to its app (`http` or `http2`).
pub const APP_PROTOCOL: HeaderName = HeaderName::from_static("x-isthmus-app-protocol");
/// Name of the VirtualService route a request matched at the calling sidecar, for
/// route-scoped rate limits at the receiving one.
pub const ROUTE: HeaderName = HeaderName::from_static("x-isthmus-route");
/// gRPC's status trailer (or header, in a trailers-only response).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// A gRPC caller's deadline.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The settings of an `h2c` upgrade, hop-by-hop.
pub const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
/// Prefix of every internal header; all are stripped from what apps send.
pub const INTERNAL_PREFIX: &str = "x-isthmus-";

/// HTTP/2 header lists accepted between proxies: room for any request a sidecar's outbound
/// listener admits (60 KiB by default) plus the proxies' own headers, so an admitted
/// request can never break the connection it shares with others.
pub const PEER_MAX_HEADER_LIST: u32 = 128 * 1024;
/// Streams a peer may reset before the server has accepted them. Between proxies one
/// connection carries many apps' requests, and a burst of client cancellations is not an
/// attack by the peer; app-facing listeners keep h2's default guard against rapid reset.
pub const PEER_MAX_PENDING_RESETS: usize = 4096;

/// Removes headers an app must not be able to set.
pub fn strip_untrusted(headers: &mut http::HeaderMap) {
    strip_untrusted_keeping(headers, &[]);
}

/// Like [`strip_untrusted`], keeping the internal headers named in `keep`: the signals a
/// peer proxy (which stripped its own app's) passes on.
pub fn strip_untrusted_keeping(headers: &mut http::HeaderMap, keep: &[HeaderName]) {
    let untrusted = |k: &HeaderName| {
        *k == XFCC || (k.as_str().starts_with(INTERNAL_PREFIX) && !keep.contains(k))
    };
    // One pass over the names; nothing is allocated unless there is something to remove.
    if !headers.keys().any(untrusted) {
        return;
    }
    let found: Vec<HeaderName> = headers.keys().filter(|k| untrusted(k)).cloned().collect();
    for k in found {
        headers.remove(k);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded. `te` is kept when it is only
/// `trailers` (gRPC needs it).
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION, // first: `present & 1` below
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];

/// The gRPC status a header block carries (a response's trailers, or the headers of a
/// trailers-only response).
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Whether a header is the proxies' own (their signals, `x-forwarded-client-cert`) or
/// hop-by-hop: what a party outside the proxies (an authorization provider) must neither
/// see nor set.
pub fn is_proxy_owned(name: &HeaderName) -> bool {
    *name == XFCC
        || name.as_str().starts_with(INTERNAL_PREFIX)
        || *name == http::header::TE
        || HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers before a request or response is forwarded: those of
/// [`HOP_BY_HOP`], any `te` but `te: trailers`, and every header `connection` names.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // One pass over the names finds which are present (most messages carry none).
    let (mut present, mut te) = (0u8, false);
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
        te |= *k == http::header::TE;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::try_from(name.trim()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te
        && headers
            .get(http::header::TE)
            .is_some_and(|v| v != "trailers")
    {
        headers.remove(http::header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::try_from(*k).expect("a valid name"),
                HeaderValue::from_str(v).expect("a valid value"),
            );
        }
        m
    }

    fn names(m: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = m.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut m = map(&[
            ("connection", "keep-alive, x-private"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("x-other", "1"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["accept"]);
    }

    #[test]
    fn te_trailers_is_kept_and_a_clean_map_is_untouched() {
        let mut m = map(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut m);
        assert_eq!(names(&m), ["content-type", "te"]);
    }

    #[test]
    fn internal_headers_and_xfcc_are_stripped_unless_kept() {
        let pairs = [
            ("x-isthmus-error", "no-route"),
            ("x-isthmus-route", "r1"),
            ("x-forwarded-client-cert", "By=spiffe://evil"),
            ("x-isthmusnot", "kept: not the prefix"),
            ("host", "a"),
        ];
        let mut m = map(&pairs);
        strip_untrusted(&mut m);
        assert_eq!(names(&m), ["host", "x-isthmusnot"]);
        let mut m = map(&pairs);
        strip_untrusted_keeping(&mut m, &[ERROR_REASON]);
        assert_eq!(names(&m), ["host", "x-isthmus-error", "x-isthmusnot"]);
    }
}
