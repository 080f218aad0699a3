//! Certificate verifiers: the chain must lead to the trust bundle and the peer's SPIFFE ID
//! must satisfy a [`PeerPolicy`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::{cert_identity, provider, ClientAuth, TlsIdentity};
use crate::identity::SpiffeId;

/// Which peers a connection accepts, beyond a valid chain.
#[derive(Clone, Debug)]
pub enum PeerPolicy {
    /// Any identity in the given trust domain.
    TrustDomain(String),
    /// Exactly one of these identities.
    OneOf(Vec<SpiffeId>),
    /// A controller of any cluster whose certificate the root signed directly (the
    /// federation's view of its clients: a cluster CA cannot mint controller identities).
    RootIssuedController(String),
    /// The east-west gateway of a cluster: the gateway identity of the trust domain, in a
    /// certificate issued by the CA of `cluster` (any cluster's CA when `None`). A valid
    /// gateway certificate of one cluster does not pass for another's.
    GatewayOf {
        trust_domain: String,
        cluster: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer identity {0} is not allowed here")]
    NotAllowed(String),
    #[error("peer certificate has no SPIFFE ID")]
    NoIdentity,
    #[error("peer controller certificate {0} was not issued by the root")]
    NotRootIssued(String),
    #[error("peer gateway certificate was issued in cluster {issued}, not {expected}")]
    WrongCluster { issued: String, expected: String },
    #[error("peer certificate was issued in cluster {0}, which was removed from the federation")]
    RemovedCluster(String),
}

impl PeerPolicy {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<SpiffeId, PeerError> {
        let id = cert_identity(end_entity).map_err(|_| PeerError::NoIdentity)?;
        let ok = match self {
            PeerPolicy::TrustDomain(td) => id.trust_domain() == td,
            PeerPolicy::OneOf(ids) => ids.contains(&id),
            PeerPolicy::RootIssuedController(td) => {
                if id.trust_domain() != td || id.controller_cluster().is_none() {
                    false
                } else if !intermediates.is_empty() {
                    return Err(PeerError::NotRootIssued(id.to_string()));
                } else {
                    true
                }
            }
            PeerPolicy::GatewayOf {
                trust_domain,
                cluster,
            } => {
                if id != SpiffeId::gateway(trust_domain) {
                    false
                } else {
                    let issued = super::ca::issuing_cluster(intermediates).ok_or_else(|| {
                        PeerError::NotAllowed(format!("{id} (no cluster CA in its chain)"))
                    })?;
                    match cluster {
                        Some(expected) if *expected != issued => {
                            return Err(PeerError::WrongCluster {
                                issued,
                                expected: expected.clone(),
                            })
                        }
                        _ => true,
                    }
                }
            }
        };
        if ok {
            Ok(id)
        } else {
            Err(PeerError::NotAllowed(id.to_string()))
        }
    }
}

// Handshake signatures are checked the same way on both sides, with the one provider.
fn tls12_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn supported_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Refuses a chain issued in a cluster removed from the federation.
fn not_removed(
    identity: &TlsIdentity,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let removed = identity.removed_clusters();
    if removed.is_empty() {
        return Ok(());
    }
    match super::ca::issuing_cluster(intermediates) {
        Some(c) if removed.contains(&c) => Err(cert_error(PeerError::RemovedCluster(c))),
        _ => Ok(()),
    }
}

fn cert_error(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Resolves the certificate to present from the live identity, on both sides.
#[derive(Debug)]
pub(super) struct CurrentCert(pub(super) TlsIdentity);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates: chain to the current bundle, then the policy.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    identity: TlsIdentity,
    auth: ClientAuth,
}

impl SpiffeClientVerifier {
    pub(super) fn new(identity: TlsIdentity, auth: ClientAuth) -> Self {
        Self { identity, auth }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        matches!(self.auth, ClientAuth::Required(_))
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let creds = self.identity.current();
        creds
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        not_removed(&self.identity, intermediates)?;
        let (ClientAuth::Required(policy) | ClientAuth::Optional(policy)) = &self.auth;
        policy
            .check(end_entity, intermediates)
            .map_err(cert_error)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

/// Accepts any server certificate, checking only the handshake's signatures: what a
/// DestinationRule's `insecureSkipVerify` asks for. Never used between mesh proxies.
#[derive(Debug)]
pub struct AnyServerCertificate;

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

/// Where a server verifier finds its roots.
#[derive(Debug)]
enum Roots {
    Live(TlsIdentity),
    Fixed(Arc<RootCertStore>),
}

/// Verifies server certificates: chain to the bundle, then the policy. The DNS name is not
/// checked; peers are named by SPIFFE ID.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    roots: Roots,
    policy: PeerPolicy,
}

impl SpiffeServerVerifier {
    pub(super) fn new(identity: TlsIdentity, policy: PeerPolicy) -> Self {
        Self {
            roots: Roots::Live(identity),
            policy,
        }
    }

