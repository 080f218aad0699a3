//! What each connected proxy holds, as `istioctl proxy-status` shows it for Istio: per
//! resource type, whether everything pushed is acknowledged (`SYNCED`), still unanswered
//! (`STALE`), rejected (`NACK`, with the proxy's reason) or nothing was sent yet
//! (`NOT SENT`). Kept by the discovery streams, read by the controller's `/config_dump`
//! (`proxies`), which `isthmus status` prints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use isthmus_core::tls::bundle::short;
use isthmus_proto::discovery::CertificateReport;
use isthmus_proto::federation::TrustReport;
use tokio::sync::watch;

#[derive(Debug, Default)]
struct TypeSync {
    pushes: u64,
    /// Responses of this type not yet ACKed or NACKed.
    in_flight: usize,
    last_push: Option<SystemTime>,
    last_ack: Option<SystemTime>,
    /// The proxy's reason, while its last answer of this type was a NACK.
    nack: Option<String>,
}

#[derive(Debug)]
struct ProxySync {
    name: String,
    role: String,
    identity: String,
    connected: SystemTime,
    types: BTreeMap<String, TypeSync>,
    /// What the proxy last reported of its certificate and trust.
    certificate: Option<CertificateReport>,
    /// The requests per second its global rate limits were last offered, and when.
    demand: Option<(std::time::Instant, BTreeMap<String, f64>)>,
}

/// Every proxy with an open stream to this controller.
#[derive(Debug, Default)]
pub struct Proxies {
    streams: Mutex<BTreeMap<u64, ProxySync>>,
    next: AtomicU64,
    /// Bumped when a proxy connects, leaves or reports its certificate.
    changes: watch::Sender<u64>,
}

/// Proxies named in a trust report as lagging, at most.
const LAGGING_NAMED: usize = 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) use isthmus_core::admin::unix_seconds as unix;

impl Proxies {
    /// Each global rate limit's demand in this cluster: the sum of what its proxies
    /// reported within `fresh`, by `namespace/service/limit`. A limit a proxy reports
    /// (even at no demand) is one this cluster enforces.
    pub fn demand(&self, fresh: std::time::Duration) -> BTreeMap<String, f64> {
        let mut sum: BTreeMap<String, f64> = BTreeMap::new();
        for p in lock(&self.streams).values() {
            let Some((at, offered)) = &p.demand else {
                continue;
            };
            if at.elapsed() > fresh {
                continue;
            }
            for (key, rps) in offered {
                *sum.entry(key.clone()).or_default() += rps;
            }
        }
        sum
    }

    /// A stream opened; it is listed until the handle drops.
    pub fn connect(self: &Arc<Self>, name: &str, role: &str, identity: &str) -> ProxyHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.streams).insert(
            id,
            ProxySync {
                name: name.to_owned(),
                role: role.to_owned(),
                identity: identity.to_owned(),
                connected: SystemTime::now(),
                types: BTreeMap::new(),
                certificate: None,
                demand: None,
            },
        );
        self.changes.send_modify(|v| *v += 1);
        ProxyHandle {
            proxies: self.clone(),
            id,
        }
    }

    /// The proxies and their state per type, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        lock(&self.streams)
            .values()
            .map(|p| {
                let types: serde_json::Map<String, serde_json::Value> = p
                    .types
                    .iter()
                    .map(|(t, s)| {
                        let state = match (&s.nack, s.in_flight, s.pushes) {
                            (Some(_), _, _) => "NACK",
                            (None, _, 0) => "NOT SENT",
                            (None, 0, _) => "SYNCED",
                            (None, _, _) => "STALE",
                        };
                        (
                            t.clone(),
                            serde_json::json!({
                                "state": state,
                                "pushes": s.pushes,
                                "last_push_unix": s.last_push.map(unix),
                                "last_ack_unix": s.last_ack.map(unix),
                                "nack": s.nack,
                            }),
                        )
                    })
                    .collect();
                let certificate = p.certificate.as_ref().map(|c| {
                    serde_json::json!({
                        "trusted_roots": c.trusted_roots.iter().map(|r| short(r)).collect::<Vec<_>>(),
                        "issuer": short(&c.issuer),
                        "not_after_unix": c.not_after_unix,
                    })
                });
                serde_json::json!({
                    "name": p.name,
                    "role": p.role,
                    "identity": p.identity,
                    "connected_unix": unix(p.connected),
                    "types": types,
                    "certificate": certificate,
                })
            })
            .collect()
    }
}

