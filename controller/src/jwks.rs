//! The keys of JWT issuers that RequestAuthentications name by URL: a rule's `jwksUri`, or
//! with neither `jwks` nor `jwksUri` the issuer's OpenID discovery document, whose
//! `jwks_uri` names them. As Istio's istiod does, the controller fetches them, caches them,
//! refreshes them (every 20 minutes by default, so an issuer's key rotation reaches the
//! proxies) and pushes them inline, so sidecars never reach out to an issuer themselves.
//!
//! A source is fetched as soon as the config names it and forgotten when no rule does. A
//! failed refresh keeps the last keys and retries with backoff (1 s doubling, up to the
//! refresh interval); a source that never answered has no keys, and the sidecars refuse
//! every token of its issuer with 401, as Envoy does with Istio's placeholder keys.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use isthmus_core::fetch::Getter;
use isthmus_proto::discovery as xds;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{watch, Notify};

/// How often keys are fetched again (Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// One fetch's deadline when the rule gives no `timeout` (Istio's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set or discovery document accepted.
const MAX_BYTES: usize = 512 * 1024;
/// The first retry after a failure; doubled each time, up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Where keys come from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub uri: String,
    pub openid_discovery: bool,
}

impl Source {
    /// The source of a rule whose keys are not inline.
    fn of(rule: &xds::JwtRule) -> Option<Self> {
        (rule.jwks.is_empty() && !rule.jwks_uri.is_empty()).then(|| Source {
            uri: rule.jwks_uri.clone(),
            openid_discovery: rule.openid_discovery,
        })
    }
}

/// The keys fetched so far, by source: a JSON Web Key Set each.
pub type Keys = BTreeMap<Source, Arc<str>>;

/// Fills in the keys of every rule of `inbound` whose keys are fetched (left empty while
/// there are none: the sidecar then refuses that issuer's tokens).
pub fn fill(keys: &Keys, inbound: &mut xds::InboundPolicy) {
    for rule in &mut inbound.jwt {
        if let Some(k) = Source::of(rule).and_then(|s| keys.get(&s)) {
            rule.jwks = k.to_string();
        }
    }
}

/// The sources the config's RequestAuthentications name, each with the longest `timeout`
/// of its rules.
pub fn sources(config: &isthmus_core::config::ConfigSet) -> BTreeMap<Source, Duration> {
    let mut out = BTreeMap::new();
    for rule in config
        .request_authentications
        .values()
        .flat_map(|a| &a.rules)
    {
        if let Some(source) = Source::of(rule) {
            let timeout = match rule.fetch_timeout_ms {
                0 => DEFAULT_TIMEOUT,
                ms => Duration::from_millis(ms.into()),
            };
            let t = out.entry(source).or_insert(timeout);
            *t = (*t).max(timeout);
        }
    }
    out
}

