//! HTTP GET of small documents from outside the mesh, for the control plane: the keys of a
//! JWT issuer (`jwksUri`, OpenID discovery). Everything about the answer is untrusted, so
//! every fetch has a deadline for the whole exchange, a cap on the body, a bounded number
//! of redirects (never from `https` to `http`), and fails with an error that names the URL.
//!
//! HTTPS is verified against the system's trust store (as a browser would) plus roots the
//! operator adds, as Istio's `extra.pem` for its JWKS resolver.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::rt::{Read, Write};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Redirects followed before giving up (Go's client, which Istio's resolver uses, follows 10;
/// an issuer's keys rarely move at all).
pub const MAX_REDIRECTS: usize = 3;

/// Why a fetch failed, naming the URL it was for.
#[derive(Debug, thiserror::Error)]
#[error("GET {url}: {reason}")]
pub struct FetchError {
    pub url: String,
    pub reason: String,
}

/// A client for [`Getter::get`]: the TLS config is built once.
#[derive(Clone)]
pub struct Getter {
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Getter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Getter")
    }
}

impl Getter {
    /// Trusts the system's roots and the certificates in `extra_roots_pem`.
    pub fn new(extra_roots_pem: Option<&str>) -> anyhow::Result<Self> {
        let mut roots = (*crate::tls::system_roots()).clone();
        if let Some(pem) = extra_roots_pem {
            for cert in crate::tls::parse_certs(pem)? {
                roots.add(cert)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls) })
    }

    /// The body of a `200 OK` answer to `GET url`, at most `limit` bytes, within `timeout`
    /// for the whole exchange (redirects included).
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
        limit: usize,
    ) -> Result<Bytes, FetchError> {
        let fail = |reason: String| FetchError {
            url: url.to_owned(),
            reason,
        };
        tokio::time::timeout(timeout, self.follow(url, limit))
            .await
            .map_err(|_| fail(format!("no answer within {}ms", timeout.as_millis())))?
            .map_err(fail)
    }

    async fn follow(&self, url: &str, limit: usize) -> Result<Bytes, String> {
        let mut uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        for _ in 0..=MAX_REDIRECTS {
            let (status, location, body) = self.once(&uri, limit).await?;
            if status == StatusCode::OK {
                return Ok(body);
            }
            if !status.is_redirection() {
                return Err(format!("answered {status}"));
            }
            let location = location.ok_or_else(|| format!("answered {status} without Location"))?;
            let next = resolve(&uri, &location)?;
            if uri.scheme_str() == Some("https") && next.scheme_str() != Some("https") {
                return Err(format!("redirected from https to {next}"));
            }
            uri = next;
        }
        Err(format!("more than {MAX_REDIRECTS} redirects"))
    }

    async fn once(
        &self,
        uri: &Uri,
        limit: usize,
    ) -> Result<(StatusCode, Option<String>, Bytes), String> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let host = uri.host().ok_or("the URL has no host")?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        // A bracketed IPv6 literal connects without its brackets.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.to_owned());
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("isthmus/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        if https {
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            exchange(TokioIo::new(tls), request, limit).await
        } else {
            exchange(TokioIo::new(tcp), request, limit).await
        }
    }
}

async fn exchange<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
    limit: usize,
) -> Result<(StatusCode, Option<String>, Bytes), String>
where
    IO: Read + Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let response = send
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP/1.1: {e}"))?;
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if status != StatusCode::OK {
            return Ok((status, location, Bytes::new()));
        }
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the body is larger than {limit} bytes")
                } else {
                    format!("reading the body: {e}")
                }
            })?
            .to_bytes();
        Ok((status, location, body))
    }
    .await;
    driver.abort();
    result
}

/// A redirect's target: an absolute URL, or a path on the same origin.
fn resolve(base: &Uri, location: &str) -> Result<Uri, String> {
    if location.starts_with('/') && !location.starts_with("//") {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(
            location
                .parse()
                .map_err(|e| format!("bad Location `{location}`: {e}"))?,
        );
        return Uri::from_parts(parts).map_err(|e| e.to_string());
    }
    let uri: Uri = location
        .parse()
        .map_err(|e| format!("bad Location `{location}`: {e}"))?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(format!("unsupported Location `{location}`"));
    }
    Ok(uri)
}

/// Whether `s` is an absolute `http` or `https` URL with a host (what a fetch can follow).
pub fn is_http_url(s: &str) -> bool {
    s.parse::<Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering each connection with the next of `answers`, verbatim.
    async fn serve(answers: Vec<String>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
            }
        });
        addr
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn follows_a_relative_redirect_and_caps_the_body() {
        let getter = Getter::new(None).expect("getter");
        let addr = serve(vec![
            "HTTP/1.1 302 Found\r\nlocation: /keys\r\ncontent-length: 0\r\n\r\n".into(),
            ok("{\"keys\":[]}"),
        ])
        .await;
        let body = getter
            .get(&format!("http://{addr}/jwks"), Duration::from_secs(5), 100)
            .await
            .expect("fetched");
        assert_eq!(&body[..], b"{\"keys\":[]}");

        let addr = serve(vec![ok(&"x".repeat(200))]).await;
        let err = getter
            .get(&format!("http://{addr}/big"), Duration::from_secs(5), 100)
            .await
            .expect_err("too big");
        assert!(err.to_string().contains("larger than 100 bytes"), "{err}");
        assert!(
            err.to_string().contains(&format!("http://{addr}/big")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_hung_server_and_error_statuses_fail_with_the_reason() {
        let getter = Getter::new(None).expect("getter");
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", hung.local_addr().expect("addr"));
        let err = getter
            .get(&url, Duration::from_millis(200), 100)
            .await
            .expect_err("hung");
        assert!(err.to_string().contains("no answer within 200ms"), "{err}");

        let addr = serve(vec![
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into()
        ])
        .await;
        let err = getter
            .get(&format!("http://{addr}/"), Duration::from_secs(5), 100)
            .await
            .expect_err("404");
        assert!(err.to_string().contains("404"), "{err}");

        let redirect = "HTTP/1.1 301 Moved\r\nlocation: /again\r\ncontent-length: 0\r\n\r\n";
        let addr = serve(vec![redirect.into(); MAX_REDIRECTS + 1]).await;
        let err = getter
            .get(&format!("http://{addr}/"), Duration::from_secs(5), 100)
            .await
            .expect_err("loop");
        assert!(err.to_string().contains("redirects"), "{err}");
    }

    #[test]
    fn only_absolute_http_urls_are_fetchable() {
        assert!(is_http_url("https://issuer.example.com/keys"));
        assert!(is_http_url("http://127.0.0.1:8080/.well-known/jwks.json"));
        assert!(!is_http_url("issuer.example.com/keys"));
        assert!(!is_http_url("file:///etc/keys"));
        assert!(!is_http_url("testing@secure.istio.io"));
    }
}
