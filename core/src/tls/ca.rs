//! Certificate authorities: the shared root (federation), each cluster's intermediate
//! (controller), and the signing of CSRs for exactly the identity a caller proved.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

/// Lifetime of the shared root when the federation creates one.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a cluster's intermediate CA.
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default lifetime of workload certificates.
pub const WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this long in the past to absorb clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate request is not a valid signed PKCS#10 CSR: {0}")]
    BadCsr(#[source] rcgen::Error),
    #[error("certificate request asks for {asked}, but the caller proved {proved}")]
    IdentityMismatch { asked: String, proved: String },
    #[error("certificate request must name exactly one SPIFFE ID in its URI SAN, found {0}")]
    SanCount(usize),
    #[error("signing failed: {0}")]
    Sign(#[source] rcgen::Error),
    #[error("CA certificate or key is unusable: {0}")]
    Load(#[source] rcgen::Error),
    #[error("this CA expired {0} s ago; it signs nothing until it is renewed")]
    Expired(u64),
}

/// A CA that can sign certificates: its key, its certificate, and the chain above it.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate followed by its parents, excluding the root (empty for a root).
    chain_pem: Vec<String>,
    /// The roots every certificate is verified against.
    bundle_pem: String,
    /// When this CA's certificate expires: nothing it signs outlives it.
    not_after: Option<OffsetDateTime>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("chain_len", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, ttl: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
}

fn ca_params(
    common_name: &str,
    trust_domain: &str,
    ttl: Duration,
    path_len: u8,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, ttl);
    params
}

/// Parameters of a leaf certificate for `id`, built from scratch: nothing a CSR asks for
/// beyond its public key reaches the certificate.
fn leaf_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let uri = id.to_string().try_into().map_err(CaError::Sign)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, ttl);
    Ok(params)
}

/// The common name the federation gives the CA of `cluster`. Only the root signs cluster
/// CAs, it sets this name itself from the cluster the caller proved, and a cluster CA
/// cannot sign another CA (path length 0): so a certificate whose chain passes through a
/// CA of this name was issued in that cluster.
pub fn cluster_ca_name(cluster: &str) -> String {
    format!("isthmus cluster {cluster}")
}

/// The cluster whose CA issued a leaf, from the chain above it (`intermediates`, as the
/// peer sent them; only meaningful once the chain is verified to a root).
pub fn issuing_cluster<C: AsRef<[u8]>>(intermediates: &[C]) -> Option<String> {
    let (_, ca) = x509_parser::parse_x509_certificate(intermediates.first()?.as_ref()).ok()?;
    let cn = ca.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix("isthmus cluster ").map(str::to_owned)
}

/// The SPIFFE ID a CSR asks for.
pub fn csr_identity(csr: &CertificateSigningRequestParams) -> Result<String, CaError> {
    let uris: Vec<String> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        })
        .collect();
    if uris.len() != 1 || csr.params.subject_alt_names.len() != 1 {
        return Err(CaError::SanCount(csr.params.subject_alt_names.len()));
    }
    Ok(uris.into_iter().next().expect("one element"))
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn new_root(trust_domain: &str) -> Result<(Self, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Sign)?;
        let params = ca_params(
            &format!("isthmus root {trust_domain}"),
            trust_domain,
            ROOT_TTL,
            1,
        );
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            not_after: Some(params.not_after),
            issuer: Issuer::new(params, key),
            chain_pem: Vec::new(),
            bundle_pem: cert.pem(),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key. `chain_pem` holds the CA's certificate and
    /// its parents up to, but excluding, the root; it is empty for a root.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Vec<String>,
        bundle_pem: String,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Load)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::Load)?;
        let not_after = super::parse_certs(cert_pem)
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|der| {
                let (_, x) = x509_parser::parse_x509_certificate(&der).ok()?;
                Some(x.validity().not_after.to_datetime())
            });
        Ok(Self {
            issuer,
            chain_pem,
            bundle_pem,
            not_after,
        })
    }

    /// When this CA's certificate expires.
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        self.not_after.map(std::time::SystemTime::from)
    }

    /// Caps a certificate's validity at this CA's own.
    fn within_lifetime(&self, params: &mut CertificateParams) -> Result<(), CaError> {
        if let Some(end) = self.not_after {
            let now = OffsetDateTime::now_utc();
            if end <= now {
                return Err(CaError::Expired((now - end).whole_seconds().max(0) as u64));
            }
            params.not_after = params.not_after.min(end);
        }
        Ok(())
    }

    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Signs a cluster's intermediate CA from its CSR. The CA's name is set here, never
    /// taken from the request.
    pub fn sign_intermediate(
        &self,
        csr_pem: &str,
        cluster: &str,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<String, CaError> {
        let csr = parse_csr(csr_pem)?;
        let mut params = ca_params(&cluster_ca_name(cluster), trust_domain, ttl, 0);
        self.within_lifetime(&mut params)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(cert.pem())
    }

    /// Signs a leaf certificate for `proved`, the identity the caller authenticated as; the
    /// CSR must ask for exactly that identity. Returns the leaf followed by this CA's chain.
    pub fn sign_leaf(
        &self,
        csr_pem: &str,
        proved: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let csr = parse_csr(csr_pem)?;
        let asked = csr_identity(&csr)?;
        if asked != proved.to_string() {
            return Err(CaError::IdentityMismatch {
                asked,
                proved: proved.to_string(),
            });
        }
        let mut params = leaf_params(proved, ttl)?;
        self.within_lifetime(&mut params)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }
}

impl CertificateAuthority {
    /// A serving certificate for a component's own HTTPS endpoint reached by name (the
    /// controller's admission webhook, which the Kubernetes API server calls): a new P-256
    /// key, and the leaf for `dns_names` and `ips` followed by this CA's chain. The key
    /// is made here, in the process that serves with it.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, Vec<String>), CaError> {
        let key = KeyPair::generate().map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for name in dns_names {
            let name = name.clone().try_into().map_err(CaError::Sign)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, ttl);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok((key.serialize_pem(), chain))
    }
}

/// A new P-256 key and a CSR for a leaf certificate naming `id`.
pub fn leaf_csr(id: &SpiffeId) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::Sign)?;
    let mut params = CertificateParams::default();
    let uri = id.to_string().try_into().map_err(CaError::Sign)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(CaError::Sign)?;
    Ok((key, csr.pem().map_err(CaError::Sign)?))
}

/// A new P-256 key and a CSR for an intermediate CA.
pub fn ca_csr() -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate().map_err(CaError::Sign)?;
    let params = CertificateParams::default();
    let csr = params.serialize_request(&key).map_err(CaError::Sign)?;
    Ok((key, csr.pem().map_err(CaError::Sign)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_only_the_proved_identity() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let me = SpiffeId::new("td", "ns", "me");
        let other = SpiffeId::new("td", "ns", "other");
        let (_key, csr) = leaf_csr(&other).expect("csr");
        let err = root
            .sign_leaf(&csr, &me, WORKLOAD_TTL)
            .expect_err("must refuse");
        assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
        let (_key, csr) = leaf_csr(&me).expect("csr");
        assert_eq!(
            root.sign_leaf(&csr, &me, WORKLOAD_TTL)
                .expect("signed")
                .len(),
            1
        );
    }

    #[test]
    fn refuses_garbage_csrs() {
        let (root, _) = CertificateAuthority::new_root("td").expect("root");
        let me = SpiffeId::new("td", "ns", "me");
        assert!(matches!(
            root.sign_leaf("not a csr", &me, WORKLOAD_TTL),
            Err(CaError::BadCsr(_))
        ));
    }
}
