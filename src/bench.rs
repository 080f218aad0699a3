//! `isthmus bench registry`: the control plane at scale, measured on this machine.
//!
//! Starts the federation and N cluster controllers as real processes of this binary (each
//! controller on its own loopback address, reading its own config folder, joined to the
//! federation with a token), and in this process a few lightweight xDS clients per cluster:
//! real mTLS discovery streams with workload certificates from each cluster's CA,
//! subscribed to services only, that decode what they are pushed and keep per-service
//! counts. They stand in for sidecars; there is no data plane.
//!
//! Every cluster runs the same S services (so each is one global service with N clusters),
//! each with E / (N × S) WorkloadEntries in its own file. For each endpoint total asked for,
//! it writes the files, waits until every client holds the whole mesh (its own endpoints
//! and every other cluster's healthy counts), and prints the memory of the federation and
//! of the controllers. At the last total it then changes one endpoint at a time (one file
//! rewritten in one cluster) and prints how long each change takes to reach every client
//! that can see it (that cluster's clients through its controller, the others through the
//! federation and their controllers), and the bytes each change costs on the federation's
//! streams and on the discovery streams; then changes at a steady rate for 10 s, and how
//! far behind the clients are when they stop. Last, it kills one controller, changes its config
//! while it is down, restarts it and times the resync.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_core::identity::SpiffeId;
use isthmus_core::xds::{Rejected, XdsClient, XdsHandler};
use isthmus_proto::discovery::{self as xds, Resource};
use prost::Message;
use tokio::sync::watch;

use crate::children::Procs;
use crate::client::AppClient;

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "bench";
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the sustained phase writes changes.
const SUSTAINED_FOR: Duration = Duration::from_secs(10);
/// How long one endpoint change may take to reach every client before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `isthmus bench registry` runs; its flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Clusters (each its own controller process), 1 to 50.
    #[arg(long, default_value_t = 20)]
    pub clusters: usize,
    /// Services per cluster; every cluster runs the same ones, so each is one global
    /// service exported by every cluster.
    #[arg(long, default_value_t = 50)]
    pub services: usize,
    /// Endpoint totals (all clusters) to grow through, comma-separated; changes are timed
    /// at the largest.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
    pub endpoints: Vec<usize>,
    /// Lightweight xDS clients per cluster, standing in for sidecars.
    #[arg(long, default_value_t = 2)]
    pub proxies: usize,
    /// Endpoint changes to time.
    #[arg(long, default_value_t = 40)]
    pub changes: usize,
    /// Endpoint changes per second for the 10 s sustained phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Folder for state, config and logs (default: a temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn federation_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 199, 1)), port)
}

fn controller_addr(cluster: usize, port: u16) -> SocketAddr {
    let c = u8::try_from(200 + cluster).expect("at most 50 clusters");
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, c, 1)), port)
}

fn cluster_name(c: usize) -> String {
    format!("c{c:02}")
}

fn service_name(s: usize) -> String {
    format!("svc-{s:02}")
}

/// The config file of one service in one cluster: the Service, its export and `n`
/// WorkloadEntries.
fn service_file(c: usize, s: usize, n: u32) -> String {
    let name = service_name(s);
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
    );
    for k in 0..n as usize {
        // Unique in the cluster up to 1,300 endpoints per service.
        let e = s * 1300 + k;
        out.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
metadata: {{name: {name}-{k}, namespace: {NAMESPACE}}}\n\
spec: {{address: 10.{c}.{}.{}, labels: {{app: {name}, version: v{}}}, locality: region-{}/zone-{}, serviceAccount: {name}}}\n",
            (e / 250) % 256,
            e % 250 + 1,
            k % 2,
            c % 4,
            k % 3,
        ));
    }
    out
}

/// What one client holds of one service.
#[derive(Debug, Clone)]
struct Seen {
    local: u32,
    /// Healthy endpoints per other cluster.
    remote: BTreeMap<String, u32>,
    at: Instant,
}

/// A lightweight xDS client's state: per service, what it was last pushed.
struct Probe {
    cluster: usize,
    seen: Mutex<HashMap<String, Seen>>,
    bell: watch::Sender<u64>,
}