    pub(super) fn with_roots(roots: Arc<RootCertStore>, policy: PeerPolicy) -> Self {
        Self {
            roots: Roots::Fixed(roots),
            policy,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.roots {
            Roots::Live(identity) => identity.current().roots.clone(),
            Roots::Fixed(roots) => roots.clone(),
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        if let Roots::Live(identity) = &self.roots {
            not_removed(identity, intermediates)?;
        }
        self.policy
            .check(end_entity, intermediates)
            .map_err(cert_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ca::CertificateAuthority;
    use crate::tls::testing::issue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn handshake(
        server: TlsIdentity,
        client: TlsIdentity,
        server_policy: PeerPolicy,
        client_policy: PeerPolicy,
    ) -> Result<SpiffeId, String> {
        let (a, b) = tokio::io::duplex(16 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(
            server.server_config(ClientAuth::Required(server_policy), &[]),
        );
        let connector = tokio_rustls::TlsConnector::from(client.client_config(client_policy, &[]));
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let id = crate::tls::peer_identity(s.get_ref().1).ok_or("no id")?;
            s.write_all(b"ok").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let mut c = connector
            .connect(crate::tls::server_name(), a)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        srv.await.map_err(|e| e.to_string())?
    }

    #[tokio::test]
    async fn mutual_tls_reports_the_peer_spiffe_id() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let a = TlsIdentity::new(issue(&root, &SpiffeId::new("td", "ns", "a")));
        let b = TlsIdentity::new(issue(&root, &SpiffeId::new("td", "ns", "b")));
        let td = PeerPolicy::TrustDomain("td".into());
        let seen = handshake(a, b, td.clone(), td).await.expect("handshake");
        assert_eq!(seen.service_account(), "b");
    }

    #[tokio::test]
    async fn certificates_from_another_root_are_refused() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let (rogue, _) = CertificateAuthority::new_root("td").expect("root");
        let good = TlsIdentity::new(issue(&root, &SpiffeId::new("td", "ns", "a")));
        let bad = TlsIdentity::new(issue(&rogue, &SpiffeId::new("td", "ns", "b")));
        let td = PeerPolicy::TrustDomain("td".into());
        assert!(handshake(good.clone(), bad.clone(), td.clone(), td.clone())
            .await
            .is_err());
        assert!(handshake(bad, good, td.clone(), td).await.is_err());
    }

    #[tokio::test]
    async fn unexpected_identities_are_refused() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let a = TlsIdentity::new(issue(&root, &SpiffeId::new("td", "ns", "a")));
        let b = TlsIdentity::new(issue(&root, &SpiffeId::new("td", "ns", "b")));
        let only_c = PeerPolicy::OneOf(vec![SpiffeId::new("td", "ns", "c")]);
        let td = PeerPolicy::TrustDomain("td".into());
        let err = handshake(a, b, td, only_c).await.expect_err("refused");
        assert!(err.contains("NotAllowed"), "{err}");
    }

    #[tokio::test]
    async fn a_gateway_passes_only_as_the_gateway_of_the_cluster_whose_ca_issued_it() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let cluster_ca = |name: &str| {
            let (key, csr) = crate::tls::ca::ca_csr().expect("csr");
            let cert = root
                .sign_intermediate(&csr, name, "td", crate::tls::ca::INTERMEDIATE_TTL)
                .expect("sign");
            CertificateAuthority::from_pem(
                &cert,
                &key.serialize_pem(),
                vec![cert.clone()],
                root.bundle_pem().to_owned(),
            )
            .expect("ca")
        };
        let (east, west) = (cluster_ca("east"), cluster_ca("west"));
        let gateway = SpiffeId::gateway("td");
        let east_gw = TlsIdentity::new(issue(&east, &gateway));
        let west_gw = TlsIdentity::new(issue(&west, &gateway));
        let of = |c: Option<&str>| PeerPolicy::GatewayOf {
            trust_domain: "td".into(),
            cluster: c.map(str::to_owned),
        };
        // East dials west's gateway and gets it; any cluster's gateway may dial in.
        let seen = handshake(west_gw.clone(), east_gw.clone(), of(None), of(Some("west")))
            .await
            .expect("west's gateway is west's");
        assert_eq!(seen, gateway);
        // West's valid gateway certificate does not pass for north's.
        let err = handshake(
            west_gw.clone(),
            east_gw.clone(),
            of(None),
            of(Some("north")),
        )
        .await
        .expect_err("refused");
        assert!(
            err.contains(r#"WrongCluster { issued: "west", expected: "north" }"#),
            "{err}"
        );
        // A workload certificate of the right cluster is no gateway; a gateway issued
        // straight by the root names no cluster.
        let workload = TlsIdentity::new(issue(&west, &SpiffeId::new("td", "ns", "a")));
        assert!(
            handshake(workload, east_gw.clone(), of(None), of(Some("west")))
                .await
                .is_err()
        );
        let rootless = TlsIdentity::new(issue(&root, &gateway));
        assert!(handshake(rootless, east_gw, of(None), of(None))
            .await
            .is_err());
        assert_eq!(
            crate::tls::ca::issuing_cluster(&west_gw.current().certified.cert[1..]),
            Some("west".into())
        );
    }
}
