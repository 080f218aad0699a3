//! TLS for every hop: credentials that renew in place, SPIFFE-checking verifiers, and the
//! rustls configs built on them.
//!
//! A [`TlsIdentity`] holds the current [`Credentials`] (key, chain, trust bundle). Server and
//! client configs resolve the certificate and the verifier through it on every handshake, so a
//! renewed certificate or a new trust bundle takes effect for new connections while open ones
//! keep running.

pub mod bundle;
pub mod ca;
pub mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::identity::SpiffeId;
pub use verify::PeerPolicy;

/// How a server treats client certificates.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// A certificate satisfying the policy is required.
    Required(PeerPolicy),
    /// A certificate is optional (callers that authenticate by token); one that is
    /// presented must verify and satisfy the policy.
    Optional(PeerPolicy),
}

/// ALPN for HTTP/2 between proxies.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in PEM input")]
    NoCertificate,
    #[error("PEM input is not valid: {0}")]
    Pem(#[source] std::io::Error),
    #[error("private key is not usable: {0}")]
    Key(#[source] rustls::Error),
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE ID in its URI SAN")]
    NoSpiffeId,
    #[error("trust bundle is not usable: {0}")]
    Bundle(String),
}

/// The process-wide crypto provider (ring); one provider across the workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Parses every certificate in a PEM string.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(TlsError::Pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// The one private key in a PEM string (PKCS#8, PKCS#1 or SEC1).
pub fn parse_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(TlsError::Pem)?
        .ok_or(TlsError::NoCertificate)
}

/// The system's trust store (the roots a browser on this host trusts), read once.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "reading the system's trust store");
            }
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(native.certs);
            Arc::new(roots)
        })
        .clone()
}

/// A server config for an HTTPS endpoint that clients outside the mesh call by name (the
/// admission webhook): `chain` (leaf first) and its key, no client certificates, TLS 1.2
/// and 1.3.
pub fn plain_server_config(
    chain: &[String],
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = parse_certs(&chain.concat())?;
    let key = parse_private_key(key_pem)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Key)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Key)?;
    Ok(Arc::new(config))
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn cert_identity(cert: &[u8]) -> Result<SpiffeId, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .ok_or(TlsError::NoSpiffeId)
}

/// When a certificate stops being valid.
pub fn cert_not_after(cert: &[u8]) -> Result<SystemTime, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Parse(e.to_string()))?;
    let secs = x509.validity().not_after.timestamp().max(0) as u64;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// One snapshot of a component's identity: key, certificate chain and trust bundle.
pub struct Credentials {
    pub id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub issued_at: SystemTime,
    pub roots: Arc<RootCertStore>,
    pub bundle_pem: String,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Builds a root store from PEM roots.
pub fn root_store(bundle_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(bundle_pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Bundle(e.to_string()))?;
    }
    Ok(roots)
}

/// The root store of `bundle_pem`, and the client-certificate verifier on it.
fn trusting(
    bundle_pem: &str,
) -> Result<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>), TlsError> {
    let roots = Arc::new(root_store(bundle_pem)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Bundle(e.to_string()))?;
    Ok((roots, verifier))
}

impl Credentials {
    /// Builds credentials from a PKCS#8 key, a PEM chain (leaf first) and PEM roots.
    pub fn from_pem(
        key_pkcs8_der: Vec<u8>,
        chain_pem: &[String],
        bundle_pem: &str,
    ) -> Result<Self, TlsError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            chain.extend(parse_certs(pem)?);
        }
        let leaf = chain.first().ok_or(TlsError::NoCertificate)?;
        let id = cert_identity(leaf)?;
        let not_after = cert_not_after(leaf)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(TlsError::Key)?;
        let (roots, client_verifier) = trusting(bundle_pem)?;
        Ok(Self {
            id,
            certified: Arc::new(CertifiedKey::new(chain, signer)),
            not_after,
            issued_at: SystemTime::now(),
            roots,
            bundle_pem: bundle_pem.to_owned(),
            client_verifier,
        })
    }

    /// The same key and chain, trusting `bundle_pem` instead: how a proxy takes a new trust
    /// bundle without a new certificate.
    pub fn with_bundle(&self, bundle_pem: &str) -> Result<Self, TlsError> {
        bundle::parse_bundle(bundle_pem)?;
        let (roots, client_verifier) = trusting(bundle_pem)?;
        Ok(Self {
            id: self.id.clone(),
            certified: self.certified.clone(),
            not_after: self.not_after,
            issued_at: self.issued_at,
            roots,
            bundle_pem: bundle_pem.to_owned(),
            client_verifier,
        })
    }

    /// The fingerprint of the CA that issued this certificate (the chain's second
    /// certificate), if the chain carries it.
    pub fn issuer_fingerprint(&self) -> Option<String> {
        self.certified.cert.get(1).map(|c| bundle::fingerprint(c))
    }

    /// The moment to renew: half of the remaining lifetime at issue.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }
}

