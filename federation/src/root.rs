//! The shared root CA, the trust bundle, and the federation's own identity. The root is
//! created once and kept in the state folder, or brought by the user (read at the first
//! start and kept there from then on). During a root rotation (see `rotation.rs`) a second
//! root sits beside it: the bundle holds both, and the one that signs can be either.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use isthmus_core::fsutil::write_private;
use isthmus_core::identity::{SpiffeId, SYSTEM_NAMESPACE};
use isthmus_core::tls::ca::{leaf_csr, CertificateAuthority};
use isthmus_core::tls::{bundle, parse_certs, Credentials, TlsIdentity};
use isthmus_core::token::TokenKey;

use crate::Config;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
/// The root a rotation moves to, until it completes.
pub const NEXT_CERT: &str = "root-next-cert.pem";
pub const NEXT_KEY: &str = "root-next-key.pem";
pub const TOKEN_KEY: &str = "join-token.key";
/// Audience of join tokens.
pub const JOIN_AUDIENCE: &str = "federation";
/// Audience of operator tokens (`isthmus root rotate`).
pub const OPERATOR_AUDIENCE: &str = "federation-operator";
/// Lifetime of the federation's own serving certificate (re-issued at each start).
const SELF_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A root CA: its certificate (PEM) and the CA that signs with it.
pub struct RootCa {
    pub ca: CertificateAuthority,
    pub cert_pem: String,
    pub fingerprint: String,
}

impl RootCa {
    fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Self> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        Self::from_pem(&cert_pem, &key_pem)
            .with_context(|| format!("loading the root CA from {}", cert_path.display()))
    }

    /// A root from PEM: exactly one CA certificate and its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let certs = bundle::parse_bundle(cert_pem)?;
        anyhow::ensure!(
            certs.len() == 1,
            "a root is one certificate, found {}",
            certs.len()
        );
        let ca = CertificateAuthority::from_pem(cert_pem, key_pem, Vec::new(), cert_pem.into())?;
        Ok(Self {
            ca,
            cert_pem: cert_pem.to_owned(),
            fingerprint: bundle::fingerprint(&certs[0]),
        })
    }

    /// A new self-signed root; returns it and its key PEM.
    pub fn create(trust_domain: &str) -> anyhow::Result<(Self, String)> {
        let (ca, key_pem) = CertificateAuthority::new_root(trust_domain)?;
        let cert_pem = ca.bundle_pem().to_owned();
        let der = parse_certs(&cert_pem)?;
        Ok((
            Self {
                fingerprint: bundle::fingerprint(&der[0]),
                ca,
                cert_pem,
            },
            key_pem,
        ))
    }

    fn save(&self, key_pem: &str, cert_path: &Path, key_path: &Path) -> std::io::Result<()> {
        write_private(key_path, key_pem.as_bytes())?;
        write_private(cert_path, self.cert_pem.as_bytes())
    }
}

/// Which root signs and which roots are trusted, now.
pub struct Trust {
    pub signing: Arc<RootCa>,
    pub bundle_pem: String,
}

pub struct Root {
    pub trust_domain: String,
    pub token_key: TokenKey,
    /// Lifetime of the cluster CAs and controller certificates the root signs.
    pub cluster_ca_ttl: Duration,
    pub controller_ttl: Duration,
    dir: PathBuf,
    /// The root in force outside a rotation (the old one during it).
    active: RwLock<Arc<RootCa>>,
    /// The root a rotation moves to.
    next: RwLock<Option<Arc<RootCa>>>,
    trust: RwLock<Arc<Trust>>,
    /// The federation's serving and client identity, reissued when the signing root
    /// changes.
    pub identity: TlsIdentity,
}

/// Mints a join token for `cluster`, signed with the key in `state_dir`.
pub fn mint_join_token(state_dir: &Path, cluster: &str, ttl: Duration) -> anyhow::Result<String> {
    let key = TokenKey::load_or_create(&state_dir.join(TOKEN_KEY))?;
    Ok(key.mint(cluster, JOIN_AUDIENCE, ttl))
}

