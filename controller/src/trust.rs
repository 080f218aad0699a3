//! The cluster's durable identity: its intermediate CA, the controller's own certificate,
//! the trust bundle and the bootstrap-token key, kept in the state folder. The first start
//! joins the federation (CSR + join token); later starts reload from disk. While running,
//! the controller follows the federation's trust (see [`follow`]): new bundles, a new CA
//! under a rotated root, and renewal of its certificates before they expire.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use isthmus_core::backoff::Backoff;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::tls::ca::{ca_csr, leaf_csr, CertificateAuthority};
use isthmus_core::tls::{
    anonymous_client_config, bundle, cert_not_after, parse_certs, Credentials, PeerPolicy,
    TlsIdentity, ALPN_H2,
};
use isthmus_core::token::TokenKey;
use isthmus_proto::federation::federation_client::FederationClient;
use isthmus_proto::federation::JoinRequest;
use tokio::sync::watch;

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
    pub trust: Trust,
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

/// How a join proves the cluster: its join token (first start), or its controller
/// certificate (a new CA under a rotated root, or a renewal before expiry).
enum Proof<'a> {
    Token(&'a str),
    Certificate(&'a TlsIdentity),
}

async fn join(config: &Config, proof: Proof<'_>) -> anyhow::Result<Stored> {
    let federation = SpiffeId::new(&config.trust_domain, SYSTEM_NAMESPACE, "isthmus-federation");
    let policy = PeerPolicy::OneOf(vec![federation]);
    let tls = match proof {
        Proof::Token(_) => anonymous_client_config(&config.federation_bundle_pem, policy)?,
        Proof::Certificate(identity) => identity.client_config(policy, &[ALPN_H2]),
    };
    let (ca_key, ca_csr_pem) = ca_csr()?;
    let (key, controller_csr_pem) =
        leaf_csr(&SpiffeId::controller(&config.trust_domain, &config.cluster))?;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    anyhow::ensure!(!config.federation_addrs.is_empty(), "no federation address");
    // Each address in turn; with a certificate, one round of them.
    let mut tried = 0usize;
    let resp = loop {
        let address = config.federation_addrs[tried % config.federation_addrs.len()];
        tried += 1;
        let mut client =
            FederationClient::new(isthmus_core::grpc::tls_channel(address, tls.clone()));
        let mut req = tonic::Request::new(JoinRequest {
            cluster: config.cluster.clone(),
            ca_csr_pem: ca_csr_pem.clone(),
            controller_csr_pem: controller_csr_pem.clone(),
        });
        if let Proof::Token(token) = proof {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .context("join token is not a valid header value")?,
            );
        }
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
            Err(s)
                if matches!(proof, Proof::Certificate(_))
                    && tried >= config.federation_addrs.len() =>
            {
                anyhow::bail!("the federation did not answer: {}", s.message())
            }
            Err(s) => {
                tracing::warn!(federation = %address, error = %s, "joining the federation failed; trying again");
                if tried.is_multiple_of(config.federation_addrs.len()) {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
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

impl Stored {
    /// The live identity these files make: the controller's credentials and the CA.
    fn issuing(&self, config: &Config) -> anyhow::Result<(Credentials, Issuing)> {
        let creds = Credentials::from_pem(
            pkcs8_der(&self.key)?,
            std::slice::from_ref(&self.cert),
            &self.bundle,
        )?;
        anyhow::ensure!(
            creds.id == SpiffeId::controller(&config.trust_domain, &config.cluster),
            "stored controller certificate is for {}, not cluster {}",
            creds.id,
            config.cluster
        );
        let ca = CertificateAuthority::from_pem(
            &self.ca_cert,
            &self.ca_key,
            vec![self.ca_cert.clone()],
            self.bundle.clone(),
        )?;
        let ca_der = parse_certs(&self.ca_cert)?
            .into_iter()
            .next()
            .context("no CA certificate")?;
        Ok((
            creds,
            Issuing {
                ca: Arc::new(ca),
                ca_fingerprint: bundle::fingerprint(&ca_der),
                ca_root: bundle::issuing_root(&ca_der, &self.bundle),
                roots: bundle::fingerprints(&self.bundle),
                bundle_pem: self.bundle.clone(),
                ca_der: ca_der.to_vec(),
            },
        ))
    }
}

/// The CA this cluster issues with and the roots it trusts, as of now.
pub struct Issuing {
    pub ca: Arc<CertificateAuthority>,
    /// SHA-256 of the CA's certificate.
    pub ca_fingerprint: String,
    /// The root of `bundle_pem` that signed the CA; `None` if none did.
    pub ca_root: Option<String>,
    /// Fingerprints of the roots of `bundle_pem`.
    pub roots: Vec<String>,
    pub bundle_pem: String,
    ca_der: Vec<u8>,
}

#[cfg(test)]
impl Issuing {
    /// A cluster CA under a fresh root, for tests of what reads it.
    pub fn for_tests() -> Self {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let (key, csr) = isthmus_core::tls::ca::ca_csr().expect("csr");
        let cert = root
            .sign_intermediate(&csr, "east", "td", isthmus_core::tls::ca::INTERMEDIATE_TTL)
            .expect("sign");
        let bundle_pem = root.bundle_pem().to_owned();
        let ca = CertificateAuthority::from_pem(
            &cert,
            &key.serialize_pem(),
            vec![cert.clone()],
            bundle_pem.clone(),
        )
        .expect("ca");
        let der = parse_certs(&cert).expect("pem")[0].to_vec();
        Self {
            ca: Arc::new(ca),
            ca_fingerprint: bundle::fingerprint(&der),
            ca_root: bundle::issuing_root(&der, &bundle_pem),
            roots: bundle::fingerprints(&bundle_pem),
            bundle_pem,
            ca_der: der,
        }
    }
}

/// The live [`Issuing`]: read by the CA service, the snapshot builder and the trust
/// report; replaced when the federation's bundle or signing root changes.
#[derive(Clone)]
pub struct Trust(Arc<watch::Sender<Arc<Issuing>>>);

impl Trust {
    pub fn current(&self) -> Arc<Issuing> {
        self.0.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Issuing>> {
        self.0.subscribe()
    }
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
                let token = config.join_token.as_deref().context(
                    "this cluster has not joined the federation yet and no join token was given",
                )?;
                let s = join(config, Proof::Token(token)).await?;
                s.save(&dir)
                    .with_context(|| format!("saving cluster CA to {}", dir.display()))?;
                s
            }
        };
        let (creds, issuing) = stored.issuing(config)?;
        let token_key = TokenKey::load_or_create(&dir.join(TOKEN_KEY))?;
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            trust: Trust(Arc::new(watch::Sender::new(Arc::new(issuing)))),
            identity: TlsIdentity::new(creds),
            token_key: Arc::new(token_key),
        })
    }
}