impl XdsHandler for Probe {
    fn apply(&self, _type_url: &str, updated: &[Resource], removed: &[String]) -> Vec<Rejected> {
        let at = Instant::now();
        let mut rejected = Vec::new();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for r in updated {
            match xds::Service::decode(r.body.as_slice()) {
                Ok(svc) => {
                    let local = svc.endpoints.iter().filter(|e| e.healthy).count() as u32;
                    let remote = svc
                        .remote
                        .iter()
                        .map(|c| {
                            (
                                c.cluster.clone(),
                                c.localities.iter().map(|l| l.healthy).sum(),
                            )
                        })
                        .collect();
                    seen.insert(r.name.clone(), Seen { local, remote, at });
                }
                Err(e) => rejected.push(Rejected::new(&r.name, e)),
            }
        }
        for name in removed {
            seen.remove(name);
        }
        drop(seen);
        self.bell.send_modify(|n| *n += 1);
        rejected
    }
}

impl Probe {
    /// Whether this client holds service `s` as `counts` (cluster × service) says.
    fn holds(&self, s: usize, counts: &[Vec<u32>]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let Some(got) = seen.get(&format!("{NAMESPACE}/{}", service_name(s))) else {
            return false;
        };
        counts.iter().enumerate().all(|(c, per)| {
            if c == self.cluster {
                got.local == per[s]
            } else {
                got.remote.get(&cluster_name(c)).copied().unwrap_or(0) == per[s]
            }
        })
    }

    fn updated_at(&self, s: usize) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&format!("{NAMESPACE}/{}", service_name(s)))
            .map(|g| g.at)
    }
}

