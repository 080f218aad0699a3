//! Header names the proxies set and strip.

/// Who called, as the inbound sidecar tells the app (Envoy's format:
/// `By=<own SPIFFE ID>;URI=<caller SPIFFE ID>`). Stripped from what apps send.
pub const XFCC: &str = "x-forwarded-client-cert";
/// Reason of an error the proxy made itself, on the response.
pub const ERROR_REASON: &str = "x-isthmus-error";
/// Which cluster answered, on responses that crossed the mesh.
pub const UPSTREAM_CLUSTER: &str = "x-isthmus-upstream-cluster";
/// Subset labels (`k=v,k2=v2`) the destination endpoint of a gateway tunnel must carry.
pub const SUBSET: &str = "x-isthmus-subset";
/// Target cluster of a CONNECT to the gateway.
pub const TARGET_CLUSTER: &str = "x-isthmus-cluster";
/// Protocol the inbound sidecar must speak to its app (`http` or `http2`).
pub const APP_PROTOCOL: &str = "x-isthmus-app-protocol";
/// Name of the VirtualService route a request matched at the calling sidecar, for
/// route-scoped rate limits at the receiving one.
pub const ROUTE: &str = "x-isthmus-route";
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
pub fn strip_untrusted_keeping(headers: &mut http::HeaderMap, keep: &[&str]) {
    headers.remove(XFCC);
    let internal: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(INTERNAL_PREFIX) && !keep.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in internal {
        headers.remove(k);
    }
}

/// Removes hop-by-hop headers before a request or response is forwarded.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    if let Some(conn) = headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in conn.split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|v| v != "trailers")
    {
        headers.remove(http::header::TE);
    }
}
