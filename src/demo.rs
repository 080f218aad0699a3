//! `isthmus demo`: the whole product on one machine. Starts the federation and three
//! clusters (controller, gateway, sample workloads behind sidecars) as child processes of
//! this binary on loopback addresses, as `deploy/demo/topology.yaml` lays out, then drives
//! steady traffic from a client in `east` to the service `echo` that runs in every cluster
//! and walks through the failover story:
//!
//! 1. baseline: traffic stays in `east`;
//! 2. the `echo` workload in `east` hangs (its processes stopped with SIGSTOP: sockets
//!    open, nothing answers): traffic moves to `west` (the next locality);
//! 3. `west`'s gateway hangs (SIGSTOP): traffic moves to `eu`;
//! 4. both come back: traffic returns home to `east`.
//!
//! No request may fail in any phase, and traffic must leave a hung peer within
//! [`FAILOVER_BUDGET`]. It prints what happened and returns whether every phase behaved, so
//! it doubles as a smoke test of the product.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use crate::children::Procs;
use crate::client::AppClient;
use crate::traffic::{Event, Traffic};

const TOPOLOGY: &str = include_str!("../deploy/demo/topology.yaml");
const CLUSTER_CONFIG: &[(&str, &str)] = &[
    ("east", include_str!("../deploy/demo/east/echo.yaml")),
    ("west", include_str!("../deploy/demo/west/echo.yaml")),
    ("eu", include_str!("../deploy/demo/eu/echo.yaml")),
];
const NAMESPACE: &str = "demo";
const SERVICE_HOST: &str = "echo.demo.svc.cluster.local";
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between the client's requests: about 50 requests per second.
const REQUEST_GAP: Duration = Duration::from_millis(20);
/// How soon after a peer hangs or dies traffic must land elsewhere.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(1);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Topology {
    federation: FederationTopology,
    clusters: Vec<ClusterTopology>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FederationTopology {
    address: Ipv4Addr,
    trust_domain: String,
    failover: Vec<FailoverTopology>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverTopology {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterTopology {
    name: String,
    locality: String,
    controller: Ipv4Addr,
    gateway: Ipv4Addr,
    workloads: Vec<WorkloadTopology>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadTopology {
    name: String,
    address: Ipv4Addr,
    app: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Leave the mesh up after the scenario, until Ctrl-C.
    pub keep_running: bool,
    /// Where state, config and logs go; a temporary folder when `None`.
    pub dir: Option<PathBuf>,
    /// Seconds of steady traffic in each settled phase.
    pub phase_secs: u64,
    /// An OpenTelemetry collector every sidecar and gateway exports to (every request
    /// traced), and its protocol (`grpc` or `http/protobuf`).
    pub otlp: Option<(String, String)>,
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn ready(client: &AppClient, admin: SocketAddr) -> bool {
    matches!(client.get(admin, &admin.to_string(), "/ready").await, Ok(r) if r.status == 200)
}

/// Starts every component of the topology; returns the client's outbound address.
async fn start_mesh(
    topo: &Topology,
    dir: &Path,
    procs: &mut Procs,
    otlp: Option<&(String, String)>,
) -> anyhow::Result<SocketAddr> {
    // With a collector: traces of every request, metrics every 5 s, access logs.
    let export: Vec<String> = match otlp {
        Some((endpoint, protocol)) => vec![
            "--otlp-endpoint".into(),
            endpoint.clone(),
            "--otlp-protocol".into(),
            protocol.clone(),
            "--otlp-metrics-interval".into(),
            "5s".into(),
        ],
        None => Vec::new(),
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let client = AppClient::new();
    let td = &topo.federation.trust_domain;
    let fed_state = dir.join("federation");
    let mut args = vec![
        "federation".into(),
        "--trust-domain".into(),
        td.clone(),
        "--state-dir".into(),
        fed_state.display().to_string(),
    ];
    args.extend([
        "--listen".into(),
        sa(topo.federation.address, 15200).to_string(),
        "--admin".into(),
        sa(topo.federation.address, 15014).to_string(),
    ]);
    for f in &topo.federation.failover {
        args.extend(["--failover".into(), format!("{}={}", f.from, f.to)]);
    }
    procs.spawn("federation", args, &logs)?;
    let root = fed_state.join("root-cert.pem");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !(root.exists() && fed_state.join("join-token.key").exists()) {
        procs.check_alive("federation")?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for the federation's root CA"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = root.display().to_string();

    for c in &topo.clusters {
        let cdir = dir.join(&c.name);
        let config_dir = cdir.join("config");
        std::fs::create_dir_all(&config_dir)?;
        let yaml = CLUSTER_CONFIG
            .iter()
            .find(|(n, _)| *n == c.name)
            .map(|(_, y)| *y)
            .context("no demo config for cluster")?;
        std::fs::write(config_dir.join("echo.yaml"), yaml)?;
        let token = isthmus_federation::mint_join_token(&fed_state, &c.name, TOKEN_TTL)?;
        let args = vec![
            "controller".into(),
            "--cluster".into(),
            c.name.clone(),
            "--trust-domain".into(),
            td.clone(),
            "--config-dir".into(),
            config_dir.display().to_string(),
            "--state-dir".into(),
            cdir.join("state").display().to_string(),
            "--listen".into(),
            sa(c.controller, 15012).to_string(),
            "--admin".into(),
            sa(c.controller, 15014).to_string(),
            "--federation".into(),
            sa(topo.federation.address, 15200).to_string(),
            "--federation-root".into(),
            root.clone(),
            "--join-token".into(),
            token,
        ];
        procs.spawn(&format!("{}-controller", c.name), args, &logs)?;
    }
    for c in &topo.clusters {
        let state = dir.join(&c.name).join("state");
        let admin = sa(c.controller, 15014);
        wait_until(&format!("controller of {}", c.name), || async {
            client
                .get(admin, "controller", "/config_dump")
                .await
                .is_ok()
        })
        .await?;
        let common = |role: &str| -> Vec<String> {
            vec![
                role.into(),
                "--cluster".into(),
                c.name.clone(),
                "--trust-domain".into(),
                td.clone(),
                "--controller".into(),
                sa(c.controller, 15012).to_string(),
                "--root".into(),
                root.clone(),
            ]
        };
        let token = isthmus_controller::mint_workload_token(
            &state,
            &c.name,
            isthmus_core::identity::SYSTEM_NAMESPACE,
            isthmus_core::identity::GATEWAY_SERVICE_ACCOUNT,
            TOKEN_TTL,
        )?;
        let mut args = common("gateway");
        args.extend([
            "--token".into(),
            token,
            "--tunnel".into(),
            sa(c.gateway, 15008).to_string(),
            "--quic".into(),
            sa(c.gateway, 15443).to_string(),
            "--admin".into(),
            sa(c.gateway, 15000).to_string(),
        ]);
        args.extend(export.iter().cloned());
        procs.spawn(&format!("{}-gateway", c.name), args, &logs)?;
        for w in &c.workloads {
            let sa_name = if w.app.is_some() { "echo" } else { "frontend" };
            if let Some(port) = w.app {
                let args = vec![
                    "echo".into(),
                    "--listen".into(),
                    sa(w.address, port).to_string(),
                    "--cluster".into(),
                    c.name.clone(),
                    "--workload".into(),
                    w.name.clone(),
                ];
                procs.spawn(&format!("{}-app", w.name), args, &logs)?;
            }
            let token = isthmus_controller::mint_workload_token(
                &state, &c.name, NAMESPACE, sa_name, TOKEN_TTL,
            )?;
            let mut args = common("sidecar");
            args.extend([
                "--workload".into(),
                format!("{NAMESPACE}/{}", w.name),
                "--service-account".into(),
                sa_name.into(),
                "--locality".into(),
                c.locality.clone(),
                "--token".into(),
                token,
                "--outbound".into(),
                sa(w.address, 15001).to_string(),
                "--inbound".into(),
                sa(w.address, 15008).to_string(),
                "--admin".into(),
                sa(w.address, 15000).to_string(),
                // The DNS proxy, as capture would reach it in a pod (names outside the
                // mesh go to this host's resolvers).
                "--dns".into(),
                sa(w.address, 15053).to_string(),
            ]);
            if let Some(port) = w.app {
                args.extend(["--app".into(), sa(w.address, port).to_string()]);
            }
            if otlp.is_some() {
                args.extend(export.iter().cloned());
                args.extend(["--trace-sampling".into(), "100".into()]);
            }
            procs.spawn(&format!("{}-sidecar", w.name), args, &logs)?;
        }
    }
    for c in &topo.clusters {
        wait_until(&format!("gateway of {}", c.name), || {
            ready(&client, sa(c.gateway, 15000))
        })
        .await?;
        for w in &c.workloads {
            wait_until(&format!("sidecar of {}", w.name), || {
                ready(&client, sa(w.address, 15000))
            })
            .await?;
        }
    }
    let source = topo
        .clusters
        .iter()
        .flat_map(|c| &c.workloads)
        .find(|w| w.app.is_none())
        .context("the topology has no client workload")?;
    let admin = sa(source.address, 15000);
    let remote_clusters = topo.clusters.len() - 1;
    wait_until("the client to learn every cluster serving echo", || async {
        let Ok(r) = client.get(admin, "admin", "/config_dump").await else {
            return false;
        };
        let Ok(dump) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
            return false;
        };
        dump["services"].as_array().into_iter().flatten().any(|s| {
            s["service"] == SERVICE_HOST
                && s["remote"].as_array().map(Vec::len) == Some(remote_clusters)
        })
    })
    .await?;
    Ok(sa(source.address, 15001))
}

struct PhaseResult {
    name: String,
    requests: usize,
    failed: usize,
    landed: BTreeMap<String, usize>,
    /// When the first request landed where the phase expects traffic.
    failover: Option<Duration>,
    /// The longest any request took (retries included).
    longest: Duration,
    verdict: Result<(), String>,
}

/// What a phase expects: where traffic lands, and how soon it must get there.
#[derive(Clone, Copy)]
struct Expect<'a> {
    cluster: &'a str,
    within: Option<Duration>,
}

/// Runs one phase: waits until traffic lands only where it should (or the deadline
/// passes), then keeps going for `hold`; prints a line a second.
async fn phase(
    name: &str,
    traffic: &Traffic,
    expect: Expect<'_>,
    hold: Duration,
    deadline: Duration,
) -> PhaseResult {
    let start = Instant::now();
    let mut settled_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let evs = traffic.since(start);
        let mut res = summarize(name, &evs, start, expect.cluster);
        let landed: Vec<String> = res
            .landed
            .iter()
            .map(|(c, n)| format!("{c} {n:>4}"))
            .collect();
        println!(
            "  {name:<22} +{:>4.1}s  {}  failed {}",
            start.elapsed().as_secs_f64(),
            landed.join("  "),
            res.failed
        );
        for e in evs
            .iter()
            .filter(|e| e.at.elapsed() < Duration::from_secs(1))
        {
            if let Err(why) = &e.landed {
                println!("    request failed: {why}");
            }
        }
        let recent: Vec<&Event> = evs
            .iter()
            .filter(|e| e.at.elapsed() < Duration::from_millis(900))
            .collect();
        let home = !recent.is_empty()
            && recent
                .iter()
                .all(|e| e.landed.as_deref() == Ok(expect.cluster));
        if home && settled_at.is_none() {
            settled_at = Some(Instant::now());
        }
        if settled_at.is_some_and(|t| t.elapsed() >= hold) || start.elapsed() >= deadline {
            res.verdict = verdict(&res, &evs, settled_at, expect);
            return res;
        }
    }
}

fn summarize(name: &str, evs: &[Event], start: Instant, expect: &str) -> PhaseResult {
    let mut res = PhaseResult {
        name: name.to_owned(),
        requests: evs.len(),
        failed: 0,
        landed: BTreeMap::new(),
        failover: None,
        longest: evs.iter().map(|e| e.took).max().unwrap_or_default(),
        verdict: Ok(()),
    };
    for e in evs {
        match &e.landed {
            Ok(c) => {
                *res.landed.entry(c.clone()).or_default() += 1;
                if c == expect && res.failover.is_none() {
                    res.failover = Some(e.at.duration_since(start));
                }
            }
            Err(_) => res.failed += 1,
        }
    }
    res
}

fn verdict(
    res: &PhaseResult,
    evs: &[Event],
    settled_at: Option<Instant>,
    expect: Expect<'_>,
) -> Result<(), String> {
    if res.failed > 0 {
        return Err(format!("{} requests failed", res.failed));
    }
    if let (Some(budget), Some(took)) = (expect.within, res.failover) {
        if took > budget {
            return Err(format!(
                "traffic reached {} after {:.2}s, over the {:.1}s budget",
                expect.cluster,
                took.as_secs_f64(),
                budget.as_secs_f64()
            ));
        }
    }
    let expect = expect.cluster;
    let Some(settled) = settled_at else {
        return Err(format!("traffic never settled in {expect}"));
    };
    let strays = evs
        .iter()
        .filter(|e| e.at >= settled && e.landed.as_deref() != Ok(expect))
        .count();
    if strays > 0 {
        return Err(format!(
            "{strays} requests landed outside {expect} after traffic settled"
        ));
    }
    Ok(())
}

/// Every TCP address the topology's processes will listen on.
fn addresses(topo: &Topology) -> Vec<SocketAddr> {
    let mut out = vec![
        sa(topo.federation.address, 15200),
        sa(topo.federation.address, 15014),
    ];
    for c in &topo.clusters {
        out.extend([
            sa(c.controller, 15012),
            sa(c.controller, 15014),
            sa(c.gateway, 15008),
            sa(c.gateway, 15000),
        ]);
        for w in &c.workloads {
            out.extend([15001, 15008, 15000].map(|p| sa(w.address, p)));
            out.extend(w.app.map(|p| sa(w.address, p)));
        }
    }
    out
}

/// Fails, naming the address, if any the demo needs is taken (most likely by an earlier
/// demo that is still running).
async fn check_addresses_free(topo: &Topology) -> anyhow::Result<()> {
    for addr in addresses(topo) {
        if let Err(e) = tokio::net::TcpListener::bind(addr).await {
            anyhow::bail!(
                "{addr} is not free ({e}): is an earlier `isthmus demo` still running? \
                 `ss -ltnp 'sport = :{}'` shows who holds it",
                addr.port()
            );
        }
    }
    Ok(())
}

/// Runs the demo; returns whether every phase behaved. SIGTERM or SIGINT stop it (and
/// its children) at any point.
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    let topo: Topology =
        serde_yaml_ng::from_str(TOPOLOGY).context("deploy/demo/topology.yaml is invalid")?;
    check_addresses_free(&topo).await?;
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let mut procs = Procs::new()?;
    println!(
        "isthmus demo: federation + {} clusters on loopback; state and logs in {}",
        topo.clusters.len(),
        dir.display()
    );
    let outcome = tokio::select! {
        r = demo(&topo, &dir, &opts, &mut procs) => r,
        signal = crate::process::shutdown_signal(false) => {
            println!("\n{signal}: stopping every process of the demo");
            procs.kill_all().await;
            return Ok(false);
        }
    };
    if opts.keep_running && outcome.is_ok() {
        let signal = crate::process::shutdown_signal(false).await;
        println!("\n{signal}: stopping every process of the demo");
    }
    procs.kill_all().await;
    outcome
}

async fn demo(
    topo: &Topology,
    dir: &Path,
    opts: &Options,
    procs: &mut Procs,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let outbound = start_mesh(topo, dir, procs, opts.otlp.as_ref())
        .await
        .map_err(|e| {
            e.context(format!(
                "the mesh did not come up; see the logs in {}",
                dir.join("logs").display()
            ))
        })?;
    println!(
        "mesh up in {:.1}s; client in east sends steady traffic to {SERVICE_HOST}",
        started.elapsed().as_secs_f64()
    );
    if let Some((endpoint, protocol)) = &opts.otlp {
        println!(
            "every sidecar and gateway exports to {endpoint} ({protocol}): each request is one trace\n(client sidecar, gateways, server sidecar; services `<workload>.demo` and\n`istio-eastwestgateway.isthmus-system`), Istio's metrics every 5 s, and access logs"
        );
    }
    let dns = SocketAddr::new(outbound.ip(), 15053);
    let (vip, cluster) = mesh_dns(dns, outbound).await?;
    println!(
        "the client's sidecar DNS ({dns}) answers {SERVICE_HOST} with {vip}, a virtual IP the\ncontroller allocated; a request to {vip} through the sidecar reached {cluster}\n"
    );
    let results = scenario(procs, outbound, opts.phase_secs).await?;
    print_summary(&results);
    let passed = results.iter().all(|r| r.verdict.is_ok());
    if opts.keep_running {
        print_addresses(topo, outbound);
    }
    Ok(passed)
}

/// The mesh's DNS as an app behind the client's sidecar meets it (with capture, every
/// query of the pod goes there): the service's name resolves to an address of the mesh,
/// and a request to that address reaches the service. Returns the address and the cluster
/// that answered.
async fn mesh_dns(dns: SocketAddr, outbound: SocketAddr) -> anyhow::Result<(IpAddr, String)> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    let mut server = NameServerConfig::udp(dns.ip());
    for c in &mut server.connections {
        c.port = dns.port();
    }
    let resolver = hickory_resolver::TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![server]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    )
    .build()
    .context("a DNS client")?;
    let name = format!("{SERVICE_HOST}.");
    let vip = resolver
        .lookup_ip(name.as_str())
        .await
        .with_context(|| format!("resolving {SERVICE_HOST} through the sidecar's DNS at {dns}"))?
        .iter()
        .next()
        .with_context(|| format!("{SERVICE_HOST} has no address in the sidecar's DNS"))?;
    // The mesh has just come up: the first request may race the endpoints' first health
    // reports, so it gets a moment before it counts as a failure.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let reply = AppClient::new()
            .get(outbound, &vip.to_string(), "/")
            .await
            .with_context(|| format!("a request to {vip} through the client's sidecar"))?;
        if reply.status == 200 {
            return Ok((vip, reply.answer()?.cluster));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a request to {vip} through the client's sidecar got status {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body).trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario(
    procs: &mut Procs,
    outbound: SocketAddr,
    phase_secs: u64,
) -> anyhow::Result<Vec<PhaseResult>> {
    let traffic = Traffic::start(outbound, SERVICE_HOST, REQUEST_GAP);
    let hold = Duration::from_secs(phase_secs);
    let deadline = Duration::from_secs(phase_secs + 20);
    let at = |cluster| Expect {
        cluster,
        within: None,
    };
    let soon = |cluster| Expect {
        cluster,
        within: Some(FAILOVER_BUDGET),
    };
    let mut results = vec![phase("1 baseline", &traffic, at("east"), hold, deadline).await];
    println!("  -- freezing the echo workload in east (SIGSTOP: sockets open, nothing answers)");
    procs.signal("echo-east-sidecar", "STOP").await?;
    procs.signal("echo-east-app", "STOP").await?;
    results.push(
        phase(
            "2 east backend hung",
            &traffic,
            soon("west"),
            hold,
            deadline,
        )
        .await,
    );
    println!("  -- freezing west's gateway (SIGSTOP)");
    procs.signal("west-gateway", "STOP").await?;
    results.push(phase("3 west gateway hung", &traffic, soon("eu"), hold, deadline).await);
    println!("  -- resuming the east workload and west's gateway (SIGCONT)");
    procs.signal("echo-east-app", "CONT").await?;
    procs.signal("echo-east-sidecar", "CONT").await?;
    procs.signal("west-gateway", "CONT").await?;
    results.push(phase("4 restored", &traffic, at("east"), hold, deadline).await);
    Ok(results)
}

fn print_summary(results: &[PhaseResult]) {
    println!(
        "\n{:<22} {:>8} {:>7}  {:<30} {:>10} {:>9}  verdict",
        "phase", "requests", "failed", "landed", "settled in", "longest"
    );
    for r in results {
        let landed = r
            .landed
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let failover = r
            .failover
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let verdict = match &r.verdict {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("FAILED: {e}"),
        };
        println!(
            "{:<22} {:>8} {:>7}  {:<30} {:>10} {:>8.2}s  {verdict}",
            r.name,
            r.requests,
            r.failed,
            landed,
            failover,
            r.longest.as_secs_f64()
        );
    }
}

fn print_addresses(topo: &Topology, outbound: SocketAddr) {
    println!("\nThe mesh stays up until Ctrl-C (or SIGTERM). Try:");
    println!(
        "  curl -H 'Host: {SERVICE_HOST}' http://{outbound}/          # from the client in east"
    );
    println!(
        "  dig @{} -p 15053 {SERVICE_HOST}         # the client's sidecar DNS",
        outbound.ip()
    );
    for c in &topo.clusters {
        println!("  cluster {:<5} controller metrics http://{}/config_dump   gateway http://{}/stats/prometheus", c.name, sa(c.controller, 15014), sa(c.gateway, 15000));
        for w in &c.workloads {
            println!(
                "    {:<10} sidecar outbound http://{}  admin http://{}/config_dump",
                w.name,
                sa(w.address, 15001),
                sa(w.address, 15000)
            );
        }
    }
    println!(
        "  federation registry http://{}/config_dump",
        sa(topo.federation.address, 15014)
    );
}
