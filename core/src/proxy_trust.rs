//! How a proxy follows its cluster's trust. The controller's `Mesh` resource carries the
//! trust bundle and the fingerprint of the CA that issues now: a new bundle replaces the
//! roots of every new handshake (open connections keep theirs), and a CA other than the
//! one that issued the proxy's certificate makes the proxy renew at once, which is how a
//! root rotation reaches every certificate without waiting for half-life. Certificates
//! issued in clusters removed from the federation are refused from the moment the `Mesh`
//! names them. The proxy reports what it trusts and who issued its certificate on its
//! discovery stream.

use std::sync::Arc;

use isthmus_proto::discovery::{CertificateReport, Mesh, Resource};
use prost::Message;
use tokio::sync::Notify;

use crate::tls::{bundle, Credentials, TlsIdentity};
use crate::xds::{Rejected, XdsHandler};

/// An [`XdsHandler`] that takes the trust part of `Mesh` resources before handing every
/// resource to the proxy's own handler. A `Mesh` whose bundle is unusable is rejected
/// whole (NACK), so the proxy keeps the previous one and the controller hears why.
pub struct FollowTrust<H> {
    inner: H,
    identity: TlsIdentity,
    /// Wakes the renewal task (see `CaClient::renew_forever`).
    renew_now: Arc<Notify>,
    /// The CA a renewal was last asked for, so that every push while it is under way
    /// does not ask again.
    asked_for: std::sync::Mutex<String>,
}

impl<H: XdsHandler> FollowTrust<H> {
    pub fn new(inner: H, identity: TlsIdentity, renew_now: Arc<Notify>) -> Self {
        Self {
            inner,
            identity,
            renew_now,
            asked_for: Default::default(),
        }
    }

    fn take(&self, mesh: &Mesh) -> Result<(), String> {
        let creds = self.identity.current();
        if !mesh.trust_bundle_pem.is_empty() && mesh.trust_bundle_pem != creds.bundle_pem {
            let next = creds
                .with_bundle(&mesh.trust_bundle_pem)
                .map_err(|e| format!("trust_bundle_pem: {e}"))?;
            tracing::info!(
                roots = ?bundle::fingerprints(&mesh.trust_bundle_pem).iter().map(|f| bundle::short(f)).collect::<Vec<_>>(),
                "trust bundle updated"
            );
            self.identity.update(next);
        }
        let removed: std::collections::BTreeSet<String> =
            mesh.removed_clusters.iter().cloned().collect();
        if *self.identity.removed_clusters() != removed {
            tracing::info!(clusters = ?removed, "certificates of removed clusters are refused");
            self.identity.set_removed_clusters(removed);
        }
        let issuer = creds.issuer_fingerprint();
        if !mesh.ca_fingerprint.is_empty() && issuer.as_deref() != Some(&mesh.ca_fingerprint) {
            let mut asked = self.asked_for.lock().unwrap_or_else(|p| p.into_inner());
            if *asked != mesh.ca_fingerprint {
                tracing::info!(
                    ca = bundle::short(&mesh.ca_fingerprint),
                    "the cluster's CA changed; renewing the certificate now"
                );
                asked.clone_from(&mesh.ca_fingerprint);
                self.renew_now.notify_one();
            }
        }
        Ok(())
    }
}

impl<H: XdsHandler> XdsHandler for FollowTrust<H> {
    fn apply(&self, type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected> {
        if type_url != isthmus_proto::type_url::MESH {
            return self.inner.apply(type_url, updated, removed);
        }
        let mut kept = Vec::with_capacity(updated.len());
        let mut rejected = Vec::new();
        for r in updated {
            // A body that does not decode is the inner handler's to report.
            let taken = Mesh::decode(r.body.as_slice()).map_or(Ok(()), |m| self.take(&m));
            match taken {
                Ok(()) => kept.push(r.clone()),
                Err(reason) => rejected.push(Rejected::new(&r.name, reason)),
            }
        }
        rejected.extend(self.inner.apply(type_url, &kept, removed));
        rejected
    }
}

/// What a proxy reports of its credentials.
pub fn report(creds: &Credentials) -> CertificateReport {
    CertificateReport {
        trusted_roots: bundle::fingerprints(&creds.bundle_pem),
        issuer: creds.issuer_fingerprint().unwrap_or_default(),
        not_after_unix: crate::admin::unix_seconds(creds.not_after) as i64,
    }
}
