//! The cluster's durable identity: its intermediate CA, the controller's own certificate,
//! the trust bundle and the bootstrap-token key, kept in the state folder. The first start
//! joins the federation (CSR + join token); later starts reload from disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use isthmus_core::backoff::Backoff;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::tls::ca::{ca_csr, leaf_csr, CertificateAuthority};
use isthmus_core::tls::{
    anonymous_client_config, cert_not_after, parse_certs, Credentials, PeerPolicy, TlsIdentity,
};
use isthmus_core::token::TokenKey;
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::JoinRequest;

use crate::Config;

const CA_CERT: &str = "cluster-ca.pem";
const CA_KEY: &str = "cluster-ca-key.pem";
const CONTROLLER_CERT: &str = "controller.pem";
const CONTROLLER_KEY: &str = "controller-key.pem";
const BUNDLE: &str = "bundle.pem";
const TOKEN_KEY: &str = "token.key";
/// Stored certificates closer than this to expiry are replaced by joining again.
const MIN_REMAINING: Duration = Duration::from_secs(3600);

pub struct ClusterState {
    pub trust_domain: String,
    pub bundle_pem: String,
    pub ca: Arc<CertificateAuthority>,
    pub identity: TlsIdentity,
    pub token_key: Arc<TokenKey>,
}

/// Audience of bootstrap tokens for workloads of `cluster`.
pub fn token_audience(cluster: &str) -> String {
    format!("cluster:{cluster}")
}

/// Mints a bootstrap token for the workload identity `namespace/service_account` of the
/// cluster whose state is in `state_dir`.
pub fn mint_workload_token(
    state_dir: &Path,
    cluster: &str,
    namespace: &str,
    service_account: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        namespace != SYSTEM_NAMESPACE
            || service_account == isthmus_core::identity::GATEWAY_SERVICE_ACCOUNT,
        "tokens for {SYSTEM_NAMESPACE} are only minted for the gateway service account"
    );
    let key = TokenKey::load_or_create(&state_dir.join(TOKEN_KEY))?;
    Ok(key.mint(
        &format!("{namespace}/{service_account}"),
        &token_audience(cluster),
        ttl,
    ))
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

fn fresh(pem: &str) -> bool {
    let Ok(certs) = parse_certs(pem) else {
        return false;
    };
    certs
        .first()
        .and_then(|c| cert_not_after(c).ok())
        .is_some_and(|t| t > SystemTime::now() + MIN_REMAINING)
}

struct Stored {
    ca_cert: String,
    ca_key: String,
    cert: String,
    key: String,
    bundle: String,
}

impl Stored {
    fn load(dir: &Path) -> Option<Self> {
        let s = Self {
            ca_cert: read(dir, CA_CERT)?,
            ca_key: read(dir, CA_KEY)?,
            cert: read(dir, CONTROLLER_CERT)?,
            key: read(dir, CONTROLLER_KEY)?,
            bundle: read(dir, BUNDLE)?,
        };
        (fresh(&s.ca_cert) && fresh(&s.cert)).then_some(s)
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        use isthmus_core::fsutil::write_private;
        write_private(&dir.join(CA_CERT), self.ca_cert.as_bytes())?;
        write_private(&dir.join(CA_KEY), self.ca_key.as_bytes())?;
        write_private(&dir.join(CONTROLLER_CERT), self.cert.as_bytes())?;
        write_private(&dir.join(CONTROLLER_KEY), self.key.as_bytes())?;
        write_private(&dir.join(BUNDLE), self.bundle.as_bytes())
    }
}

async fn join(config: &Config) -> anyhow::Result<Stored> {
    let token = config
        .join_token
        .as_deref()
        .context("this cluster has not joined the federation yet and no join token was given")?;
    let federation = SpiffeId::new(&config.trust_domain, SYSTEM_NAMESPACE, "isthmus-federation");
    let tls = anonymous_client_config(
        &config.federation_bundle_pem,
        PeerPolicy::OneOf(vec![federation]),
    )?;
    let (ca_key, ca_csr_pem) = ca_csr()?;
    let (key, controller_csr_pem) =
        leaf_csr(&SpiffeId::controller(&config.trust_domain, &config.cluster))?;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let resp = loop {
        let mut client = FederationClient::new(isthmus_core::grpc::tls_channel(
            config.federation_addr,
            tls.clone(),
        ));
        let mut req = tonic::Request::new(JoinRequest {
            cluster: config.cluster.clone(),
            ca_csr_pem: ca_csr_pem.clone(),
            controller_csr_pem: controller_csr_pem.clone(),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .context("join token is not a valid header value")?,
        );
        req.set_timeout(Duration::from_secs(5));
        match client.join(req).await {
            Ok(r) => break r.into_inner(),
            Err(s)
                if s.code() == tonic::Code::Unauthenticated
                    || s.code() == tonic::Code::PermissionDenied =>
            {
                anyhow::bail!(
                    "the federation refused to let cluster {} join: {}",
                    config.cluster,
                    s.message()
                )
            }
            Err(s) => {
                tracing::warn!(federation = %config.federation_addr, error = %s, "joining the federation failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    anyhow::ensure!(
        resp.trust_domain == config.trust_domain,
        "the federation's trust domain is {}, this controller expects {}",
        resp.trust_domain,
        config.trust_domain
    );
    tracing::info!(cluster = %config.cluster, "joined the federation");
    Ok(Stored {
        ca_cert: resp.ca_cert_pem,
        ca_key: ca_key.serialize_pem(),
        cert: resp.controller_cert_pem,
        key: key.serialize_pem(),
        bundle: resp.trust_bundle_pem,
    })
}

fn pkcs8_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let key = rcgen::KeyPair::from_pem(pem).context("stored key is not a valid PEM key")?;
    Ok(key.serialize_der())
}

impl ClusterState {
    pub async fn load_or_join(config: &Config) -> anyhow::Result<Self> {
        let dir: PathBuf = config.state_dir.clone();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating state folder {}", dir.display()))?;
        let stored = match Stored::load(&dir) {
            Some(s) => {
                tracing::info!(dir = %dir.display(), "reusing stored cluster CA");
                s
            }
            None => {
                let s = join(config).await?;
                s.save(&dir)
                    .with_context(|| format!("saving cluster CA to {}", dir.display()))?;
                s
            }
        };
        let ca = CertificateAuthority::from_pem(
            &stored.ca_cert,
            &stored.ca_key,
            vec![stored.ca_cert.clone()],
            stored.bundle.clone(),
        )?;
        let creds = Credentials::from_pem(
            pkcs8_der(&stored.key)?,
            std::slice::from_ref(&stored.cert),
            &stored.bundle,
        )?;
        anyhow::ensure!(
            creds.id == SpiffeId::controller(&config.trust_domain, &config.cluster),
            "stored controller certificate is for {}, not cluster {}",
            creds.id,
            config.cluster
        );
        let token_key = TokenKey::load_or_create(&dir.join(TOKEN_KEY))?;
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            bundle_pem: stored.bundle,
            ca: Arc::new(ca),
            identity: TlsIdentity::new(creds),
            token_key: Arc::new(token_key),
        })
    }
}
