//! `isthmus`: one binary for every role of the mesh (federation, controller, gateway,
//! sidecar), the sample app, and the tools users need (validate, tokens, the local demo).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use isthmus_core::config::NamespacedName;
use isthmus_core::locality::Locality;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Isthmus: a multi-cluster, federated service mesh",
    long_about = "Isthmus connects several clusters into one mesh: sidecars \
do mTLS between workloads, east-west gateways carry traffic between clusters over QUIC, each cluster's controller pushes config and runs \
its CA, and the federation controller merges the clusters' registries under one trust root.\n\nStart with `isthmus demo`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Stop (draining first, as on SIGTERM) when standard input closes: a supervisor that
    /// holds the other end of a pipe takes this process with it, even if the supervisor is
    /// killed. `isthmus demo` starts every child this way.
    #[arg(long, global = true)]
    exit_with_stdin: bool,
    /// Worker threads of this process (Envoy's and ztunnel's `--concurrency`); default one
    /// per CPU. A sidecar next to a busy app usually wants 1 or 2.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local multi-cluster demo: federation + three clusters on loopback, steady
    /// traffic, failover and recovery; exits 0 only if every phase behaved.
    Demo(DemoArgs),
    /// Check a folder of config YAML the way the controller does; exit 1 with every fault
    /// (file, document, field) when any is found.
    Validate {
        /// A file, a folder (searched recursively for *.yaml and *.yml) or `-` for standard
        /// input; repeat to validate several together, as one config.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Report every finding about a set of config objects, with its severity, as
    /// `istioctl analyze` does: errors reject an object, warnings are references to objects
    /// that do not exist (yet), infos are deprecated fields and documents that are not mesh
    /// config. Exits 79 when a finding reaches the failure threshold.
    Analyze {
        /// A file, a folder (searched recursively for *.yaml and *.yml) or `-` for standard
        /// input; repeat to analyze several together.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
        /// The least severe finding that fails the command: Info, Warning or Error.
        #[arg(long, default_value = "Error")]
        failure_threshold: isthmus_core::config::analyze::Severity,
        /// The least severe finding printed: Info, Warning or Error.
        #[arg(long, default_value = "Info")]
        output_threshold: isthmus_core::config::analyze::Severity,
    },
    /// Run the federation controller: the shared root CA and the global registry.
    Federation(FederationArgs),
    /// Run a cluster's controller: config from a folder, config push, the cluster CA.
    Controller(ControllerArgs),
    /// Run a cluster's east-west gateway.
    Gateway(GatewayArgs),
    /// Run a workload's sidecar proxy.
    Sidecar(Box<SidecarArgs>),
    /// Run the sample app (HTTP/1.1, HTTP/2 and gRPC echo).
    Echo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Cluster name the app reports.
        #[arg(long)]
        cluster: String,
        /// Workload name the app reports.
        #[arg(long)]
        workload: String,
        /// Also echo plain TCP on this address.
        #[arg(long)]
        tcp: Option<SocketAddr>,
    },
    /// List the proxies connected to a cluster's controller and whether each holds the
    /// config last pushed to it, per resource type (SYNCED, STALE: pushed and not yet
    /// acknowledged, NACK: rejected, with the proxy's reason, NOT SENT), as
    /// `istioctl proxy-status` does.
    Status {
        /// The controller's admin listener (its --admin).
        #[arg(long, default_value = "127.0.0.1:15014", value_parser = resolve_addr)]
        controller_admin: SocketAddr,
    },
    /// Explain how a workload's sidecar would route a request, step by step with each
    /// reason, from its live config and health: the name's resolution, the registry entry
    /// (this cluster's endpoints, the clusters that export it and how current each is),
    /// the route and policy, the candidates by locality tier with why any is out (ejected,
    /// cluster unreachable), and the choice. Nothing is sent.
    Explain {
        /// The host the app calls, with its port if not the service's first: e.g.
        /// echo.demo.svc.cluster.local or reviews:9080.
        host: String,
        /// The source workload's sidecar admin listener (its --admin).
        #[arg(long, default_value = "127.0.0.1:15000", value_parser = resolve_addr)]
        proxy_admin: SocketAddr,
        /// The request's path (with its query), for route matching.
        #[arg(long, default_value = "/")]
        path: String,
        /// The request's method, for route matching.
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `name:value`, for route matching; repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Print the sidecar's answer as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Mint bootstrap tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Rotate the mesh's root CA with no outage, or show how a rotation stands (run where
    /// the federation's state folder is).
    #[command(subcommand)]
    Root(RootCommand),
    /// Manage the clusters of the federation (run where the federation's state folder is;
    /// a cluster joins with `isthmus token join` and its controller).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure parts of the product on this machine and print the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the manifests that put Isthmus on a Kubernetes cluster, for `kubectl apply -f -`.
    #[command(subcommand)]
    Install(InstallCommand),
    /// Set up transparent capture in this network namespace (a pod's init step, as Istio's
    /// istio-iptables): outbound TCP to the sidecar's 15001, inbound TCP to its 15006, the
    /// proxy's own traffic excepted. nftables where `nft` exists, else iptables. Lists take
    /// Istio's annotation syntax: comma-separated, `*` for all.
    Iptables(CaptureArgs),
}

#[derive(Args)]
struct CaptureArgs {
    /// Remove the rules instead.
    #[arg(long)]
    cleanup: bool,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
    /// The sidecar's user: its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The sidecar's group: its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    proxy_gid: u32,
    /// Where captured outbound connections go.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Where captured inbound connections go.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Outbound destinations captured (includeOutboundIPRanges).
    #[arg(long, default_value = "*")]
    include_outbound_cidrs: String,
    /// Outbound destinations left alone (excludeOutboundIPRanges).
    #[arg(long, default_value = "")]
    exclude_outbound_cidrs: String,
    /// Outbound ports captured (includeOutboundPorts).
    #[arg(long, default_value = "*")]
    include_outbound_ports: String,
    /// Outbound ports left alone (excludeOutboundPorts).
    #[arg(long, default_value = "")]
    exclude_outbound_ports: String,
    /// Inbound ports captured (includeInboundPorts).
    #[arg(long, default_value = "*")]
    include_inbound_ports: String,
    /// Inbound ports left alone (excludeInboundPorts); the sidecar's own are always left.
    #[arg(long, default_value = "")]
    exclude_inbound_ports: String,
    /// Capture the pod's DNS queries (UDP and TCP port 53) to the resolvers its
    /// /etc/resolv.conf names, for the sidecar's DNS proxy (Istio's DNS capture).
    #[arg(long)]
    redirect_dns: bool,
    /// With --redirect-dns: capture DNS queries to any server, not only the pod's resolvers.
    #[arg(long, requires = "redirect_dns")]
    capture_all_dns: bool,
    /// Where captured DNS queries go (the sidecar's --dns port).
    #[arg(long, default_value_t = 15053)]
    dns_port: u16,
}

impl CaptureArgs {
    fn rules(&self) -> anyhow::Result<isthmus_sidecar::capture::Rules> {
        use isthmus_sidecar::capture::{parse_list, Cidr, Scope};
        // An exclusion list of `*` excludes nothing more than an empty one.
        fn only<T>(s: Scope<T>) -> Vec<T> {
            match s {
                Scope::All => Vec::new(),
                Scope::Only(v) => v,
            }
        }
        let flag = |name: &str, e: String| anyhow::anyhow!("--{name}: {e}");
        Ok(isthmus_sidecar::capture::Rules {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            include_outbound_cidrs: parse_list::<Cidr>(&self.include_outbound_cidrs, "IP range")
                .map_err(|e| flag("include-outbound-cidrs", e))?,
            exclude_outbound_cidrs: only(
                parse_list::<Cidr>(&self.exclude_outbound_cidrs, "IP range")
                    .map_err(|e| flag("exclude-outbound-cidrs", e))?,
            ),
            include_outbound_ports: parse_list(&self.include_outbound_ports, "port")
                .map_err(|e| flag("include-outbound-ports", e))?,
            exclude_outbound_ports: only(
                parse_list(&self.exclude_outbound_ports, "port")
                    .map_err(|e| flag("exclude-outbound-ports", e))?,
            ),
            include_inbound_ports: parse_list(&self.include_inbound_ports, "port")
                .map_err(|e| flag("include-inbound-ports", e))?,
            exclude_inbound_ports: only(
                parse_list(&self.exclude_inbound_ports, "port")
                    .map_err(|e| flag("exclude-inbound-ports", e))?,
            ),
            redirect_dns: match (self.redirect_dns, self.capture_all_dns) {
                (false, _) => None,
                (true, true) => Some(Scope::All),
                (true, false) => {
                    let conf = std::fs::read_to_string(RESOLV_CONF)
                        .with_context(|| format!("--redirect-dns: reading {RESOLV_CONF}"))?;
                    let servers: Vec<std::net::IpAddr> = isthmus_sidecar::dns::nameservers(&conf)
                        .into_iter()
                        .map(|a| a.ip())
                        .collect();
                    anyhow::ensure!(
                        !servers.is_empty(),
                        "--redirect-dns: {RESOLV_CONF} names no nameserver; add --capture-all-dns to capture DNS to any server"
                    );
                    Some(Scope::Only(servers))
                }
            },
            dns_port: self.dns_port,
        })
    }
}

/// Where a pod's (or host's) resolvers are named.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A resolver's address: `ip` (port 53) or `ip:port`.
fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("`{s}` is not an IP address or IP:port"))
}