/// Follows the federation's trust for as long as the controller runs:
/// - a signing root other than the one that signed this cluster's CA (a rotation is
///   reissuing): join again with the controller's certificate, for a new CA and
///   controller certificate under that root;
/// - the controller's certificate or the CA past half its life: the same, so neither
///   needs a join token again (renewal in place);
/// - a new trust bundle: taken (kept on disk, pushed to the proxies) once it holds the
///   root of this cluster's CA, so the cluster never trusts less than its own chain.
///
/// Only a registry heard from the federation in this run counts: the copy kept on disk
/// may predate a rotation this cluster already followed.
pub async fn follow(
    config: Config,
    trust: Trust,
    identity: TlsIdentity,
    link: Arc<crate::federation::GlobalState>,
    metrics: TrustMetrics,
) {
    let mut global = link.subscribe();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut retry_at: Option<tokio::time::Instant> = None;
    // A bundle refused once is not tried (and logged) again at every registry update.
    let mut refused = String::new();
    loop {
        metrics.observe(&trust, &identity);
        let heard = link.link().last_update.is_some();
        let meta = if heard {
            global.borrow_and_update().meta.clone()
        } else {
            global.borrow_and_update();
            Default::default()
        };
        let now = trust.current();
        let mut renew_at = identity.current().renew_at();
        if let Some(ca_half_life) = half_life(&now.ca_der) {
            renew_at = renew_at.min(ca_half_life);
        }
        let reissue = !meta.signing_root.is_empty()
            && now.ca_root.as_deref() != Some(meta.signing_root.as_str());
        let due = SystemTime::now() >= renew_at;
        if (reissue || due) && retry_at.is_none_or(|t| tokio::time::Instant::now() >= t) {
            let why = if reissue {
                "a new signing root"
            } else {
                "renewal at half-life"
            };
            match rejoin(&config, &trust, &identity).await {
                Ok(()) => {
                    tracing::info!(cluster = %config.cluster, why, "cluster CA and controller certificate reissued");
                    backoff.reset();
                    // The new CA may be under the root a refused bundle holds.
                    refused.clear();
                    // Not again within a second, whatever lifetimes the federation gives.
                    retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(cluster = %config.cluster, why, error = %e, "cannot reissue the cluster CA; retrying");
                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                }
            }
            continue;
        }
        if !meta.trust_bundle_pem.is_empty()
            && meta.trust_bundle_pem != now.bundle_pem
            && meta.trust_bundle_pem != refused
        {
            if let Err(e) = adopt_bundle(&config, &trust, &identity, &meta.trust_bundle_pem) {
                tracing::warn!(error = %e, "keeping the current trust bundle");
                refused = meta.trust_bundle_pem.clone();
            }
        }
        let wake = match retry_at {
            Some(t) => t,
            None => {
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(Duration::from_secs(24 * 3600));
                tokio::time::Instant::now() + wait
            }
        };
        tokio::select! {
            changed = global.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(wake) => retry_at = None,
        }
    }
}

