//! What the instances of one plugin share, and outlive a swap of its module: shared data
//! (`proxy_{get,set}_shared_data`, with compare-and-swap), shared queues, and the metrics
//! the plugin defines, exported with the sidecar's own on `/stats/prometheus`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;

use super::abi::status;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keys a plugin may keep in shared data, and the bytes of a value: a plugin cannot make
/// the sidecar hold without bound.
const MAX_KEYS: usize = 4096;
const MAX_QUEUED: usize = 4096;
const MAX_METRICS: usize = 256;

/// `proxy_{get,set}_shared_data`: values with a version (the CAS) that bumps on each set.
#[derive(Debug, Default)]
pub struct SharedData(Mutex<HashMap<String, (Vec<u8>, u32)>>);

impl SharedData {
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.0).get(key).cloned()
    }

    /// Sets `key`; with a non-zero `cas`, only if the value is still at that version.
    pub fn set(&self, key: String, value: Vec<u8>, cas: u32) -> i32 {
        let mut data = lock(&self.0);
        let current = data.get(&key).map(|(_, c)| *c);
        if cas != 0 && current != Some(cas) {
            return status::CAS_MISMATCH;
        }
        if current.is_none() && data.len() >= MAX_KEYS {
            return status::BAD_ARGUMENT;
        }
        let next = current.unwrap_or(0).wrapping_add(1).max(1);
        data.insert(key, (value, next));
        status::OK
    }
}

/// Shared queues by name, each a FIFO of byte strings. An enqueue wakes the plugin's
/// resident root context (`proxy_on_queue_ready`).
#[derive(Debug, Default)]
pub struct Queues(Mutex<QueueTable>, tokio::sync::Notify);

#[derive(Debug, Default)]
struct QueueTable {
    ids: BTreeMap<String, u32>,
    queues: HashMap<u32, VecDeque<Vec<u8>>>,
    /// Queues enqueued to since the resident root was last told.
    ready: std::collections::BTreeSet<u32>,
}

impl Queues {
    pub fn register(&self, name: &str) -> u32 {
        let mut q = lock(&self.0);
        let next = q.ids.len() as u32 + 1;
        let id = *q.ids.entry(name.to_owned()).or_insert(next);
        q.queues.entry(id).or_default();
        id
    }

    pub fn resolve(&self, name: &str) -> Option<u32> {
        lock(&self.0).ids.get(name).copied()
    }

    /// Waits until something was enqueued; returns the queues it went to.
    pub async fn ready(&self) -> Vec<u32> {
        loop {
            let notified = self.1.notified();
            let ready = std::mem::take(&mut lock(&self.0).ready);
            if !ready.is_empty() {
                return ready.into_iter().collect();
            }
            notified.await;
        }
    }

    pub fn enqueue(&self, id: u32, value: Vec<u8>) -> i32 {
        let mut table = lock(&self.0);
        match table.queues.get_mut(&id) {
            Some(q) if q.len() < MAX_QUEUED => {
                q.push_back(value);
                table.ready.insert(id);
                drop(table);
                self.1.notify_one();
                status::OK
            }
            Some(_) => status::BAD_ARGUMENT,
            None => status::NOT_FOUND,
        }
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, i32> {
        match lock(&self.0).queues.get_mut(&id) {
            Some(q) => q.pop_front().ok_or(status::EMPTY),
            None => Err(status::NOT_FOUND),
        }
    }
}

#[derive(Debug)]
enum Value {
    Counter(AtomicI64),
    Gauge(AtomicI64),
    Histogram(Histogram),
}

/// The metrics a plugin defines (`proxy_define_metric`), by id.
#[derive(Debug, Default)]
pub struct PluginMetrics(Mutex<Vec<(String, Arc<Value>)>>);

/// A metric name as Prometheus takes it: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn prometheus_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

impl PluginMetrics {
    /// Defines (or finds) a metric: 0 counter, 1 gauge, 2 histogram. Names of the
    /// sidecar's own metrics (`istio_*`, `isthmus_*`) are refused.
    pub fn define(&self, kind: i32, name: &str) -> Result<u32, i32> {
        let name = prometheus_name(name);
        if name.is_empty() || name.starts_with("istio_") || name.starts_with("isthmus_") {
            return Err(status::BAD_ARGUMENT);
        }
        let mut metrics = lock(&self.0);
        if let Some(i) = metrics.iter().position(|(n, _)| *n == name) {
            return Ok(i as u32);
        }
        if metrics.len() >= MAX_METRICS {
            return Err(status::BAD_ARGUMENT);
        }
        let value = match kind {
            0 => Value::Counter(AtomicI64::new(0)),
            1 => Value::Gauge(AtomicI64::new(0)),
            2 => Value::Histogram(Histogram::new(exponential_buckets(1.0, 2.0, 20))),
            _ => return Err(status::BAD_ARGUMENT),
        };
        metrics.push((name, Arc::new(value)));
        Ok(metrics.len() as u32 - 1)
    }

