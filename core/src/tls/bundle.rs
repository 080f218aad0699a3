//! Trust bundles that hold several roots, so a root can be rotated with no outage: every
//! handshake accepts a chain to any root of the current bundle. Roots are named by their
//! SHA-256 fingerprint wherever components report what they trust (proxies to their
//! controller, controllers to the federation), and a bundle that arrives over the wire is
//! checked before anything trusts it.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{parse_certs, TlsError};

/// Roots one bundle may hold: a rotation needs two; more is a mistake or an attack.
pub const MAX_ROOTS: usize = 8;

/// The SHA-256 of a certificate's DER, in lowercase hex: how roots and CAs are named in
/// reports, dumps and the rotation's progress.
pub fn fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// The SHA-256 of `bytes`, in lowercase hex (as `sha256sum` prints it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 12 hex digits of a fingerprint, for people.
pub fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// Reads a bundle received from elsewhere: PEM certificates, at least one and at most
/// [`MAX_ROOTS`], each a CA certificate. Returns them in order.
pub fn parse_bundle(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = parse_certs(pem)?;
    if certs.len() > MAX_ROOTS {
        return Err(TlsError::Bundle(format!(
            "{} roots, at most {MAX_ROOTS} are accepted",
            certs.len()
        )));
    }
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::Bundle(format!("root {}: {e}", i + 1)))?;
        if !cert.is_ca() {
            return Err(TlsError::Bundle(format!(
                "root {} ({}) is not a CA certificate",
                i + 1,
                cert.subject()
            )));
        }
    }
    Ok(certs)
}

/// The fingerprints of a bundle's roots, in order; empty when it does not parse.
pub fn fingerprints(pem: &str) -> Vec<String> {
    parse_certs(pem)
        .map(|certs| certs.iter().map(|c| fingerprint(c)).collect())
        .unwrap_or_default()
}

/// Whether `issuer` signed `cert`: its subject is the certificate's issuer and its key
/// verifies the certificate's signature.
pub fn issued_by(cert: &[u8], issuer: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, issuer))) = (
        X509Certificate::from_der(cert),
        X509Certificate::from_der(issuer),
    ) else {
        return false;
    };
    cert.issuer() == issuer.subject() && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

/// The root of `bundle_pem` that signed `cert` (a cluster's CA certificate), by
/// fingerprint.
pub fn issuing_root(cert: &[u8], bundle_pem: &str) -> Option<String> {
    parse_certs(bundle_pem)
        .ok()?
        .iter()
        .find(|root| issued_by(cert, root))
        .map(|root| fingerprint(root))
}

/// The union of two bundles, `first`'s roots first, each root once (either may be empty).
pub fn union(first: &str, second: &str) -> Result<String, TlsError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for pem in [first, second].into_iter().filter(|p| !p.trim().is_empty()) {
        for der in parse_certs(pem)? {
            if seen.insert(fingerprint(&der)) {
                out.push_str(&to_pem(&der));
            }
        }
    }
    Ok(out)
}

/// One certificate as PEM.
pub fn to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;
    use crate::tls::ca::{ca_csr, leaf_csr, CertificateAuthority, WORKLOAD_TTL};

    fn der(pem: &str) -> Vec<u8> {
        parse_certs(pem).expect("pem")[0].to_vec()
    }

    #[test]
    fn a_cluster_ca_is_traced_to_the_root_that_signed_it_among_roots_with_one_name() {
        let (old, _) = CertificateAuthority::new_root("td").expect("root");
        let (new, _) = CertificateAuthority::new_root("td").expect("root");
        let bundle = union(old.bundle_pem(), new.bundle_pem()).expect("union");
        assert_eq!(fingerprints(&bundle).len(), 2);
        assert_eq!(parse_bundle(&bundle).expect("bundle").len(), 2);
        let (_, csr) = ca_csr().expect("csr");
        let cluster = new
            .sign_intermediate(&csr, "east", "td", crate::tls::ca::INTERMEDIATE_TTL)
            .expect("sign");
        assert_eq!(
            issuing_root(&der(&cluster), &bundle),
            Some(fingerprint(&der(new.bundle_pem())))
        );
        assert_eq!(issuing_root(&der(&cluster), old.bundle_pem()), None);
        // The union is idempotent and keeps order.
        assert_eq!(union(&bundle, new.bundle_pem()).expect("union"), bundle);
    }

    #[test]
    fn a_bundle_of_leaves_or_of_too_many_roots_is_refused_by_name() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let id = SpiffeId::new("td", "demo", "a");
        let (_, csr) = leaf_csr(&id).expect("csr");
        let leaf = root.sign_leaf(&csr, &id, WORKLOAD_TTL).expect("leaf");
        let err = parse_bundle(&leaf[0]).expect_err("a leaf is no root");
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
        let many = root.bundle_pem().repeat(MAX_ROOTS + 1);
        let err = parse_bundle(&many).expect_err("too many");
        assert!(err.to_string().contains("at most 8"), "{err}");
        assert!(parse_bundle("").is_err());
    }
}