/// When a CA certificate reaches half of its lifetime (counted from its issue, not from
/// its backdated start).
fn half_life(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let backdate = isthmus_core::tls::ca::BACKDATE.as_secs();
    let from = cert.validity().not_before.timestamp().max(0) as u64 + backdate;
    let to = cert.validity().not_after.timestamp().max(0) as u64;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(from + (to.saturating_sub(from)) / 2))
}

impl Trust {
    /// The cluster CA for `/config_dump`: what it is, where it chains, until when it
    /// issues (nothing it signs outlives it), and when it is renewed in place.
    pub fn dump(&self, identity: &TlsIdentity) -> serde_json::Value {
        let now = self.current();
        let unix = |t: SystemTime| isthmus_core::admin::unix_seconds(t);
        let controller = identity.current();
        serde_json::json!({
            "fingerprint": bundle::short(&now.ca_fingerprint),
            "root": now.ca_root.as_deref().map(bundle::short),
            "trusted_roots": now.roots.iter().map(|r| bundle::short(r)).collect::<Vec<_>>(),
            "issues_until_unix": now.ca.not_after().map(unix),
            "renew_at_unix": half_life(&now.ca_der).map(unix),
            "controller_certificate_not_after_unix": unix(controller.not_after),
            "controller_certificate_renew_at_unix": unix(controller.renew_at()),
        })
    }
}

/// Expiry gauges of the cluster CA and the controller's certificate.
#[derive(Clone, Default)]
pub struct TrustMetrics {
    ca_expiry: prometheus_client::metrics::gauge::Gauge,
    certificate_expiry: prometheus_client::metrics::gauge::Gauge,
}

impl TrustMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ca_expiry_timestamp_seconds",
            "when the cluster CA expires: the cluster issues certificates until then, with or without the federation",
            self.ca_expiry.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "when the controller's own certificate expires",
            self.certificate_expiry.clone(),
        );
    }

    fn observe(&self, trust: &Trust, identity: &TlsIdentity) {
        let unix = |t: SystemTime| isthmus_core::admin::unix_seconds(t) as i64;
        if let Some(t) = trust.current().ca.not_after() {
            self.ca_expiry.set(unix(t));
        }
        self.certificate_expiry
            .set(unix(identity.current().not_after));
    }
}

async fn rejoin(config: &Config, trust: &Trust, identity: &TlsIdentity) -> anyhow::Result<()> {
    let stored = join(config, Proof::Certificate(identity)).await?;
    let (creds, issuing) = stored.issuing(config)?;
    anyhow::ensure!(
        issuing.ca_root.is_some(),
        "the new cluster CA does not chain to the federation's bundle"
    );
    stored
        .save(&config.state_dir)
        .with_context(|| format!("saving cluster CA to {}", config.state_dir.display()))?;
    identity.update(creds);
    trust.0.send_replace(Arc::new(issuing));
    Ok(())
}

fn adopt_bundle(
    config: &Config,
    trust: &Trust,
    identity: &TlsIdentity,
    bundle_pem: &str,
) -> anyhow::Result<()> {
    bundle::parse_bundle(bundle_pem).context("the federation's trust bundle")?;
    let now = trust.current();
    let Some(ca_root) = bundle::issuing_root(&now.ca_der, bundle_pem) else {
        anyhow::bail!(
            "the federation's trust bundle lacks the root of this cluster's CA ({}); waiting for a new CA",
            bundle::short(&now.ca_fingerprint)
        );
    };
    isthmus_core::fsutil::write_private(&config.state_dir.join(BUNDLE), bundle_pem.as_bytes())
        .context("saving the trust bundle")?;
    identity.update(identity.current().with_bundle(bundle_pem)?);
    let roots = bundle::fingerprints(bundle_pem);
    tracing::info!(roots = ?roots.iter().map(|r| bundle::short(r)).collect::<Vec<_>>(), "trust bundle updated");
    trust.0.send_replace(Arc::new(Issuing {
        ca: now.ca.clone(),
        ca_fingerprint: now.ca_fingerprint.clone(),
        ca_root: Some(ca_root),
        roots,
        bundle_pem: bundle_pem.to_owned(),
        ca_der: now.ca_der.clone(),
    }));
    Ok(())
}