    fn value(&self, id: u32) -> Option<Arc<Value>> {
        lock(&self.0).get(id as usize).map(|(_, v)| v.clone())
    }

    pub fn increment(&self, id: u32, offset: i64) -> i32 {
        match self.value(id).as_deref() {
            Some(Value::Counter(v)) if offset >= 0 => {
                v.fetch_add(offset, Ordering::Relaxed);
                status::OK
            }
            Some(Value::Gauge(v)) => {
                v.fetch_add(offset, Ordering::Relaxed);
                status::OK
            }
            Some(_) => status::BAD_ARGUMENT,
            None => status::NOT_FOUND,
        }
    }

    pub fn record(&self, id: u32, value: u64) -> i32 {
        match self.value(id).as_deref() {
            Some(Value::Counter(v) | Value::Gauge(v)) => {
                v.store(value as i64, Ordering::Relaxed);
                status::OK
            }
            Some(Value::Histogram(h)) => {
                h.observe(value as f64);
                status::OK
            }
            None => status::NOT_FOUND,
        }
    }

    pub fn get(&self, id: u32) -> Result<u64, i32> {
        match self.value(id).as_deref() {
            Some(Value::Counter(v) | Value::Gauge(v)) => Ok(v.load(Ordering::Relaxed) as u64),
            Some(Value::Histogram(_)) => Err(status::BAD_ARGUMENT),
            None => Err(status::NOT_FOUND),
        }
    }
}

/// Everything one plugin's instances share (see the module's doc).
#[derive(Debug, Default)]
pub struct Shared {
    pub shared_data: SharedData,
    pub queues: Queues,
    pub metrics: PluginMetrics,
    /// Requests the plugin failed (it could not be loaded, or trapped), by fail strategy:
    /// let through (FAIL_OPEN) or refused (FAIL_CLOSE).
    pub failed_open: std::sync::atomic::AtomicU64,
    pub failed_closed: std::sync::atomic::AtomicU64,
    /// When a failure was last logged as a warning (ms since the process's first), and
    /// the failures since then that were not: see [`Shared::warn_now`].
    warned_at_ms: std::sync::atomic::AtomicU64,
    unwarned: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Whether a failure should be logged as a warning now: at most one a second per
    /// plugin, so that a client who can make a plugin fail cannot flood the log (the
    /// failure counters count every one). `Some(n)`: warn, saying `n` went unlogged since.
    pub fn warn_now(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
            + 1_000;
        let last = self.warned_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1_000
            && self
                .warned_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.unwarned.swap(0, Ordering::Relaxed));
        }
        self.unwarned.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Every plugin's shared state by plugin name, for the life of the process (a plugin
/// swapped for a new module keeps its counters and shared data), and the Prometheus
/// collector of their metrics.
#[derive(Debug, Default)]
pub struct Registry(Mutex<BTreeMap<String, Arc<Shared>>>);

impl Registry {
    pub fn of(&self, plugin: &str) -> Arc<Shared> {
        lock(&self.0).entry(plugin.to_owned()).or_default().clone()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FailureLabels {
    plugin: String,
    /// `fail_open` (let through) or `fail_close` (refused).
    strategy: &'static str,
}

impl prometheus_client::collector::Collector for Registry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let plugins: Vec<(String, Arc<Shared>)> = lock(&self.0)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !plugins.is_empty() {
            let mut family = encoder.encode_descriptor(
                "isthmus_sidecar_wasm_plugin_failures",
                "requests a WasmPlugin failed (not loaded, or trapped), by what its fail strategy did",
                None,
                MetricType::Counter,
            )?;
            for (plugin, shared) in &plugins {
                for (strategy, n) in [
                    ("fail_open", &shared.failed_open),
                    ("fail_close", &shared.failed_closed),
                ] {
                    let labels = FailureLabels {
                        plugin: plugin.clone(),
                        strategy,
                    };
                    ConstCounter::new(n.load(Ordering::Relaxed))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        // One family per name, a series per plugin that defines it.
        let mut by_name: BTreeMap<String, Vec<(String, Arc<Value>)>> = BTreeMap::new();
        for (plugin, shared) in &plugins {
            for (name, value) in lock(&shared.metrics.0).iter() {
                by_name
                    .entry(name.clone())
                    .or_default()
                    .push((plugin.clone(), value.clone()));
            }
        }
        for (name, series) in by_name {
            let Some(first) = series.first() else {
                continue;
            };
            let kind = match &*first.1 {
                Value::Counter(_) => MetricType::Counter,
                Value::Gauge(_) => MetricType::Gauge,
                Value::Histogram(_) => MetricType::Histogram,
            };
            let mut family =
                encoder.encode_descriptor(&name, "defined by a WasmPlugin", None, kind)?;
            for (plugin, value) in series {
                let label = PluginLabel { plugin };
                let metric = family.encode_family(&label)?;
                match (&*value, kind) {
                    (Value::Counter(v), MetricType::Counter) => {
                        ConstCounter::new(v.load(Ordering::Relaxed).max(0) as u64).encode(metric)?
                    }
                    (Value::Gauge(v), MetricType::Gauge) => {
                        ConstGauge::new(v.load(Ordering::Relaxed)).encode(metric)?
                    }
                    (Value::Histogram(h), MetricType::Histogram) => h.encode(metric)?,
                    // Two plugins gave one name different types: the first one's wins.
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// What the host functions of one plugin's instances read: its name, root id and
/// configuration, plugin-level properties, and its [`Shared`] state.
#[derive(Debug)]
pub struct PluginShared {
    pub name: String,
    pub config: Vec<u8>,
    /// `plugin_name`, `plugin_root_id`, `node.*`..., encoded as proxy-wasm returns them.
    pub properties: BTreeMap<String, Vec<u8>>,
    /// `vmConfig.env`, for WASI's environ.
    pub env: BTreeMap<String, String>,
    pub shared: Arc<Shared>,
    pub tick_ms: AtomicU32,
}

impl PluginShared {
    pub fn set_tick_period(&self, ms: u32) {
        self.tick_ms.store(ms, Ordering::Relaxed);
    }
}

impl std::ops::Deref for PluginShared {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_warn_once_a_second_and_say_how_many_went_unlogged() {
        let s = Shared::default();
        assert_eq!(s.warn_now(), Some(0), "the first one warns");
        for _ in 0..50 {
            assert_eq!(s.warn_now(), None);
        }
        // A second later the next one warns and owns up to the 50 before it.
        s.warned_at_ms.fetch_sub(1_000, Ordering::Relaxed);
        assert_eq!(s.warn_now(), Some(50));
    }

    #[test]
    fn shared_data_sets_only_at_the_version_asked() {
        let d = SharedData::default();
        assert_eq!(d.set("k".into(), b"a".to_vec(), 0), status::OK);
        let (_, cas) = d.get("k").expect("set");
        assert_eq!(
            d.set("k".into(), b"b".to_vec(), cas + 7),
            status::CAS_MISMATCH
        );
        assert_eq!(d.set("k".into(), b"b".to_vec(), cas), status::OK);
        assert_eq!(d.get("k").expect("set").0, b"b");
    }

    #[test]
    fn plugin_metrics_are_defined_once_and_own_names_are_refused() {
        let m = PluginMetrics::default();
        let id = m.define(0, "wasm.requests").expect("defined");
        assert_eq!(m.define(0, "wasm.requests"), Ok(id));
        assert_eq!(m.increment(id, 2), status::OK);
        assert_eq!(
            m.increment(id, -1),
            status::BAD_ARGUMENT,
            "counters only grow"
        );
        assert_eq!(m.get(id), Ok(2));
        assert_eq!(
            m.define(0, "istio_requests_total"),
            Err(status::BAD_ARGUMENT)
        );
        let registry = Registry::default();
        registry
            .of("demo/p")
            .metrics
            .define(0, "x.y")
            .expect("defined");
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(Arc::new(registry)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encodes");
        assert!(text.contains("x_y_total{plugin=\"demo/p\"} 0"), "{text}");
    }
}