/// Mints a short-lived operator token (for `isthmus root rotate`), signed with the key in
/// `state_dir`: whoever can read the federation's state folder may operate it.
pub fn mint_operator_token(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join(TOKEN_KEY);
    anyhow::ensure!(
        path.exists(),
        "{} does not exist: is {} the federation's state folder?",
        path.display(),
        state_dir.display()
    );
    let key = TokenKey::load_or_create(&path)?;
    Ok(key.mint("operator", OPERATOR_AUDIENCE, Duration::from_secs(300)))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn lock_mut<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn self_credentials(trust_domain: &str, trust: &Trust) -> anyhow::Result<Credentials> {
    let id = SpiffeId::new(trust_domain, SYSTEM_NAMESPACE, "isthmus-federation");
    let (key, csr) = leaf_csr(&id)?;
    let chain = trust.signing.ca.sign_leaf(&csr, &id, SELF_TTL)?;
    Ok(Credentials::from_pem(
        key.serialize_der(),
        &chain,
        &trust.bundle_pem,
    )?)
}

impl Root {
    pub fn load_or_create(config: &Config) -> anyhow::Result<Self> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state folder {}", dir.display()))?;
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        let active = match (&config.root_cert, &config.root_key) {
            _ if cert_path.exists() => {
                let root = RootCa::load(&cert_path, &key_path)?;
                if let Some(given) = &config.root_cert {
                    if read(given)? != root.cert_pem {
                        tracing::warn!(given = %given.display(), kept = %cert_path.display(), "the root in the state folder (from a rotation) is in force; --root-cert is read only at the first start");
                    }
                }
                root
            }
            (Some(c), Some(k)) => {
                let root = RootCa::load(c, k)?;
                root.save(&read(k)?, &cert_path, &key_path)?;
                tracing::info!(path = %c.display(), "using the root CA given");
                root
            }
            (None, None) => {
                let (root, key_pem) = RootCa::create(&config.trust_domain)?;
                root.save(&key_pem, &cert_path, &key_path)?;
                tracing::info!(path = %cert_path.display(), "created a new root CA");
                root
            }
            _ => anyhow::bail!("--root-cert and --root-key must be given together"),
        };
        let next = if dir.join(NEXT_CERT).exists() {
            Some(Arc::new(RootCa::load(
                &dir.join(NEXT_CERT),
                &dir.join(NEXT_KEY),
            )?))
        } else {
            None
        };
        let token_key = TokenKey::load_or_create(&dir.join(TOKEN_KEY))?;
        let active = Arc::new(active);
        let trust = Trust {
            bundle_pem: active.cert_pem.clone(),
            signing: active.clone(),
        };
        let identity = TlsIdentity::new(self_credentials(&config.trust_domain, &trust)?);
        Ok(Self {
            trust_domain: config.trust_domain.clone(),
            token_key,
            cluster_ca_ttl: config.cluster_ca_ttl,
            controller_ttl: config.controller_cert_ttl,
            dir: dir.clone(),
            active: RwLock::new(active),
            next: RwLock::new(next),
            trust: RwLock::new(Arc::new(trust)),
            identity,
        })
    }

    pub fn trust(&self) -> Arc<Trust> {
        lock(&self.trust).clone()
    }

    pub fn active(&self) -> Arc<RootCa> {
        lock(&self.active).clone()
    }

    pub fn next(&self) -> Option<Arc<RootCa>> {
        lock(&self.next).clone()
    }

    /// Puts `root` (with its key) beside the active one, as the rotation's target.
    pub fn set_next(&self, root: RootCa, key_pem: &str) -> anyhow::Result<()> {
        root.save(key_pem, &self.dir.join(NEXT_CERT), &self.dir.join(NEXT_KEY))
            .context("saving the new root")?;
        *lock_mut(&self.next) = Some(Arc::new(root));
        Ok(())
    }

    /// The rotation is over: the next root becomes the active one (on disk first).
    pub fn promote_next(&self) -> anyhow::Result<()> {
        let Some(next) = self.next() else {
            return Ok(());
        };
        let key = read(&self.dir.join(NEXT_KEY))?;
        next.save(&key, &self.dir.join(ROOT_CERT), &self.dir.join(ROOT_KEY))
            .context("saving the new root as the active one")?;
        *lock_mut(&self.active) = next;
        *lock_mut(&self.next) = None;
        let _ = std::fs::remove_file(self.dir.join(NEXT_CERT));
        let _ = std::fs::remove_file(self.dir.join(NEXT_KEY));
        Ok(())
    }

    /// Signs with `signing` and trusts `roots` from now on; the federation's own
    /// certificate is reissued when the signing root changes.
    pub fn set_trust(&self, signing: Arc<RootCa>, roots: &[&RootCa]) -> anyhow::Result<()> {
        let mut bundle_pem = String::new();
        for r in roots {
            bundle_pem = bundle::union(&bundle_pem, &r.cert_pem)?;
        }
        let trust = Trust {
            signing,
            bundle_pem,
        };
        let current = self.trust();
        if current.signing.fingerprint == trust.signing.fingerprint {
            if current.bundle_pem != trust.bundle_pem {
                self.identity
                    .update(self.identity.current().with_bundle(&trust.bundle_pem)?);
            }
        } else {
            self.identity
                .update(self_credentials(&self.trust_domain, &trust)?);
        }
        *lock_mut(&self.trust) = Arc::new(trust);
        Ok(())
    }
}
