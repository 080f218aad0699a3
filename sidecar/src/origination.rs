//! TLS origination to hosts outside the mesh, as a DestinationRule's `tls` asks: the app
//! speaks plain HTTP (or TCP) to a `MESH_EXTERNAL` host, and its sidecar connects to the
//! host with TLS (`SIMPLE`), presenting a client certificate (`MUTUAL`).
//!
//! The server's certificate is verified against `caCertificates` (the system's trust store
//! when none is given), for the `subjectAltNames` listed or else the SNI name (`sni`, or the
//! host asked for); `insecureSkipVerify` verifies nothing but the handshake's signatures.
//! The files are read when first needed and again every 30 seconds, so certificates
//! rotated on disk are picked up without a push; one that cannot be read fails the
//! connection with the file and the reason named.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_core::routing::{ClientTls, TlsMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use crate::errors::ProxyError;
use crate::pool::ConnectError;

/// How long files read for a handshake are trusted before they are read again.
const RELOAD: Duration = Duration::from_secs(30);

/// A client config built from the files, or why none could be.
type Built = Result<Arc<rustls::ClientConfig>, String>;

/// One DestinationRule's `tls`, with the client configs built from its files.
#[derive(Debug)]
pub struct Origination {
    spec: ClientTls,
    /// (read at, ALPN h2, what was built).
    cached: Mutex<Vec<(Instant, bool, Built)>>,
}

impl Origination {
    /// The origination `tls` asks for; `None` for `DISABLE` (plain).
    pub fn new(spec: &ClientTls) -> Option<Arc<Self>> {
        (spec.mode != TlsMode::Disable).then(|| {
            Arc::new(Self {
                spec: spec.clone(),
                cached: Mutex::default(),
            })
        })
    }

    /// Connects TLS over `tcp` to `host` (the name asked for), offering HTTP/2 or
    /// HTTP/1.1 by ALPN.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        h2: bool,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProxyError> {
        let fail = |reason: String| ProxyError::UpstreamConnect {
            service: host.to_owned(),
            source: ConnectError::Tls {
                peer: host.to_owned(),
                source: std::io::Error::other(reason),
            },
        };
        if self.spec.mode == TlsMode::IstioMutual {
            return Err(fail(
                "ISTIO_MUTUAL to a host outside the mesh is not supported; use SIMPLE or MUTUAL"
                    .into(),
            ));
        }
        let config = self.config(h2).map_err(fail)?;
        let sni = if self.spec.sni.is_empty() {
            host
        } else {
            &self.spec.sni
        };
        let name = ServerName::try_from(sni.to_owned())
            .map_err(|e| fail(format!("`{sni}` is not a TLS server name: {e}")))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| fail(e.to_string()))
    }

    fn config(&self, h2: bool) -> Built {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, c)) = cached
            .iter()
            .find(|(at, alpn, _)| *alpn == h2 && at.elapsed() < RELOAD)
        {
            return c.clone();
        }
        let built = self.build(h2);
        cached.retain(|(_, alpn, _)| *alpn != h2);
        cached.push((Instant::now(), h2, built.clone()));
        built
    }

    fn build(&self, h2: bool) -> Built {
        let t = &self.spec;
        let provider = isthmus_core::tls::provider();
        let verifier: Arc<dyn ServerCertVerifier> = if t.insecure_skip_verify {
            Arc::new(isthmus_core::tls::verify::AnyServerCertificate)
        } else {
            let roots = if t.ca_certificates.is_empty() {
                system_roots()?
            } else {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(&t.ca_certificates)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", t.ca_certificates))?;
                }
                Arc::new(roots)
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("the server verifier: {e}"))?;
            Arc::new(Names {
                webpki,
                names: t.subject_alt_names.clone(),
            })
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = if t.mode == TlsMode::Mutual {
            let chain = read_certs(&t.client_certificate)?;
            let pem = std::fs::read_to_string(&t.private_key)
                .map_err(|e| format!("reading {}: {e}", t.private_key))?;
            let key = isthmus_core::tls::parse_private_key(&pem)
                .map_err(|e| format!("{}: no private key in it ({e})", t.private_key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{} and {}: {e}", t.client_certificate, t.private_key))?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    isthmus_core::tls::parse_certs(&pem).map_err(|e| format!("{path}: {e}"))
}

fn system_roots() -> Result<Arc<rustls::RootCertStore>, String> {
    let roots = isthmus_core::tls::system_roots();
    if roots.is_empty() {
        return Err("the system's trust store is empty; give caCertificates".into());
    }
    Ok(roots)
}

/// The WebPKI verifier, for any of `names` when given (Istio's `subjectAltNames`), else
/// for the SNI name.
#[derive(Debug)]
struct Names {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<String>,
}

impl ServerCertVerifier for Names {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.names.is_empty() {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = rustls::Error::General("no subjectAltNames to verify".into());
        for name in &self.names {
            let Ok(name) = ServerName::try_from(name.as_str()) else {
                continue;
            };
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