/// A component's live identity; cheap to clone, shared by every listener and client.
#[derive(Clone)]
pub struct TlsIdentity {
    current: watch::Sender<Arc<Credentials>>,
    /// Clusters removed from the federation: chains through their CAs are refused. Kept
    /// beside the credentials, which renewals replace.
    removed: watch::Sender<Arc<std::collections::BTreeSet<String>>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().fmt(f)
    }
}

impl TlsIdentity {
    pub fn new(creds: Credentials) -> Self {
        Self {
            current: watch::Sender::new(Arc::new(creds)),
            removed: watch::Sender::new(Arc::default()),
        }
    }

    /// Clusters whose certificates are refused from now on (new handshakes; holders of
    /// open connections may watch [`TlsIdentity::watch_removed`] to close theirs).
    pub fn set_removed_clusters(&self, clusters: std::collections::BTreeSet<String>) {
        self.removed.send_replace(Arc::new(clusters));
    }

    pub fn removed_clusters(&self) -> Arc<std::collections::BTreeSet<String>> {
        self.removed.borrow().clone()
    }

    pub fn watch_removed(&self) -> watch::Receiver<Arc<std::collections::BTreeSet<String>>> {
        self.removed.subscribe()
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current.borrow().clone()
    }

    pub fn id(&self) -> SpiffeId {
        self.current().id.clone()
    }

    /// Installs renewed credentials; new handshakes use them, open connections are untouched.
    pub fn update(&self, creds: Credentials) {
        self.current.send_replace(Arc::new(creds));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Credentials>> {
        self.current.subscribe()
    }

    /// A server config presenting the current certificate and checking client certificates
    /// as `auth` says.
    pub fn server_config(&self, auth: ClientAuth, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let verifier = verify::SpiffeClientVerifier::new(self.clone(), auth);
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(verify::CurrentCert(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client config presenting the current certificate and checking the server against
    /// `policy`.
    pub fn client_config(&self, policy: PeerPolicy, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let verifier = verify::SpiffeServerVerifier::new(self.clone(), policy);
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(verify::CurrentCert(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A client config that trusts `bundle_pem` and presents no certificate: for the first
/// certificate request, before the caller has an identity.
pub fn anonymous_client_config(
    bundle_pem: &str,
    policy: PeerPolicy,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = Arc::new(root_store(bundle_pem)?);
    let verifier = verify::SpiffeServerVerifier::with_roots(roots, policy);
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The name sent in SNI. Peers are identified by SPIFFE ID, not by DNS name.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("isthmus.mesh").expect("static name is valid")
}

/// The peer's SPIFFE ID after a completed handshake.
pub fn peer_identity(state: &rustls::CommonState) -> Option<SpiffeId> {
    let cert = state.peer_certificates()?.first()?;
    cert_identity(cert).ok()
}

/// Test helpers: a root CA and credentials issued under it.
#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    use super::*;
    use crate::tls::ca::{leaf_csr, CertificateAuthority, WORKLOAD_TTL};

    /// Issues credentials for `id` directly under `root`.
    pub fn issue(root: &CertificateAuthority, id: &SpiffeId) -> Credentials {
        let (key, csr) = leaf_csr(id).expect("csr");
        let chain = root.sign_leaf(&csr, id, WORKLOAD_TTL).expect("sign");
        Credentials::from_pem(key.serialize_der(), &chain, root.bundle_pem()).expect("creds")
    }
}