impl Proxies {
    /// Changes to the proxies' certificates (and to who is connected).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How far the proxies have followed the cluster's trust: which roots they accept,
    /// and whether the current CA issued their certificate. Proxies that have not
    /// reported yet are not counted.
    pub fn trust_report(&self, issuing: &crate::trust::Issuing) -> TrustReport {
        let streams = lock(&self.streams);
        let mut report = TrustReport {
            ca_fingerprint: issuing.ca_fingerprint.clone(),
            ca_root: issuing.ca_root.clone().unwrap_or_default(),
            controller_roots: issuing.roots.clone(),
            ..Default::default()
        };
        for p in streams.values() {
            let Some(c) = &p.certificate else { continue };
            report.proxies += 1;
            for root in &c.trusted_roots {
                *report.trusting.entry(root.clone()).or_default() += 1;
            }
            let current = c.issuer == issuing.ca_fingerprint;
            report.current_certificates += u32::from(current);
            let mut what = Vec::new();
            if c.trusted_roots != issuing.roots {
                what.push(format!(
                    "trusts {:?}",
                    c.trusted_roots.iter().map(|r| short(r)).collect::<Vec<_>>()
                ));
            }
            if !current {
                what.push(format!("certificate from CA {}", short(&c.issuer)));
            }
            if !what.is_empty() && report.lagging.len() < LAGGING_NAMED {
                report
                    .lagging
                    .push(format!("{} ({}): {}", p.name, p.role, what.join(", ")));
            }
        }
        report
    }
}

/// One stream's entry in [`Proxies`].
#[derive(Debug)]
pub struct ProxyHandle {
    proxies: Arc<Proxies>,
    id: u64,
}

impl ProxyHandle {
    fn with(&self, type_url: &str, f: impl FnOnce(&mut TypeSync)) {
        if let Some(p) = lock(&self.proxies.streams).get_mut(&self.id) {
            f(p.types.entry(type_url.to_owned()).or_default());
        }
    }

    /// The proxy subscribed to `type_url`.
    pub fn subscribed(&self, type_url: &str) {
        self.with(type_url, |_| {});
    }

    /// A response of `type_url` went out; `in_flight` of its type now await an answer.
    pub fn pushed(&self, type_url: &str, in_flight: usize) {
        self.with(type_url, |s| {
            s.pushes += 1;
            s.in_flight = in_flight;
            s.last_push = Some(SystemTime::now());
        });
    }

    /// The proxy reported the demand on the global rate limits it enforces.
    pub fn demand(&self, offered_rps: BTreeMap<String, f64>) {
        if let Some(p) = lock(&self.proxies.streams).get_mut(&self.id) {
            p.demand = Some((std::time::Instant::now(), offered_rps));
        }
    }

    /// The proxy reported its certificate and what it trusts.
    pub fn certificate(&self, report: CertificateReport) {
        if let Some(p) = lock(&self.proxies.streams).get_mut(&self.id) {
            p.certificate = Some(report);
        }
        self.proxies.changes.send_modify(|v| *v += 1);
    }

    /// The proxy answered a response of `type_url`: ACK (`nack` None) or NACK.
    pub fn answered(&self, type_url: &str, in_flight: usize, nack: Option<&str>) {
        self.with(type_url, |s| {
            s.in_flight = in_flight;
            match nack {
                None => {
                    s.last_ack = Some(SystemTime::now());
                    s.nack = None;
                }
                Some(reason) => s.nack = Some(reason.to_owned()),
            }
        });
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        lock(&self.proxies.streams).remove(&self.id);
        self.proxies.changes.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_synced_once_every_push_is_answered_and_nack_until_an_ack() {
        let proxies = Arc::new(Proxies::default());
        let p = proxies.connect("demo/a", "sidecar", "spiffe://td/ns/demo/sa/a");
        let state = |t: &str| proxies.dump()[0]["types"][t]["state"].clone();
        p.subscribed("S");
        assert_eq!(state("S"), "NOT SENT");
        p.pushed("S", 1);
        assert_eq!(state("S"), "STALE");
        p.answered("S", 0, Some("bad port"));
        assert_eq!(state("S"), "NACK");
        assert_eq!(proxies.dump()[0]["types"]["S"]["nack"], "bad port");
        p.pushed("S", 1);
        p.answered("S", 0, None);
        assert_eq!(state("S"), "SYNCED");
        drop(p);
        assert_eq!(proxies.dump().as_array().map(Vec::len), Some(0));
    }
}