#[derive(Debug)]
struct Entry {
    timeout: Duration,
    keys: Option<Arc<str>>,
    /// For OpenID discovery: the `jwks_uri` the document named.
    keys_uri: Option<String>,
    fetched: Option<SystemTime>,
    error: Option<String>,
    failures: u32,
    due: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FetchLabels {
    result: &'static str,
}

struct Inner {
    getter: Getter,
    refresh: Duration,
    entries: Mutex<BTreeMap<Source, Entry>>,
    keys: watch::Sender<Arc<Keys>>,
    wake: Notify,
    fetches: Family<FetchLabels, Counter>,
}

/// The cache of fetched keys, shared by the registry (which reads it) and the task that
/// fetches ([`Resolver::run`]).
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Resolver {
    pub fn new(getter: Getter, refresh: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                getter,
                refresh,
                entries: Mutex::default(),
                keys: watch::Sender::new(Arc::default()),
                wake: Notify::new(),
                fetches: Family::default(),
            }),
        }
    }

    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        metrics.register(
            "jwks_fetches",
            "fetches of JWT issuers' keys (jwksUri, OpenID discovery), by result",
            self.inner.fetches.clone(),
        );
    }

    /// The keys as they are now; changes are announced on [`Resolver::subscribe`].
    pub fn current(&self) -> Arc<Keys> {
        self.inner.keys.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Keys>> {
        self.inner.keys.subscribe()
    }

    /// The sources the config names now: new ones are fetched at once, ones no rule names
    /// any more are forgotten with their keys.
    pub fn want(&self, wanted: BTreeMap<Source, Duration>) {
        let mut entries = lock(&self.inner.entries);
        let before = entries.len();
        entries.retain(|s, _| wanted.contains_key(s));
        let removed = entries.len() != before;
        let mut added = false;
        for (source, timeout) in wanted {
            let entry = entries.entry(source).or_insert_with(|| {
                added = true;
                Entry {
                    timeout,
                    keys: None,
                    keys_uri: None,
                    fetched: None,
                    error: None,
                    failures: 0,
                    due: Instant::now(),
                }
            });
            entry.timeout = timeout;
        }
        drop(entries);
        if removed {
            self.publish();
        }
        if added {
            self.inner.wake.notify_one();
        }
    }

    /// Announces the keys of the entries, if they differ from the last announced.
    fn publish(&self) {
        let keys: Keys = lock(&self.inner.entries)
            .iter()
            .filter_map(|(s, e)| Some((s.clone(), e.keys.clone()?)))
            .collect();
        self.inner.keys.send_if_modified(|k| {
            let changed = **k != keys;
            if changed {
                *k = Arc::new(keys);
            }
            changed
        });
    }

    /// Fetches what is due, until the process ends.
    pub async fn run(self) {
        loop {
            let now = Instant::now();
            let (due, next): (Vec<(Source, Duration)>, Option<Instant>) = {
                let entries = lock(&self.inner.entries);
                let due = entries
                    .iter()
                    .filter(|(_, e)| e.due <= now)
                    .map(|(s, e)| (s.clone(), e.timeout))
                    .collect();
                (due, entries.values().map(|e| e.due).min())
            };
            if due.is_empty() {
                let sleep = next.map_or(Duration::from_secs(3600), |n| n - now);
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = self.inner.wake.notified() => {}
                }
                continue;
            }
            let this = &self;
            let fetched =
                futures::future::join_all(due.into_iter().map(|(source, timeout)| async move {
                    let result = this.fetch(&source, timeout).await;
                    (source, result)
                }))
                .await;
            let mut entries = lock(&self.inner.entries);
            for (source, result) in fetched {
                // Forgotten while it was being fetched.
                let Some(entry) = entries.get_mut(&source) else {
                    continue;
                };
                match result {
                    Ok((keys, keys_uri)) => {
                        self.inner
                            .fetches
                            .get_or_create(&FetchLabels { result: "ok" })
                            .inc();
                        if entry.keys.as_deref() != Some(keys.as_str()) {
                            tracing::info!(uri = %source.uri, rotated = entry.keys.is_some(), "JWT issuer keys fetched");
                            entry.keys = Some(keys.into());
                        }
                        entry.keys_uri = keys_uri;
                        entry.fetched = Some(SystemTime::now());
                        entry.error = None;
                        entry.failures = 0;
                        entry.due = Instant::now() + self.inner.refresh;
                    }
                    Err(e) => {
                        self.inner
                            .fetches
                            .get_or_create(&FetchLabels { result: "error" })
                            .inc();
                        let retry = FIRST_RETRY
                            .saturating_mul(1 << entry.failures.min(16))
                            .min(self.inner.refresh);
                        tracing::warn!(error = %e, kept = entry.keys.is_some(), retry_in = ?retry, "cannot fetch a JWT issuer's keys");
                        entry.error = Some(e);
                        entry.failures += 1;
                        entry.due = Instant::now() + retry;
                    }
                }
            }
            drop(entries);
            self.publish();
        }
    }

    /// A source's key set (compact JSON), and for discovery the `jwks_uri` it named.
    async fn fetch(
        &self,
        source: &Source,
        timeout: Duration,
    ) -> Result<(String, Option<String>), String> {
        let get = |url: String| async move {
            self.inner
                .getter
                .get(&url, timeout, MAX_BYTES)
                .await
                .map_err(|e| e.to_string())
        };
        let (body, keys_uri) = if source.openid_discovery {
            let doc = get(source.uri.clone()).await?;
            let doc: serde_json::Value = serde_json::from_slice(&doc)
                .map_err(|e| format!("{}: not a JSON document: {e}", source.uri))?;
            let uri = doc
                .get("jwks_uri")
                .and_then(|u| u.as_str())
                .filter(|u| isthmus_core::fetch::is_http_url(u))
                .ok_or_else(|| format!("{}: no http(s) `jwks_uri` in it", source.uri))?
                .to_owned();
            (get(uri.clone()).await?, Some(uri))
        } else {
            (get(source.uri.clone()).await?, None)
        };
        let where_ = keys_uri.as_deref().unwrap_or(&source.uri);
        let set: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("{where_}: not JSON: {e}"))?;
        if set
            .get("keys")
            .and_then(|k| k.as_array())
            .is_none_or(Vec::is_empty)
        {
            return Err(format!(
                "{where_}: not a JSON Web Key Set with keys (`{{\"keys\": [...]}}`)"
            ));
        }
        Ok((set.to_string(), keys_uri))
    }

    /// For the controller's config dump: each source, when it was fetched, and its error.
    pub fn dump(&self) -> serde_json::Value {
        let entries = lock(&self.inner.entries);
        entries
            .iter()
            .map(|(s, e)| {
                serde_json::json!({
                    "uri": s.uri,
                    "openid_discovery": s.openid_discovery,
                    "keys_uri": e.keys_uri,
                    "has_keys": e.keys.is_some(),
                    "fetched_unix": e.fetched.map(crate::syncz::unix),
                    "error": e.error,
                })
            })
            .collect()
    }
}
