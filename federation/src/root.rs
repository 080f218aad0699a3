//! The shared root CA: loaded from the user's PEM files, or created once and kept in the
//! state folder. Also the join-token key and the federation's own serving identity.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::tls::ca::{leaf_csr, CertificateAuthority};
use isthmus_core::tls::{Credentials, TlsIdentity};
use isthmus_core::token::TokenKey;

use crate::Config;

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
const TOKEN_KEY: &str = "join-token.key";
/// Audience of join tokens.
pub const JOIN_AUDIENCE: &str = "federation";
/// Lifetime of controller certificates; controllers rejoin before expiry.
pub const CONTROLLER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of the federation's own serving certificate (re-issued at each start).
const SELF_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct Root {
    pub trust_domain: String,
    pub ca: CertificateAuthority,
    pub token_key: TokenKey,
}

/// Mints a join token for `cluster`, signed with the key in `state_dir`.
pub fn mint_join_token(state_dir: &Path, cluster: &str, ttl: Duration) -> anyhow::Result<String> {
    let key = TokenKey::load_or_create(&state_dir.join(TOKEN_KEY))?;
    Ok(key.mint(cluster, JOIN_AUDIENCE, ttl))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl Root {
    pub fn load_or_create(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state folder {}", dir.display()))?;
        let (cert_path, key_path) = match (&config.root_cert, &config.root_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (None, None) => (dir.join(ROOT_CERT), dir.join(ROOT_KEY)),
            _ => anyhow::bail!("--root-cert and --root-key must be given together"),
        };
        let ca = if cert_path.exists() {
            let cert = read(&cert_path)?;
            let key = read(&key_path)?;
            CertificateAuthority::from_pem(&cert, &key, Vec::new(), cert.clone())
                .with_context(|| format!("loading the root CA from {}", cert_path.display()))?
        } else {
            let (ca, key_pem) = CertificateAuthority::new_root(&config.trust_domain)?;
            isthmus_core::fsutil::write_private(&key_path, key_pem.as_bytes())?;
            isthmus_core::fsutil::write_private(&cert_path, ca.bundle_pem().as_bytes())?;
            tracing::info!(path = %cert_path.display(), "created a new root CA");
            ca
        };
        let token_key = TokenKey::load_or_create(&dir.join(TOKEN_KEY))?;
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            ca,
            token_key,
        })
    }

    /// The federation's own identity, issued by the root.
    pub fn self_identity(&self) -> anyhow::Result<TlsIdentity> {
        let id = SpiffeId::new(&self.trust_domain, SYSTEM_NAMESPACE, "isthmus-federation");
        let (key, csr) = leaf_csr(&id)?;
        let chain = self.ca.sign_leaf(&csr, &id, SELF_TTL)?;
        Ok(TlsIdentity::new(Credentials::from_pem(
            key.serialize_der(),
            &chain,
            self.ca.bundle_pem(),
        )?))
    }
}
