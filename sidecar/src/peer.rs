//! Workload metadata for telemetry: who this sidecar serves, and who is at the other end of
//! a request, as Istio's metric labels name them (workload, namespace, principal, app,
//! version, canonical service and revision, cluster).
//!
//! Sidecars exchange it as Istio's metadata exchange does, in one internal header: the
//! calling sidecar sends its own in the request (`x-isthmus-peer`), the receiving one
//! answers with its own in the response. The header only ever travels between sidecars
//! inside mTLS and is stripped at every app boundary. A receiving sidecar takes namespace
//! and principal from the caller's certificate, never from the header. Every distinct
//! value is interned once ([`Workloads`]) and gets an id, so a request's label set is
//! hashed by ids rather than by ~25 strings; the table is bounded, and values past the
//! bound (a peer inventing names) count as `unknown`.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, LazyLock, RwLock};

use http::{HeaderName, HeaderValue};
use isthmus_core::identity::SpiffeId;

use crate::metrics::Fx;

/// The request and response header that carries a sidecar's own workload metadata.
pub const PEER: HeaderName = HeaderName::from_static("x-isthmus-peer");

/// Distinct peers remembered; past this, new ones are `unknown` (bounded label values).
const MAX_PEERS: usize = 4096;

/// Longest value accepted for one field (a DNS name); longer reads as `unknown`.
const MAX_FIELD: usize = 253;

/// A workload as telemetry describes it; `unknown` where a value is not known.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Unique per distinct value within this process; the identity used in hashing.
    id: u64,
    /// The header that tells a peer about this workload, made when it is interned.
    header: HeaderValue,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    pub principal: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub cluster: Arc<str>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload::blank()
    }
}

impl Workload {
    pub fn id(&self) -> u64 {
        self.id
    }

    fn fields(&self) -> [(&'static str, &Arc<str>); 8] {
        [
            ("w", &self.name),
            ("n", &self.namespace),
            ("p", &self.principal),
            ("a", &self.app),
            ("v", &self.version),
            ("s", &self.canonical_service),
            ("r", &self.canonical_revision),
            ("c", &self.cluster),
        ]
    }

    fn field_mut(&mut self, key: &str) -> Option<&mut Arc<str>> {
        Some(match key {
            "w" => &mut self.name,
            "n" => &mut self.namespace,
            "p" => &mut self.principal,
            "a" => &mut self.app,
            "v" => &mut self.version,
            "s" => &mut self.canonical_service,
            "r" => &mut self.canonical_revision,
            "c" => &mut self.cluster,
            _ => return None,
        })
    }

    fn blank() -> Self {
        let u = crate::metrics::fixed::unknown();
        Workload {
            id: 0,
            header: HeaderValue::from_static(""),
            name: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: u.clone(),
            cluster: u,
        }
    }

    /// The header value that tells a peer about this workload.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    fn encode(&self) -> HeaderValue {
        let text: Vec<String> = self
            .fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        HeaderValue::from_str(&text.join(";")).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Reads a peer's header: known fields whose values are plain names; anything else is
    /// `unknown`. Never fails: a bad header only costs the labels it would have set.
    fn parse(header: &[u8]) -> Self {
        let mut w = Workload::blank();
        let Ok(text) = std::str::from_utf8(header) else {
            return w;
        };
        for (k, v) in text.split(';').filter_map(|kv| kv.split_once('=')) {
            if let Some(field) = w.field_mut(k) {
                if plain(v) {
                    *field = v.into();
                }
            }
        }
        w
    }

    /// This sidecar's own workload: its name (the pod's owner, as the controller says, or
    /// the WorkloadEntry's own name), service account, and the labels the controller
    /// pushed, with Istio's precedence for app, version and canonical names.
    pub fn own(
        name: &str,
        id: &SpiffeId,
        cluster: &str,
        labels: &BTreeMap<String, String>,
    ) -> Workload {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
                .map(|v| Arc::<str>::from(v.as_str()))
        };
        let name: Arc<str> = name.into();
        let app = label(&["app", "app.kubernetes.io/name"]);
        let version = label(&["version", "app.kubernetes.io/version"]);
        Workload {
            id: 0,
            header: HeaderValue::from_static(""),
            canonical_service: label(&["service.istio.io/canonical-name"])
                .or_else(|| app.clone())
                .unwrap_or_else(|| name.clone()),
            canonical_revision: label(&["service.istio.io/canonical-revision"])
                .or_else(|| version.clone())
                .unwrap_or_else(|| "latest".into()),
            name,
            namespace: id.namespace().into(),
            principal: id.to_string().into(),
            app: app.unwrap_or_else(crate::metrics::fixed::unknown),
            version: version.unwrap_or_else(crate::metrics::fixed::unknown),
            cluster: cluster.into(),
        }
    }
}

/// A value fit for a label: a name, a version or a SPIFFE ID, of bounded length.
fn plain(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_FIELD
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/".contains(&b))
}

/// Interned workloads, by the header that described them (and, on the receiving side, the
/// identity the caller's certificate proved). Found by a hash of both without copying
/// either, so a request costs a hash and a comparison; entries are checked against the
/// bytes, so colliding hashes only cost a comparison more (and the table is bounded).
#[derive(Default)]
pub struct Workloads {
    table: RwLock<HashMap<u64, Vec<Entry>, BuildHasherDefault<Fx>>>,
}

