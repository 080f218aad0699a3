//! Getting and renewing a component's certificate from its cluster's CA: the key is made
//! here and never leaves the process; the CA receives a CSR and the proof of identity (a
//! token the first time, the current certificate afterwards). The token is a bootstrap
//! token, or in Kubernetes the pod's projected service-account token, read from its file
//! at every use so that the kubelet's rotations are picked up.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use isthmus_proto::ca::certificate_authority_client::CertificateAuthorityClient;
use isthmus_proto::ca::CertificateRequest;

use crate::backoff::Backoff;
use crate::grpc::tls_channel;
use crate::identity::SpiffeId;
use crate::tls::{
    anonymous_client_config, ca::leaf_csr, Credentials, PeerPolicy, TlsIdentity, ALPN_H2,
};

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("cannot build a TLS client: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot make a CSR: {0}")]
    Csr(#[from] crate::tls::ca::CaError),
    #[error("cannot read the token: {0}")]
    Token(#[source] std::io::Error),
    #[error("cannot read the bootstrap roots: {0}")]
    Roots(#[source] std::io::Error),
    #[error("the CA at {addr} refused: {status}")]
    Refused {
        addr: SocketAddr,
        status: tonic::Status,
    },
}

/// The proof of identity for a first certificate.
#[derive(Debug, Clone)]
pub enum Token {
    /// Given as is (a bootstrap token from `isthmus token workload`).
    Inline(String),
    /// Read from a file at every use: a projected service-account token, which the kubelet
    /// rewrites before it expires.
    File(std::path::PathBuf),
}

impl Token {
    /// The token now.
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Token::Inline(t) => Ok(t.clone()),
            Token::File(path) => Ok(std::fs::read_to_string(path)?.trim().to_owned()),
        }
    }
}

/// The roots that verify the controller before the first certificate.
#[derive(Debug, Clone)]
pub enum Roots {
    /// Given as is.
    Inline(String),
    /// Read from a file at every first request: the trust anchor file an operator (or a
    /// mounted ConfigMap) replaces after a root rotation, so a proxy that starts, or
    /// restarts, later still trusts the controller's certificate. While the file does
    /// not exist (a ConfigMap not written yet), `fallback` is used if given.
    File {
        path: std::path::PathBuf,
        fallback: Option<String>,
    },
}

impl Roots {
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Roots::Inline(pem) => Ok(pem.clone()),
            Roots::File { path, fallback } => match std::fs::read_to_string(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && fallback.is_some() => {
                    Ok(fallback.clone().unwrap_or_default())
                }
                other => other,
            },
        }
    }
}

/// Where and how to ask for certificates.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// The controller's gRPC address.
    pub address: SocketAddr,
    /// The identity the controller must present.
    pub controller: SpiffeId,
    /// Roots to trust before the first certificate arrives.
    pub bootstrap: Roots,
    /// Proof of identity for the first request.
    pub token: Option<Token>,
    /// The identity to ask for.
    pub identity: SpiffeId,
}

impl CaClient {
    /// Requests a new certificate. With `current`, the request is authenticated by the
    /// current certificate; otherwise by the bootstrap token.
    pub async fn fetch(&self, current: Option<&TlsIdentity>) -> Result<Credentials, CaClientError> {
        let policy = PeerPolicy::OneOf(vec![self.controller.clone()]);
        let config = match current {
            Some(id) => id.client_config(policy, &[ALPN_H2]),
            None => {
                let roots = self.bootstrap.read().map_err(CaClientError::Roots)?;
                anonymous_client_config(&roots, policy)?
            }
        };
        let (key, csr_pem) = leaf_csr(&self.identity)?;
        let mut req = tonic::Request::new(CertificateRequest { csr_pem });
        if current.is_none() {
            if let Some(token) = &self.token {
                let token = token.read().map_err(CaClientError::Token)?;
                if let Ok(v) = format!("Bearer {token}").parse() {
                    req.metadata_mut().insert("authorization", v);
                }
            }
        }
        req.set_timeout(Duration::from_secs(5));
        let mut client = CertificateAuthorityClient::new(tls_channel(self.address, config));
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|status| CaClientError::Refused {
                addr: self.address,
                status,
            })?
            .into_inner();
        Ok(Credentials::from_pem(
            key.serialize_der(),
            &resp.cert_chain_pem,
            &resp.trust_bundle_pem,
        )?)
    }

    /// Keeps trying until the first certificate is issued.
    pub async fn fetch_until_issued(&self) -> TlsIdentity {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.fetch(None).await {
                Ok(creds) => {
                    tracing::info!(id = %creds.id, "workload certificate issued");
                    return TlsIdentity::new(creds);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificate request failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Renews at half-life forever, or at once when `now` is notified (the cluster's CA
    /// changed). Open connections keep their certificate; new ones use the renewed one.
    pub async fn renew_forever(
        self,
        identity: TlsIdentity,
        now: std::sync::Arc<tokio::sync::Notify>,
    ) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        // Asked to renew now and not yet renewed: failures retry after the backoff, not at
        // half-life.
        let mut urgent = false;
        loop {
            if !urgent {
                let at = identity.current().renew_at();
                let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = now.notified() => {
                        urgent = true;
                        // Spread the proxies of a cluster over a second, not all at once.
                        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1000)).await;
                    }
                }
            }
            match self.fetch(Some(&identity)).await {
                Ok(creds) => {
                    tracing::info!(id = %creds.id, "workload certificate renewed");
                    identity.update(creds);
                    backoff.reset();
                    urgent = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "certificate renewal failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}
