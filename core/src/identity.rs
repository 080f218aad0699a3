//! Workload identity: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// Namespace of the mesh's own components (controllers, gateways).
pub const SYSTEM_NAMESPACE: &str = "isthmus-system";
/// Service account of east-west gateways.
pub const GATEWAY_SERVICE_ACCOUNT: &str = "isthmus-eastwestgateway";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "`{0}` is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/<service-account>"
    )]
    Path(String),
    #[error("`{0}` has an invalid trust domain")]
    TrustDomain(String),
}

/// A workload identity. Cheap to clone (shared strings): every request's target carries one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: std::sync::Arc<str>,
    namespace: std::sync::Arc<str>,
    service_account: std::sync::Arc<str>,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Identity of the east-west gateways of every cluster.
    pub fn gateway(trust_domain: &str) -> Self {
        Self::new(trust_domain, SYSTEM_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
    }

    /// Identity of one cluster's controller. The cluster is part of the identity so that the
    /// federation can tell which cluster a connection speaks for.
    pub fn controller(trust_domain: &str, cluster: &str) -> Self {
        Self::new(
            trust_domain,
            SYSTEM_NAMESPACE,
            &format!("isthmus-controller.{cluster}"),
        )
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The cluster a controller identity speaks for, `None` for other identities.
    pub fn controller_cluster(&self) -> Option<&str> {
        if &*self.namespace != SYSTEM_NAMESPACE {
            return None;
        }
        self.service_account.strip_prefix("isthmus-controller.")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Whether `s` can be a trust domain (what a SPIFFE ID's authority may be).
pub fn is_trust_domain(s: &str) -> bool {
    valid_segment(s)
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Path(s.to_owned()))?;
        if !valid_segment(td) {
            return Err(IdentityError::TrustDomain(s.to_owned()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if valid_segment(ns) && valid_segment(sa) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(IdentityError::Path(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/frontend"
            .parse()
            .expect("valid");
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "frontend");
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/demo/sa/frontend");
    }

    #[test]
    fn rejects_malformed_ids() {
        assert!("https://x/ns/a/sa/b".parse::<SpiffeId>().is_err());
        assert!("spiffe://x/ns/a".parse::<SpiffeId>().is_err());
        assert!("spiffe://x/ns/a/sa/b/extra".parse::<SpiffeId>().is_err());
        assert!("spiffe:///ns/a/sa/b".parse::<SpiffeId>().is_err());
    }

    #[test]
    fn controller_ids_name_their_cluster() {
        let id = SpiffeId::controller("td", "east");
        let parsed: SpiffeId = id.to_string().parse().expect("valid");
        assert_eq!(parsed.controller_cluster(), Some("east"));
        assert_eq!(SpiffeId::gateway("td").controller_cluster(), None);
    }
}