/// Feeds `input` to `program args` and fails with its error output.
fn run_with_input(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Whether `program` can be run here.
fn present(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

fn capture(a: &CaptureArgs) -> anyhow::Result<std::process::ExitCode> {
    use isthmus_sidecar::capture;
    let rules = a.rules()?;
    let nft = present("nft");
    if a.dry_run {
        let text = match (nft, a.cleanup) {
            (true, false) => rules.nft(),
            (true, true) => capture::nft_cleanup(),
            (false, false) => rules.iptables(true) + &rules.iptables(false),
            (false, true) => capture::iptables_cleanup(),
        };
        return print_out(&text);
    }
    if nft {
        let script = if a.cleanup {
            capture::nft_cleanup()
        } else {
            rules.nft()
        };
        run_with_input("nft", &["-f", "-"], &script)?;
    } else if present("iptables-restore") {
        for (program, v4) in [("iptables-restore", true), ("ip6tables-restore", false)] {
            let script = if a.cleanup {
                capture::iptables_cleanup()
            } else {
                rules.iptables(v4)
            };
            if v4 || present(program) {
                run_with_input(program, &["--noflush"], &script)?;
            }
        }
    } else {
        anyhow::bail!("neither nft nor iptables-restore is installed; capture cannot be set up");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum InstallCommand {
    /// The CustomResourceDefinitions of the mesh config kinds alone.
    Crds,
    /// Everything one cluster needs: namespace, CRDs, the controller (RBAC, StatefulSet,
    /// Service, admission webhook), the east-west gateway, and optionally the federation.
    Kubernetes(Box<InstallArgs>),
}

#[derive(Args)]
struct InstallArgs {
    /// This cluster's name, as the federation knows it.
    #[arg(long)]
    cluster: String,
    /// The federation's address, host:port, as this cluster's pods reach it.
    #[arg(long)]
    federation: String,
    /// The mesh's trust anchor: the federation's root-cert.pem.
    #[arg(long)]
    trust_anchor: PathBuf,
    /// A join token from `isthmus token join`. Without it, create the Secret isthmus-join
    /// (key `token`) in the namespace before the controller starts.
    #[arg(long, env = "ISTHMUS_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The namespace Isthmus runs in.
    #[arg(long, default_value = isthmus_core::identity::SYSTEM_NAMESPACE)]
    namespace: String,
    /// The container image with the isthmus binary.
    #[arg(long, default_value = "ghcr.io/isthmus-mesh/isthmus:latest")]
    image: String,
    /// Trust domain of every SPIFFE ID in the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Controller replicas; they elect a leader, and each serves proxies.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// The address peer gateways reach this cluster's gateway at, host:port (its
    /// LoadBalancer's). Without it, the gateway pod's IP.
    #[arg(long)]
    gateway_address: Option<String>,
    /// Also run the federation in this cluster, with this root CA certificate (with
    /// --federation-root-key).
    #[arg(long, requires = "federation_root_key")]
    federation_root_cert: Option<PathBuf>,
    /// The private key of --federation-root-cert (PEM); it goes into a Secret only the
    /// federation mounts.
    #[arg(long, requires = "federation_root_cert")]
    federation_root_key: Option<PathBuf>,
    /// Replicas of the federation (with --federation-root-cert). They elect a leader with
    /// a Lease; the leader keeps the federation's state in a Secret, and another replica
    /// takes over from it within seconds when the leader's pod or node is lost.
    #[arg(long, default_value_t = 2)]
    federation_replicas: u32,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The control plane at scale: federates many clusters on this machine (federation
    /// and controllers as processes, lightweight xDS clients in this one), grows the
    /// endpoints through the given totals, and prints convergence time and memory at each,
    /// then the time from one endpoint change to every client that sees it (p50/p99), the
    /// bytes each change costs, how far behind changes at a steady rate for 10 s leave the
    /// clients, and the resync time after a controller restart. Each
    /// controller takes a loopback address 127.0.(200+N).1; the federation 127.0.199.1.
    Registry(isthmus::bench::Options),
    /// What a WebAssembly plugin costs the sidecar (on its wasmi interpreter): the time
    /// to validate, compile and instantiate the module, the memory each instance adds,
    /// and the time one request takes through it (a new HTTP context, request and response
    /// headers). Run it with a plugin that does nothing to see the host's own cost; the
    /// sidecar-pair benchmark (`bench/run.sh`, setup `isthmus-wasm`) gives CPU per request
    /// through real sidecars beside the same pair without a plugin.
    Wasm(WasmBenchArgs),
}

#[derive(Args)]
struct WasmBenchArgs {
    /// The module (a .wasm file speaking the proxy-wasm ABI 0.2.x).
    #[arg(long)]
    module: PathBuf,
    /// The root id the module registers its plugin under (a WasmPlugin's pluginName).
    #[arg(long, default_value = "")]
    plugin_name: String,
    /// The plugin's configuration (a WasmPlugin's pluginConfig, as JSON).
    #[arg(long, default_value = "{}")]
    plugin_config: String,
    /// Instances made to measure the memory of one.
    #[arg(long, default_value_t = 200)]
    instances: usize,
    /// Requests run to measure the time of one.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
}

#[derive(Args)]
struct DemoArgs {
    /// Leave the mesh up after the scenario and print addresses to curl; Ctrl-C stops it.
    #[arg(long)]
    keep_running: bool,
    /// Folder for state, config and logs (default: a temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds of steady traffic in each phase once it has settled.
    #[arg(long, default_value_t = 3)]
    phase_seconds: u64,
    /// An OpenTelemetry collector (`http://host:4317` for gRPC) every sidecar and gateway
    /// exports to: every request traced, Istio's metrics, access logs.
    #[arg(long)]
    otlp: Option<String>,
    /// The collector's protocol: `grpc` or `http/protobuf` (then `http://host:4318`).
    #[arg(long, default_value = "grpc")]
    otlp_protocol: isthmus_core::otlp::Protocol,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// A join token that lets a cluster's controller join the federation (run where the
    /// federation's state folder is).
    Join {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// A bootstrap token proving a workload identity to a cluster's CA, for a sidecar or
    /// gateway outside Kubernetes (run where the controller's state folder is).
    Workload {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum RootCommand {
    /// Start a root rotation, or resume the one in progress, and follow it to the end:
    /// the new root joins every trust bundle, then every cluster CA and every certificate
    /// is reissued under it, then the old root leaves every bundle. Each phase waits until
    /// every cluster and every proxy has done its part; progress is printed per cluster
    /// and lagging proxy. The federation drives it and keeps it in its state folder, so
    /// it survives this command stopping and the federation restarting.
    Rotate {
        #[command(flatten)]
        at: FederationOperator,
        /// The new root, when you bring your own (as Istio's cacerts): a self-signed CA
        /// certificate (PEM). Without it the federation creates one.
        #[arg(long, requires = "new_root_key")]
        new_root_cert: Option<PathBuf>,
        /// The private key of --new-root-cert (PEM).
        #[arg(long, requires = "new_root_cert")]
        new_root_key: Option<PathBuf>,
        /// Hold the rotation where it is instead; `isthmus root rotate` resumes it.
        #[arg(long, conflicts_with_all = ["new_root_cert", "no_wait"])]
        pause: bool,
        /// Start or resume, print the status, and return without following.
        #[arg(long)]
        no_wait: bool,
        /// Give up following after this long (the rotation itself goes on).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Where a root rotation stands: its phase, and per cluster what it waits for.
    Status {
        #[command(flatten)]
        at: FederationOperator,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Remove a cluster from the federation, with no restart anywhere: its controller is
    /// cut off and refused from then on, its services and gateways leave every other
    /// cluster's registry at once (traffic moves away), and after --drain every proxy and
    /// gateway refuses the certificates its CA issued (open links to it are closed). The
    /// name cannot join again.
    Remove {
        /// The cluster to remove.
        cluster: String,
        #[command(flatten)]
        at: FederationOperator,
        /// How long connections already open to the cluster may go on before its
        /// certificates are refused.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        drain: Duration,
    },
}

#[derive(Args)]
struct FederationOperator {
    /// The federation's state folder: its operator token is minted from the key there.
    #[arg(long)]
    state_dir: PathBuf,
    /// The federation's gRPC listener.
    #[arg(long, default_value = "127.0.0.1:15200", value_parser = resolve_addr)]
    federation: SocketAddr,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

impl FederationOperator {
    fn operator(self) -> isthmus::operator::Operator {
        isthmus::operator::Operator {
            federation: self.federation,
            state_dir: self.state_dir,
            trust_domain: self.trust_domain,
        }
    }
}

#[derive(Args)]
struct FederationArgs {
    /// Trust domain of every SPIFFE ID in the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Folder for the root CA (unless given) and the join-token key.
    #[arg(long)]
    state_dir: PathBuf,
    /// gRPC (mTLS) listener for cluster controllers: join and exports.
    #[arg(long, default_value = "0.0.0.0:15200")]
    listen: SocketAddr,
    /// Admin listener (/ready, /stats/prometheus, /config_dump, POST /logging). Keep it on
    /// loopback: it shows the whole config; POST /logging answers loopback callers only.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// Metrics-only listener (/ready, /stats/prometheus) for scrapers on other hosts,
    /// e.g. 0.0.0.0:15014 in a pod. Off unless given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A root CA certificate to use instead of creating one (with --root-key).
    #[arg(long, requires = "root_key")]
    root_cert: Option<PathBuf>,
    #[arg(long, requires = "root_cert")]
    root_key: Option<PathBuf>,
    /// Region failover order, FROM=TO, repeatable and ordered: when FROM has no healthy
    /// endpoint, traffic goes to TO before other regions.
    #[arg(long, value_parser = parse_failover)]
    failover: Vec<(String, String)>,
    /// Lifetime of each cluster's CA. It bounds how long a cluster keeps issuing
    /// certificates while the federation is away (no certificate outlives its CA);
    /// controllers renew their CA in place at half-life while the federation is reachable.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    cluster_ca_ttl: Duration,
    /// Lifetime of each controller's own certificate, renewed in place at half-life.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    controller_cert_ttl: Duration,
    /// Withdraw the exports of a cluster that has not reported for this long, until it
    /// reports again. Unset, they keep serving (marked stale everywhere) until then.
    #[arg(long, value_parser = parse_duration)]
    forget_silent_after: Option<Duration>,
    /// Run as one of several replicas, with the Kubernetes API server as the shared store:
    /// the replicas elect a leader with the Lease isthmus-federation; only the leader
    /// listens for controllers, and it keeps the state folder (root CA, join-token key,
    /// rotation, every cluster's last exports) in the Secret isthmus-federation-state. A
    /// replica that takes over restores the folder from that Secret and serves the last
    /// registry at once. Give controllers every replica's address, or a Service whose
    /// endpoints are the ready pods (a standby's /ready answers 503).
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: the kubeconfig to reach the API server with (its current
    /// context). Without it, as kubectl finds one, or the pod's service account.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: the namespace of the Lease and the Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "isthmus-system")]
    namespace: String,
    /// With --kubernetes: this replica's name in the Lease; the pod's name in a cluster.
    #[arg(long, env = "POD_NAME")]
    replica: Option<String>,
}

#[derive(Args)]
struct ControllerArgs {
    /// This cluster's name, as the federation knows it.
    #[arg(long)]
    cluster: String,
    /// Trust domain of every SPIFFE ID in the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Folder of YAML documents: Services, WorkloadEntries, ServiceExports and Istio's
    /// traffic kinds, watched for changes (the file adapter).
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API server instead of a folder: Services,
    /// EndpointSlices, Pods, Nodes, and the mesh config as custom resources.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig to reach the API server with (its current context). Without it, as
    /// kubectl finds one ($KUBECONFIG, ~/.kube/config), or the pod's service account when
    /// running in a cluster.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// With --kubernetes: where the validating admission webhook listens (HTTPS, called by
    /// the API server through the isthmus-validator ValidatingWebhookConfiguration, whose
    /// caBundle the controller fills in).
    #[arg(long, default_value = "0.0.0.0:15017")]
    webhook_listen: SocketAddr,
    /// With --kubernetes: run no admission webhook; bad objects are then refused only in
    /// their status, after they are stored.
    #[arg(long)]
    no_webhook: bool,
    /// With --kubernetes: the namespace of the Lease replicas elect their leader with (only
    /// the leader writes statuses, Events and the webhook's CA bundle).
    #[arg(long, env = "POD_NAMESPACE", default_value = "isthmus-system")]
    lease_namespace: String,
    /// With --kubernetes: this replica's name in the Lease; the pod's name in a cluster.
    #[arg(long, env = "POD_NAME")]
    replica: Option<String>,
    /// With --kubernetes: inject sidecars running this image into new pods of namespaces
    /// labelled istio-injection=enabled or isthmus.io/inject=enabled (through the
    /// isthmus-injector MutatingWebhookConfiguration). Without it, no injection.
    #[arg(long)]
    proxy_image: Option<String>,
    /// Folder for the cluster CA, keys and the last global registry.
    #[arg(long)]
    state_dir: PathBuf,
    /// gRPC (mTLS) listener for the cluster's proxies: config streams and the CA.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Admin listener (/ready, /stats/prometheus, /config_dump, POST /logging). Keep it on
    /// loopback: it shows the whole config; POST /logging answers loopback callers only.
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// Metrics-only listener (/ready, /stats/prometheus) for scrapers on other hosts,
    /// e.g. 0.0.0.0:15014 in a pod. Off unless given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The federation controller's address, as host:port (a name is resolved at start).
    /// Repeat it, or separate with commas, for several: the controller uses the first that
    /// answers and moves to the next when it stops.
    #[arg(long, value_parser = resolve_addr, value_delimiter = ',', required = true)]
    federation: Vec<SocketAddr>,
    /// PEM root(s) to verify the federation with before joining.
    #[arg(long)]
    federation_root: PathBuf,
    /// Join token from `isthmus token join`; needed on first start only.
    #[arg(long, env = "ISTHMUS_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Lifetime of the workload certificates this cluster's CA issues.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    workload_cert_ttl: Duration,
    /// Config and health changes within this window go out to proxies in one push
    /// (Istio's PILOT_DEBOUNCE_AFTER).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    push_debounce: Duration,
    /// How often the keys of JWT issuers that RequestAuthentications name by URL (jwksUri,
    /// or the issuer's OpenID discovery) are fetched again, so a key rotation reaches the
    /// proxies (Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL). A failed fetch keeps the last
    /// keys and retries sooner.
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    jwks_refresh: Duration,
    /// PEM file of extra roots to trust when fetching those keys over HTTPS (the system's
    /// trust store is always used).
    #[arg(long)]
    jwks_extra_roots: Option<PathBuf>,
}

#[derive(Args)]
struct ProxyArgs {
    /// The cluster this proxy belongs to.
    #[arg(long)]
    cluster: String,
    /// Trust domain of every SPIFFE ID in the mesh.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The cluster controller's gRPC address, as host:port (a name is resolved at start).
    #[arg(long, value_parser = resolve_addr)]
    controller: SocketAddr,
    /// PEM root(s) to verify the controller with before the first certificate. Read again
    /// at every first request, so a file replaced after a root rotation (the federation's
    /// new root-cert.pem) is what a proxy starting later trusts. With --root-pem too, those
    /// roots serve until the file exists (an injected sidecar, before the controller has
    /// written its namespace's isthmus-ca-root-cert ConfigMap).
    #[arg(long, required_unless_present = "root_pem")]
    root: Option<PathBuf>,
    /// The same roots given inline, as injected sidecars get them.
    #[arg(long, env = "ISTHMUS_ROOT_PEM", hide_env_values = true)]
    root_pem: Option<String>,
    /// Bootstrap token from `isthmus token workload`.
    #[arg(long, env = "ISTHMUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// In Kubernetes: the pod's projected service-account token (audience `isthmus-ca`),
    /// read at every use so the kubelet's rotations apply. The controller checks it with
    /// the TokenReview API.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
}

impl ProxyArgs {
    /// The bootstrap roots, from --root (checked now, read again at each first request)
    /// or --root-pem.
    fn roots(&self) -> anyhow::Result<isthmus_core::ca_client::Roots> {
        use isthmus_core::ca_client::Roots;
        match (&self.root, &self.root_pem) {
            // Injected sidecars: the mounted ConfigMap, and the roots at injection until
            // it appears.
            (Some(path), Some(pem)) => Ok(Roots::File {
                path: path.clone(),
                fallback: Some(pem.clone()),
            }),
            (Some(path), None) => {
                read_pem(path)?;
                Ok(Roots::File {
                    path: path.clone(),
                    fallback: None,
                })
            }
            (None, Some(pem)) => Ok(Roots::Inline(pem.clone())),
            (None, None) => anyhow::bail!("--root or --root-pem is required"),
        }
    }

    fn token(&self) -> Option<isthmus_core::ca_client::Token> {
        use isthmus_core::ca_client::Token;
        match (&self.token, &self.token_file) {
            (Some(t), _) => Some(Token::Inline(t.clone())),
            (None, Some(path)) => Some(Token::File(path.clone())),
            (None, None) => None,
        }
    }
}

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    proxy: ProxyArgs,
    /// Tunnel listener for the cluster's sidecars.
    #[arg(long, default_value = "0.0.0.0:15008")]
    tunnel: SocketAddr,
    /// QUIC listener for peer gateways (UDP).
    #[arg(long, default_value = "0.0.0.0:15443")]
    quic: SocketAddr,
    /// Admin listener (/ready, /stats/prometheus, /config_dump, POST /logging). Keep it on
    /// loopback: it shows the whole config; POST /logging answers loopback callers only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Metrics-only listener (/ready, /stats/prometheus) for scrapers on other hosts,
    /// e.g. 0.0.0.0:15090 in a pod. Off unless given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The tunnel address sidecars are told, when not the --tunnel address (in a pod:
    /// the pod's IP and 15008).
    #[arg(long)]
    advertise_tunnel: Option<SocketAddr>,
    /// The QUIC address peer gateways are told, when not the --quic address (the
    /// LoadBalancer's address and 15443).
    #[arg(long)]
    advertise_quic: Option<SocketAddr>,
    #[command(flatten)]
    otlp: OtlpArgs,
}

#[derive(Args)]
struct SidecarArgs {
    #[command(flatten)]
    proxy: ProxyArgs,
    /// The WorkloadEntry this sidecar serves, as namespace/name.
    #[arg(long)]
    workload: String,
    /// The workload's service account: its identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// The workload's locality, region/zone/subzone.
    #[arg(long, default_value = "")]
    locality: String,
    /// Outbound listener the app sends plain HTTP to (Host names the service).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// With capture (`isthmus iptables`): where inbound TCP is redirected (0.0.0.0:15006
    /// in a pod); connections there go on, in plaintext, to the port they were going to.
    #[arg(long)]
    capture_inbound: Option<SocketAddr>,
    /// The DNS proxy (UDP and TCP), where `isthmus iptables --redirect-dns` sends the
    /// pod's DNS queries (127.0.0.1:15053 in a pod): mesh names are answered from the
    /// registry, others forwarded to --dns-upstream. Off unless given.
    #[arg(long)]
    dns: Option<SocketAddr>,
    /// Resolvers the DNS proxy forwards names outside the mesh to (ip or ip:port, repeat
    /// or comma-separate); by default the nameservers of /etc/resolv.conf.
    #[arg(long, value_delimiter = ',', value_parser = parse_resolver)]
    dns_upstream: Vec<SocketAddr>,
    /// mTLS tunnel listener for other proxies.
    #[arg(long, default_value = "0.0.0.0:15008")]
    inbound: SocketAddr,
    /// Admin listener (/ready, /stats/prometheus, /config_dump, POST /logging). Keep it on
    /// loopback: it shows the whole config; POST /logging answers loopback callers only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Metrics-only listener (/ready, /stats/prometheus) for scrapers on other hosts,
    /// e.g. 0.0.0.0:15090 in a pod. Off unless given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The local app's address; omit for a workload that only calls out.
    #[arg(long)]
    app: Option<SocketAddr>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    otlp: OtlpArgs,
    /// Access log lines to standard output: `off`, `text` (Envoy's default format, as
    /// Istio writes it) or `json` (Istio's field names). With --otlp-endpoint they are also
    /// exported as OTLP log records, whatever this says. Once the mesh config or a
    /// Telemetry resource configures telemetry, they choose the sidecar's access logs and
    /// tracing instead of this flag and the OTLP ones (metrics still go to
    /// --otlp-endpoint).
    #[arg(long, env = "ISTHMUS_ACCESS_LOG", default_value = "off")]
    access_log: isthmus_core::otlp::AccessLogFormat,
}

/// OTLP export of traces, metrics and access logs (OpenTelemetry's environment variables
/// work as well as the flags). For sidecars, Istio's Telemetry resources and the mesh
/// config's providers take over traces and access logs when they configure any.
#[derive(Args)]
struct OtlpArgs {
    /// The OpenTelemetry collector: `http://host:4317` for gRPC, `http://host:4318` for
    /// HTTP/protobuf (`/v1/traces`, `/v1/metrics`, `/v1/logs` are appended); `https://`
    /// for a collector behind TLS. Off unless given.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// For an `https://` collector: a PEM file of the CA certificates its certificate
    /// must chain to; the system's trust store by default.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    otlp_certificate: Option<std::path::PathBuf>,
    /// `grpc` or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    otlp_protocol: isthmus_core::otlp::Protocol,
    /// A header sent with every export, `name=value` (repeat or comma-separate), e.g. a
    /// tenant or an API key.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS", value_delimiter = ',', value_parser = parse_header)]
    otlp_header: Vec<(String, String)>,
    /// How often metrics are exported.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    otlp_metrics_interval: Duration,
    /// Percentage of the requests that start a trace here (no sampled or unsampled
    /// context from the caller) that are traced; a caller's decision is always kept.
    /// Istio's default is 1.
    #[arg(long, default_value_t = 1.0)]
    trace_sampling: f64,
}

impl OtlpArgs {
    fn config(self) -> anyhow::Result<Option<isthmus_core::otlp::Config>> {
        let Some(endpoint) = self.otlp_endpoint else {
            return Ok(None);
        };
        anyhow::ensure!(
            (0.0..=100.0).contains(&self.trace_sampling),
            "--trace-sampling {} is not a percentage (0 to 100)",
            self.trace_sampling
        );
        let ca_pem = match &self.otlp_certificate {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --otlp-certificate {}", path.display()))?,
            ),
            None => None,
        };
        Ok(Some(isthmus_core::otlp::Config {
            ca_pem,
            endpoint,
            protocol: self.otlp_protocol,
            headers: self.otlp_header,
            metrics_interval: self.otlp_metrics_interval,
            sampling: self.trace_sampling,
            resource: Vec::new(),
            ..Default::default()
        }))
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("header `{s}`: expected name=value"))?;
    http::HeaderName::try_from(k.trim())
        .map_err(|_| format!("header `{s}`: `{k}` is not a header name"))?;
    http::HeaderValue::try_from(v.trim())
        .map_err(|_| format!("header `{s}`: the value is not header text"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// What a request must be to enter the mesh, and how long the sidecar waits (Envoy's
/// defaults where Envoy has one).
#[derive(Args)]
struct LimitArgs {
    /// Largest request header block, in bytes (names plus values); larger requests get 431.
    #[arg(long, default_value_t = 60 * 1024)]
    max_request_header_bytes: usize,
    /// Most header fields in a request; more get 431.
    #[arg(long, default_value_t = 100)]
    max_request_headers: usize,
    /// Time for an HTTP/1.1 client to send a whole request head; it also bounds how long a
    /// kept-alive HTTP/1.1 connection may sit idle between requests.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_headers_timeout: Duration,
    /// Longest silence within a request or response body; a silent client gets 408.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    stream_idle_timeout: Duration,
    /// An app's connection to the sidecar with no request in progress this long is closed.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Pooled connections to other proxies idle this long are closed (a DestinationRule's
    /// connectionPool.http.idleTimeout overrides it).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    upstream_idle_timeout: Duration,
    /// Istio's pathNormalization: NONE, BASE (RFC 3986, the default), MERGE_SLASHES or
    /// DECODE_AND_MERGE_SLASHES. Routes match, and the app receives, the normalized path.
    #[arg(long, default_value = "BASE")]
    path_normalization: isthmus_core::path::Normalization,
    /// Upgrade tokens carried through the mesh (repeat or comma-separate); `h2c` is always
    /// served as HTTP/1.1 with the upgrade dropped, any other token gets 403.
    #[arg(long, default_value = "websocket", value_delimiter = ',')]
    upgrade: Vec<String>,
}

impl LimitArgs {
    fn limits(self) -> isthmus_sidecar::ingress::Limits {
        isthmus_sidecar::ingress::Limits {
            max_header_bytes: self.max_request_header_bytes,
            max_headers: self.max_request_headers,
            request_headers_timeout: self.request_headers_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            idle_timeout: self.idle_timeout,
            upstream_idle_timeout: self.upstream_idle_timeout,
            path_normalization: self.path_normalization,
            upgrades: self.upgrade,
        }
    }
}

/// How long a stopping process lets open connections finish.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs a component until it fails (exit 1) or a signal asks it to stop: then it stops
/// accepting, drains open connections for up to [`DRAIN_DEADLINE`] and exits 0.
macro_rules! serve {
    ($bound:expr, $exit_with_stdin:expr) => {{
        let mut bound = $bound;
        tokio::select! {
            result = bound.wait_termination() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "stopped");
                }
                Ok(std::process::ExitCode::FAILURE)
            }
            signal = isthmus::process::shutdown_signal($exit_with_stdin) => {
                tracing::info!(signal, deadline_secs = DRAIN_DEADLINE.as_secs(), "draining");
                bound.shutdown(DRAIN_DEADLINE).await;
                Ok(std::process::ExitCode::SUCCESS)
            }
        }
    }};
}

/// A replica's name in its Lease when none is given: the host's name and the process id.
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// The documents of every path: files, folders and `-` (standard input).
fn read_sources(
    paths: &[PathBuf],
) -> anyhow::Result<Result<Vec<isthmus_core::config::SourceFile>, isthmus_core::config::ConfigErrors>>
{
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut contents = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut contents)
                .context("reading standard input")?;
            files.push(isthmus_core::config::SourceFile {
                name: "<stdin>".into(),
                contents,
            });
            continue;
        }
        match isthmus_core::config::read_path(path) {
            Ok(read) => files.extend(read),
            Err(errors) => return Ok(Err(errors)),
        }
    }
    Ok(Ok(files))
}

/// `isthmus analyze`: exit 79 (as istioctl) when a finding reaches `fail_at`.
fn analyze(
    paths: &[PathBuf],
    fail_at: isthmus_core::config::analyze::Severity,
    show_from: isthmus_core::config::analyze::Severity,
) -> anyhow::Result<std::process::ExitCode> {
    let files = match read_sources(paths)? {
        Ok(files) => files,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    let findings = isthmus_core::config::analyze::analyze(&files);
    for f in findings.iter().filter(|f| f.severity >= show_from) {
        println!("{f}");
    }
    if findings.is_empty() {
        println!("no findings");
    }
    if findings.iter().any(|f| f.severity >= fail_at) {
        return Ok(std::process::ExitCode::from(79));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `isthmus validate`: every document of every path, validated as one config.
fn validate(paths: &[PathBuf]) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let files = match read_sources(paths)? {
        Ok(files) => files,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    match isthmus_core::config::load_files(&files) {
        Ok(set) => {
            for note in &set.notes {
                println!("note: {note}");
            }
            for warning in &set.warnings {
                println!("warning: {warning}");
            }
            println!(
                "{}: valid ({} services, {} workload entries, {} exports)",
                shown.join(", "),
                set.services.len(),
                set.workloads.len(),
                set.exports.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Durations on the command line read as in Istio's config: `500ms`, `1.5s`, `10m`, `24h`.
/// Writes `text` to standard output; a reader that went away early (`| head`) is not an
/// error.
fn print_out(text: &str) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(std::process::ExitCode::SUCCESS),
    }
}

/// `host:port`, with a host name resolved now (a Kubernetes Service name keeps its address).
fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("`{s}` is not host:port or does not resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    isthmus_core::config::parse_duration_ms(s)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is not a duration like 500ms, 30s, 10m or 24h"))
}

fn parse_failover(s: &str) -> Result<(String, String), String> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not FROM=TO"))?;
    Ok((from.to_owned(), to.to_owned()))
}

fn read_pem(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Sets up logging from RUST_LOG; returns a handle that changes the filter at runtime.
fn init_logging() -> isthmus_core::admin::LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .init();
    Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| format!("invalid filter `{level}`: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())?;
        Ok(level.to_owned())
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.concurrency {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(main_async(cli));
    // Not waiting for blocking threads: with --exit-with-stdin one sits in a read of
    // standard input that cannot be cancelled, and would hold a drained process forever.
    runtime.shutdown_background();
    code
}

async fn main_async(cli: Cli) -> std::process::ExitCode {
    let log_control = match &cli.command {
        Command::Validate { .. }
        | Command::Analyze { .. }
        | Command::Status { .. }
        | Command::Token(_)
        | Command::Root(_)
        | Command::Explain { .. }
        | Command::Cluster(_)
        | Command::Install(_)
        | Command::Iptables(_)
        | Command::Demo(_)
        | Command::Bench(_) => None,
        _ => Some(init_logging()),
    };
    match run(cli.command, log_control, cli.exit_with_stdin).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = isthmus::process::bind_hint(&e) {
                eprintln!("hint: {hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    command: Command,
    log_control: Option<isthmus_core::admin::LogControl>,
    exit_with_stdin: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        Command::Validate { paths } => validate(&paths),
        Command::Status { controller_admin } => {
            print!("{}", isthmus::status::report(controller_admin).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze {
            paths,
            failure_threshold,
            output_threshold,
        } => analyze(&paths, failure_threshold, output_threshold),
        Command::Iptables(a) => capture(&a),
        Command::Install(InstallCommand::Crds) => {
            let crds: Vec<serde_json::Value> = isthmus_kubernetes::crds::all()
                .iter()
                .chain(std::iter::once(&isthmus_kubernetes::crds::service_import()))
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            print_out(&isthmus_kubernetes::install::to_yaml(&crds))
        }
        Command::Install(InstallCommand::Kubernetes(a)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let federation_root = match (&a.federation_root_cert, &a.federation_root_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                _ => None,
            };
            let options = isthmus_kubernetes::install::Options {
                cluster: a.cluster,
                namespace: a.namespace,
                image: a.image,
                trust_domain: a.trust_domain,
                federation: a.federation,
                trust_anchor_pem: read(&a.trust_anchor)?,
                join_token: a.join_token,
                controller_replicas: a.replicas,
                gateway_address: a.gateway_address,
                federation_root,
                federation_replicas: a.federation_replicas,
            };
            let objects = isthmus_kubernetes::install::manifests(&options);
            print_out(&isthmus_kubernetes::install::to_yaml(&objects))
        }
        Command::Root(RootCommand::Rotate {
            at,
            new_root_cert,
            new_root_key,
            pause,
            no_wait,
            timeout,
        }) => {
            use isthmus::operator::Ask;
            let ask = if pause {
                Ask::Pause
            } else {
                Ask::Start(new_root_cert.zip(new_root_key))
            };
            at.operator().rotate(ask, !no_wait, timeout).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(ClusterCommand::Remove { cluster, at, drain }) => {
            let removed = at.operator().remove_cluster(&cluster, drain).await?;
            println!(
                "cluster {cluster} removed: {} services withdrawn; its certificates are refused after {drain:?} (from Unix time {})",
                removed.withdrawn_services,
                removed.refused_from_unix
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            host,
            proxy_admin,
            path,
            method,
            headers,
            json,
        } => {
            let req = isthmus::explain::Request {
                host: &host,
                path: &path,
                method: &method,
                headers: &headers,
            };
            let answer = isthmus::explain::fetch(proxy_admin, &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", isthmus::explain::render(&answer));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Root(RootCommand::Status { at }) => {
            at.operator()
                .rotate(isthmus::operator::Ask::Status, false, Duration::ZERO)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Join {
            state_dir,
            cluster,
            ttl,
        }) => {
            println!(
                "{}",
                isthmus_federation::mint_join_token(&state_dir, &cluster, ttl)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Workload {
            state_dir,
            cluster,
            namespace,
            service_account,
            ttl,
        }) => {
            println!(
                "{}",
                isthmus_controller::mint_workload_token(
                    &state_dir,
                    &cluster,
                    &namespace,
                    &service_account,
                    ttl
                )?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Registry(options)) => {
            isthmus::bench::run(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Wasm(a)) => {
            let bytes = std::fs::read(&a.module)
                .with_context(|| format!("reading {}", a.module.display()))?;
            let m = tokio::task::spawn_blocking(move || {
                isthmus_sidecar::wasm::measure(
                    &bytes,
                    &a.plugin_name,
                    &a.plugin_config,
                    a.instances,
                    a.requests,
                )
            })
            .await?
            .map_err(|e| anyhow::anyhow!("the module cannot run as a plugin: {e}"))?;
            println!(
                "load {:.1} ms; {} KiB per instance ({} KiB of it linear memory); {:.1} µs per request",
                m.load_ms,
                m.bytes_per_instance / 1024,
                m.linear_memory_bytes / 1024,
                m.ns_per_request / 1e3
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(a) => {
            let passed = isthmus::demo::run(isthmus::demo::Options {
                keep_running: a.keep_running,
                dir: a.dir,
                phase_secs: a.phase_seconds,
                otlp: a.otlp.map(|e| (e, a.otlp_protocol.as_str().to_owned())),
            })
            .await?;
            println!("\ndemo {}", if passed { "passed" } else { "FAILED" });
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Echo {
            listen,
            cluster,
            workload,
            tcp,
        } => {
            let bound = isthmus::echo::build(isthmus::echo::Config {
                listen,
                cluster,
                workload,
                tcp_listen: tcp,
            })
            .await?;
            tracing::info!(addr = %bound.address, "echo app listening");
            serve!(bound, exit_with_stdin)
        }
        Command::Federation(a) => {
            let config = isthmus_federation::Config {
                trust_domain: a.trust_domain,
                state_dir: a.state_dir,
                grpc_addr: a.listen,
                admin_addr: a.admin,
                metrics_addr: a.metrics,
                root_cert: a.root_cert,
                root_key: a.root_key,
                failover: a.failover,
                cluster_ca_ttl: a.cluster_ca_ttl,
                controller_cert_ttl: a.controller_cert_ttl,
                forget_silent_after: a.forget_silent_after,
                replica: None,
            };
            tracing::info!(?config, "starting federation");
            if !a.kubernetes {
                serve!(isthmus_federation::build(config).await?, exit_with_stdin)
            } else {
                let client = isthmus_kubernetes::client(a.kubeconfig.as_deref()).await?;
                let lease = isthmus_kubernetes::lease::LeaseConfig::named(
                    isthmus::replicas::LEASE,
                    &a.namespace,
                    &a.replica.unwrap_or_else(replica_name),
                );
                let replicated = isthmus::replicas::Replicated::start(config, client, lease);
                let mut role = replicated.role();
                tokio::select! {
                    _ = async { while role.changed().await.is_ok() {} } => {
                        tracing::error!("the replica stopped");
                        Ok(std::process::ExitCode::FAILURE)
                    }
                    signal = isthmus::process::shutdown_signal(exit_with_stdin) => {
                        tracing::info!(signal, deadline_secs = DRAIN_DEADLINE.as_secs(), "draining");
                        replicated.shutdown(DRAIN_DEADLINE).await;
                        Ok(std::process::ExitCode::SUCCESS)
                    }
                }
            }
        }
        Command::Controller(a) => {
            let config = isthmus_controller::Config {
                cluster: a.cluster,
                trust_domain: a.trust_domain,
                source: match a.config_dir {
                    Some(dir) => isthmus_controller::ConfigSource::Files(dir),
                    None => isthmus_controller::ConfigSource::Kubernetes {
                        kubeconfig: a.kubeconfig,
                        webhook: (!a.no_webhook).then_some(a.webhook_listen),
                        proxy_image: a.proxy_image,
                        lease: isthmus_kubernetes::lease::LeaseConfig::new(
                            &a.lease_namespace,
                            &a.replica.unwrap_or_else(replica_name),
                        ),
                    },
                },
                state_dir: a.state_dir,
                grpc_addr: a.listen,
                admin_addr: a.admin,
                metrics_addr: a.metrics,
                federation_addrs: a.federation,
                federation_bundle_pem: read_pem(&a.federation_root)?,
                join_token: a.join_token,
                workload_cert_ttl: a.workload_cert_ttl,
                push_debounce: a.push_debounce,
                jwks_refresh: a.jwks_refresh,
                jwks_extra_roots_pem: a.jwks_extra_roots.as_ref().map(read_pem).transpose()?,
            };
            tracing::info!(cluster = %config.cluster, source = %config.source, "starting controller");
            serve!(isthmus_controller::build(config).await?, exit_with_stdin)
        }
        Command::Gateway(a) => {
            let token = a.proxy.token();
            let roots = a.proxy.roots()?;
            let config = isthmus_gateway::Config {
                cluster: a.proxy.cluster,
                trust_domain: a.proxy.trust_domain,
                controller_addr: a.proxy.controller,
                bootstrap: roots,
                token,
                tunnel_addr: a.tunnel,
                quic_addr: a.quic,
                advertise_tunnel: a.advertise_tunnel,
                advertise_quic: a.advertise_quic,
                admin_addr: a.admin,
                metrics_addr: a.metrics,
                otlp: a.otlp.config()?,
            };
            serve!(isthmus_gateway::build(config).await?, exit_with_stdin)
        }
        Command::Sidecar(a) => {
            let (ns, name) = a
                .workload
                .split_once('/')
                .context("--workload must be namespace/name")?;
            let locality = Locality::parse(&a.locality).with_context(|| {
                format!("--locality `{}` is not region/zone/subzone", a.locality)
            })?;
            let token = a.proxy.token();
            let roots = a.proxy.roots()?;
            let config = isthmus_sidecar::Config {
                cluster: a.proxy.cluster,
                trust_domain: a.proxy.trust_domain,
                workload: NamespacedName::new(ns, name),
                service_account: a.service_account,
                locality,
                controller_addr: a.proxy.controller,
                bootstrap: roots,
                token,
                outbound_addr: a.outbound,
                capture_inbound_addr: a.capture_inbound,
                dns_addr: a.dns,
                dns_upstream: match (a.dns, a.dns_upstream.is_empty()) {
                    (Some(_), true) => std::fs::read_to_string(RESOLV_CONF)
                        .map(|c| isthmus_sidecar::dns::nameservers(&c))
                        .unwrap_or_default(),
                    _ => a.dns_upstream,
                },
                inbound_addr: a.inbound,
                admin_addr: a.admin,
                metrics_addr: a.metrics,
                app_addr: a.app,
                log_control,
                limits: a.limits.limits(),
                telemetry: isthmus_core::otlp::TelemetryConfig {
                    otlp: a.otlp.config()?,
                    access_log: a.access_log,
                },
            };
            serve!(isthmus_sidecar::build(config).await?, exit_with_stdin)
        }
    }
}