struct Bench {
    opts: Options,
    dir: PathBuf,
    procs: Procs,
    probes: Vec<Arc<Probe>>,
    bell: watch::Receiver<u64>,
    bell_tx: watch::Sender<u64>,
    /// Endpoints per cluster and service, as written.
    counts: Vec<Vec<u32>>,
    http: AppClient,
    /// Endpoints and memory (federation, controllers' sum) at the first total, to print
    /// what memory each further 10k endpoints costs.
    base: Option<(usize, u64, u64)>,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Bench {
    async fn start(&mut self) -> anyhow::Result<()> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let fed_state = self.dir.join("federation");
        let args: Vec<String> = vec![
            "federation".into(),
            "--state-dir".into(),
            fed_state.display().to_string(),
            "--listen".into(),
            federation_addr(15200).to_string(),
            "--admin".into(),
            federation_addr(15014).to_string(),
        ];
        self.procs.spawn("federation", args, &logs)?;
        let root = fed_state.join("root-cert.pem");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !(root.exists() && fed_state.join("join-token.key").exists()) {
            self.procs.check_alive("federation")?;
            anyhow::ensure!(Instant::now() < deadline, "the federation did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for c in 0..self.opts.clusters {
            let name = cluster_name(c);
            let cdir = self.dir.join(&name);
            std::fs::create_dir_all(cdir.join("config"))?;
            let token = isthmus_federation::mint_join_token(&fed_state, &name, TOKEN_TTL)?;
            let args = vec![
                "controller".into(),
                "--cluster".into(),
                name.clone(),
                "--config-dir".into(),
                cdir.join("config").display().to_string(),
                "--state-dir".into(),
                cdir.join("state").display().to_string(),
                "--listen".into(),
                controller_addr(c, 15012).to_string(),
                "--admin".into(),
                controller_addr(c, 15014).to_string(),
                "--federation".into(),
                federation_addr(15200).to_string(),
                "--federation-root".into(),
                root.display().to_string(),
                "--join-token".into(),
                token,
            ];
            self.procs
                .spawn(&format!("{name}-controller"), args, &logs)?;
        }
        let bundle = std::fs::read_to_string(&root)?;
        for c in 0..self.opts.clusters {
            self.wait_ready(c).await?;
            let name = cluster_name(c);
            let token = isthmus_controller::mint_workload_token(
                &self.dir.join(&name).join("state"),
                &name,
                NAMESPACE,
                "probe",
                TOKEN_TTL,
            )?;
            let controller = SpiffeId::controller(TRUST_DOMAIN, &name);
            let ca = isthmus_core::ca_client::CaClient {
                address: controller_addr(c, 15012),
                controller: controller.clone(),
                bootstrap: isthmus_core::ca_client::Roots::Inline(bundle.clone()),
                token: Some(isthmus_core::ca_client::Token::Inline(token)),
                identity: SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "probe"),
            };
            let identity = tokio::time::timeout(STARTUP_TIMEOUT, ca.fetch_until_issued())
                .await
                .with_context(|| format!("no workload certificate from {name}'s CA"))?;
            for p in 0..self.opts.proxies {
                let probe = Arc::new(Probe {
                    cluster: c,
                    seen: Mutex::default(),
                    bell: self.bell_tx.clone(),
                });
                let channel = isthmus_core::grpc::tls_channel(
                    controller_addr(c, 15012),
                    identity.client_config(
                        isthmus_core::tls::PeerPolicy::OneOf(vec![controller.clone()]),
                        &[isthmus_core::tls::ALPN_H2],
                    ),
                );
                let client = XdsClient {
                    channel,
                    node: xds::Node {
                        cluster: name.clone(),
                        role: "sidecar".into(),
                        workload: format!("{NAMESPACE}/probe-{p}"),
                        ..Default::default()
                    },
                    types: vec![isthmus_proto::type_url::SERVICE],
                    handler: probe.clone(),
                    health: None,
                    certificate: None,
                    peer_links: None,
                    demand: None,
                    first_config: None,
                };
                tokio::spawn(client.run());
                self.probes.push(probe);
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, c: usize) -> anyhow::Result<()> {
        let name = format!("{}-controller", cluster_name(c));
        let admin = controller_addr(c, 15014);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.procs.check_alive(&name)?;
            if matches!(self.http.get(admin, "controller", "/ready").await, Ok(r) if r.status == 200)
            {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn write(&mut self, c: usize, s: usize, n: u32) -> anyhow::Result<()> {
        let path = self
            .dir
            .join(cluster_name(c))
            .join("config")
            .join(format!("{}.yaml", service_name(s)));
        std::fs::write(&path, service_file(c, s, n))
            .with_context(|| format!("writing {}", path.display()))?;
        self.counts[c][s] = n;
        Ok(())
    }

    /// Waits until every client holds the services `which` as written; the instant it did.
    async fn converged(&mut self, which: &[usize], timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            self.bell.borrow_and_update();
            let done = self
                .probes
                .iter()
                .all(|p| which.iter().all(|&s| p.holds(s, &self.counts)));
            if done {
                return Ok(Instant::now());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "clients did not converge in {timeout:?}; logs in {}",
                self.dir.join("logs").display()
            );
            let _ = tokio::time::timeout(left, self.bell.changed()).await;
            if which.len() > 1 {
                // A flood of pushes: check a few times a second, not on every one.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn scrape(&self, addr: SocketAddr, metric: &str) -> f64 {
        let Ok(reply) = self.http.get(addr, "admin", "/stats/prometheus").await else {
            return 0.0;
        };
        String::from_utf8_lossy(&reply.body)
            .lines()
            .filter(|l| l.starts_with(metric))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn federation_bytes(&self) -> f64 {
        self.scrape(
            federation_addr(15014),
            "isthmus_federation_registry_sent_bytes_total",
        )
        .await
    }

    async fn xds_bytes(&self) -> f64 {
        let mut total = 0.0;
        for c in 0..self.opts.clusters {
            total += self
                .scrape(
                    controller_addr(c, 15014),
                    "isthmus_controller_xds_pushed_bytes_total",
                )
                .await;
        }
        total
    }

    fn memory(&self) -> (u64, Vec<u64>) {
        let fed = self.procs.pid("federation").map(rss_kib).unwrap_or(0);
        let controllers = (0..self.opts.clusters)
            .map(|c| {
                self.procs
                    .pid(&format!("{}-controller", cluster_name(c)))
                    .map(rss_kib)
                    .unwrap_or(0)
            })
            .collect();
        (fed, controllers)
    }

    async fn grow(&mut self, total: usize) -> anyhow::Result<()> {
        let (n, s) = (self.opts.clusters, self.opts.services);
        let per = u32::try_from(total / (n * s)).context("too many endpoints")?;
        let started = Instant::now();
        for c in 0..n {
            for svc in 0..s {
                self.write(c, svc, per)?;
            }
        }
        let all: Vec<usize> = (0..s).collect();
        let done = self.converged(&all, STARTUP_TIMEOUT).await?;
        let (fed, controllers) = self.memory();
        let sum: u64 = controllers.iter().sum();
        let mean = sum / controllers.len().max(1) as u64;
        let max = controllers.iter().copied().max().unwrap_or(0);
        let endpoints = per as usize * n * s;
        let growth = match self.base {
            None => {
                self.base = Some((endpoints, fed, sum));
                "(base)".to_string()
            }
            Some((e0, fed0, sum0)) => {
                let tens = (endpoints - e0) as f64 / 10_000.0;
                let per10k =
                    |now: u64, then: u64| mib((now.saturating_sub(then) as f64 / tens) as u64);
                format!("{:>10} | {:>10}", per10k(fed, fed0), per10k(sum, sum0))
            }
        };
        println!(
            "{:>9} | {:>9} | {:>10} | {:>10} / {:>10} | {growth}",
            endpoints,
            ms(done - started),
            mib(fed),
            mib(mean),
            mib(max),
        );
        Ok(())
    }

    async fn changes(&mut self) -> anyhow::Result<()> {
        let (n, s) = (self.opts.clusters, self.opts.services);
        let mut all_clients = Vec::new();
        let mut per_client = Vec::new();
        let fed_before = self.federation_bytes().await;
        let xds_before = self.xds_bytes().await;
        for i in 0..self.opts.changes {
            let (c, svc) = (i % n, (i * 7) % s);
            let now = self.counts[c][svc];
            let next = if i % 2 == 0 { now - 1 } else { now + 1 };
            let t0 = Instant::now();
            self.write(c, svc, next)?;
            let done = self.converged(&[svc], CHANGE_TIMEOUT).await?;
            all_clients.push(done - t0);
            for p in &self.probes {
                if let Some(at) = p.updated_at(svc) {
                    per_client.push(at.saturating_duration_since(t0));
                }
            }
            // Let the pushes settle so the next change is timed on its own.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let changes = self.opts.changes as f64;
        let fed_bytes = (self.federation_bytes().await - fed_before) / changes;
        let xds_bytes = (self.xds_bytes().await - xds_before) / changes;
        all_clients.sort();
        per_client.sort();
        println!(
            "\none endpoint change ({} changes, each in one cluster's config file):",
            self.opts.changes
        );
        println!(
            "  to every client that sees it: p50 {}  p99 {}  max {}",
            ms(percentile(&all_clients, 0.5)),
            ms(percentile(&all_clients, 0.99)),
            ms(*all_clients.last().unwrap_or(&Duration::ZERO)),
        );
        println!(
            "  per client:                   p50 {}  p99 {}",
            ms(percentile(&per_client, 0.5)),
            ms(percentile(&per_client, 0.99)),
        );
        println!(
            "  bytes per change: {:.0} on the federation's streams (to {} controllers), {:.0} on discovery streams (to {} clients)",
            fed_bytes,
            n - 1,
            xds_bytes,
            self.probes.len()
        );
        let p99 = percentile(&all_clients, 0.99);
        println!(
            "  goal, under 1 s to every client at this size: {}",
            if p99 < Duration::from_secs(1) {
                "met"
            } else {
                "NOT met"
            }
        );
        Ok(())
    }

    /// Changes at a steady rate, each to a different service and cluster, for a while: does
    /// the mesh keep up? Printed: how far behind every client is when the writes stop.
    async fn sustained(&mut self) -> anyhow::Result<()> {
        let (n, s) = (self.opts.clusters, self.opts.services);
        let rate = self.opts.rate;
        let total = (rate as f64 * SUSTAINED_FOR.as_secs_f64()) as usize;
        let gap = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        let mut next_at = tokio::time::Instant::now();
        let mut touched = std::collections::BTreeSet::new();
        for i in 0..total {
            tokio::time::sleep_until(next_at).await;
            next_at += gap;
            let (c, svc) = ((i * 3) % n, (i * 11) % s);
            let now = self.counts[c][svc];
            let next = if now.is_multiple_of(2) {
                now - 1
            } else {
                now + 1
            };
            self.write(c, svc, next)?;
            touched.insert(svc);
        }
        let writing = started.elapsed();
        let last = Instant::now();
        let which: Vec<usize> = touched.into_iter().collect();
        let done = self.converged(&which, STARTUP_TIMEOUT).await?;
        println!(
            "
{total} changes at {rate}/s for {:.1} s (each one endpoint, round the clusters and services): every client current {} after the last",
            writing.as_secs_f64(),
            ms(done - last)
        );
        Ok(())
    }

    async fn resync(&mut self) -> anyhow::Result<()> {
        let name = format!("{}-controller", cluster_name(0));
        self.procs.kill(&name).await?;
        let next = self.counts[0][0] - 1;
        self.write(0, 0, next)?;
        let t0 = Instant::now();
        self.procs.restart(&name)?;
        self.wait_ready(0).await?;
        let ready = t0.elapsed();
        let all: Vec<usize> = (0..self.opts.services).collect();
        let done = self.converged(&all, STARTUP_TIMEOUT).await?;
        println!(
            "\ncontroller restart (SIGKILL, one endpoint changed while it was down): ready in {}, every client current in {}",
            ms(ready),
            ms(done - t0)
        );
        Ok(())
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=50).contains(&opts.clusters),
        "--clusters must be 1 to 50"
    );
    anyhow::ensure!(opts.services >= 1, "--services must be at least 1");
    anyhow::ensure!(opts.proxies >= 1, "--proxies must be at least 1");
    anyhow::ensure!(
        !opts.endpoints.is_empty(),
        "give at least one endpoint total"
    );
    let least = opts.endpoints.iter().copied().min().unwrap_or(0);
    anyhow::ensure!(
        least >= 2 * opts.clusters * opts.services,
        "every endpoint total must give each service at least 2 endpoints per cluster ({} here)",
        2 * opts.clusters * opts.services
    );
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let (bell_tx, bell) = watch::channel(0);
    let mut bench = Bench {
        counts: vec![vec![0; opts.services]; opts.clusters],
        opts: opts.clone(),
        dir: dir.clone(),
        procs: Procs::new()?,
        probes: Vec::new(),
        bell,
        bell_tx,
        http: AppClient::new(),
        base: None,
    };
    println!(
        "isthmus bench registry: federation + {} controllers (processes), {} services per cluster \
(the same {} in every cluster), {} lightweight xDS clients per cluster (services only, real mTLS streams, no data plane); state and logs in {}",
        opts.clusters,
        opts.services,
        opts.services,
        opts.proxies,
        dir.display()
    );
    let outcome = async {
        let started = Instant::now();
        bench.start().await?;
        let (fed, controllers) = bench.memory();
        println!(
            "started in {}; memory with no config: federation {}, controller mean {}\n",
            ms(started.elapsed()),
            mib(fed),
            mib(controllers.iter().sum::<u64>() / controllers.len().max(1) as u64)
        );
        println!(
            "endpoints | converged | federation | controller mean / max   | growth per 10k endpoints: federation | all controllers"
        );
        let mut totals = opts.endpoints.clone();
        totals.sort_unstable();
        for total in totals {
            bench.grow(total).await?;
        }
        if opts.changes > 0 {
            bench.changes().await?;
            if opts.rate > 0 {
                bench.sustained().await?;
            }
        }
        bench.resync().await
    };
    let outcome = tokio::select! {
        r = outcome => r,
        signal = crate::process::shutdown_signal(false) => Err(anyhow::anyhow!("{signal}: stopped")),
    };
    bench.procs.kill_all().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_is_valid_and_holds_what_it_says() {
        let set = isthmus_core::config::load_files(&[isthmus_core::config::SourceFile {
            name: "svc.yaml".into(),
            contents: service_file(3, 7, 25),
        }])
        .expect("valid config");
        assert_eq!(set.services.len(), 1);
        assert_eq!(set.workloads.len(), 25);
        assert_eq!(set.exports.len(), 1);
    }
}