struct Entry {
    header: Box<[u8]>,
    proven: Option<SpiffeId>,
    workload: Arc<Workload>,
}

impl Entry {
    fn is(&self, header: &[u8], proven: Option<&SpiffeId>) -> bool {
        &*self.header == header && self.proven.as_ref() == proven
    }
}

fn key(header: &[u8], proven: Option<&SpiffeId>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = Fx::default();
    h.write(header);
    proven.hash(&mut h);
    h.finish()
}

static UNKNOWN: LazyLock<Arc<Workload>> = LazyLock::new(|| Arc::new(Workload::blank()));

impl Workloads {
    /// The workload nothing is known of (id 0).
    pub fn unknown() -> Arc<Workload> {
        UNKNOWN.clone()
    }

    /// The workload a peer's header describes. `proven`, the peer's certificate identity,
    /// overrides what the header says of namespace and principal.
    pub fn described(&self, header: &[u8], proven: Option<&SpiffeId>) -> Arc<Workload> {
        let k = key(header, proven);
        if let Some(w) = self.find(k, header, proven) {
            return w;
        }
        let mut w = Workload::parse(header);
        if let Some(id) = proven {
            w.namespace = id.namespace().into();
            w.principal = id.to_string().into();
        }
        self.intern(k, header, proven, w)
    }

    /// This sidecar's own workload, interned so that an unchanged push keeps its id.
    pub fn own(&self, w: Workload) -> Arc<Workload> {
        let header = w.encode();
        let k = key(header.as_bytes(), None);
        if let Some(w) = self.find(k, header.as_bytes(), None) {
            return w;
        }
        self.intern(k, header.as_bytes(), None, w)
    }

    fn find(&self, k: u64, header: &[u8], proven: Option<&SpiffeId>) -> Option<Arc<Workload>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let entries = table.get(&k)?;
        entries
            .iter()
            .find(|e| e.is(header, proven))
            .map(|e| e.workload.clone())
    }

    fn intern(
        &self,
        k: u64,
        header: &[u8],
        proven: Option<&SpiffeId>,
        mut w: Workload,
    ) -> Arc<Workload> {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        let count: usize = table.values().map(Vec::len).sum();
        let entries = table.entry(k).or_default();
        if let Some(e) = entries.iter().find(|e| e.is(header, proven)) {
            return e.workload.clone();
        }
        if count >= MAX_PEERS {
            return Self::unknown();
        }
        w.id = count as u64 + 1;
        w.header = w.encode();
        let w = Arc::new(w);
        entries.push(Entry {
            header: header.into(),
            proven: proven.cloned(),
            workload: w.clone(),
        });
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn own_metadata_follows_istio_label_precedence() {
        let id = SpiffeId::new("cluster.local", "shop", "reviews");
        let w = Workload::own(
            "reviews-v2",
            &id,
            "east",
            &labels(&[("app", "reviews"), ("version", "v2")]),
        );
        assert_eq!(&*w.name, "reviews-v2");
        assert_eq!(&*w.namespace, "shop");
        assert_eq!(&*w.principal, "spiffe://cluster.local/ns/shop/sa/reviews");
        assert_eq!(&*w.canonical_service, "reviews");
        assert_eq!(&*w.canonical_revision, "v2");
        let bare = Workload::own("worker", &id, "east", &labels(&[]));
        assert_eq!(&*bare.app, "unknown");
        assert_eq!(&*bare.canonical_service, "worker");
        assert_eq!(&*bare.canonical_revision, "latest");
    }

    #[test]
    fn the_header_round_trips_and_the_certificate_wins() {
        let table = Workloads::default();
        let id = SpiffeId::new("cluster.local", "shop", "reviews");
        let own = table.own(Workload::own(
            "reviews",
            &id,
            "east",
            &labels(&[("app", "r")]),
        ));
        let header = own.header();
        let seen = table.described(header.as_bytes(), None);
        assert_eq!(seen.name, own.name);
        assert_eq!(seen.cluster, own.cluster);
        assert_eq!(seen.app, own.app);
        // A header that claims another namespace does not get it past the certificate.
        let liar = "w=x;n=kube-system;p=spiffe://cluster.local/ns/kube-system/sa/admin";
        let proven = table.described(liar.as_bytes(), Some(&id));
        assert_eq!(&*proven.namespace, "shop");
        assert_eq!(
            &*proven.principal,
            "spiffe://cluster.local/ns/shop/sa/reviews"
        );
        assert_eq!(&*proven.name, "x");
        // The same header is the same workload, by id.
        assert_eq!(
            table.described(liar.as_bytes(), Some(&id)).id(),
            proven.id()
        );
    }

    #[test]
    fn invented_values_are_bounded() {
        let table = Workloads::default();
        let junk = table.described("w=a b;a=<script>;v=".as_bytes(), None);
        assert_eq!(&*junk.name, "unknown");
        assert_eq!(&*junk.app, "unknown");
        assert_eq!(&*junk.version, "unknown");
        for i in 0..MAX_PEERS + 10 {
            table.described(format!("w=w{i}").as_bytes(), None);
        }
        let late = table.described(b"w=one-too-many", None);
        assert_eq!(late.id(), 0);
        assert_eq!(&*late.name, "unknown");
    }
}
