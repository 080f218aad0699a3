//! Unmodified apps in pods join the mesh by transparent capture and the sidecar's DNS: the
//! real binary, in network namespaces this test creates (needs root, `ip`, `nft`,
//! `setpriv`, curl, python3, tcpdump and dnsmasq, as CI installs them).
//!
//! The topology, as a node with two pods would have it:
//! - a "node" namespace: the federation, two clusters' controllers and east-west gateways
//!   (`c1` and `c2`), the one workload of `c2` (`hello`, served nowhere else), and
//!   dnsmasq standing in for the cluster DNS on 10.96.0.10 (it answers `outside.example`,
//!   and `NXDOMAIN` for other names under `example` and `cluster.local`);
//! - pod A (10.244.1.2), the client: its sidecar and curl/python as root, with no proxy
//!   settings, and a `resolv.conf` naming 10.96.0.10 with Kubernetes' search list;
//! - pod B (10.244.2.2), the server: the sample app (HTTP 8080, TCP 7000) and its sidecar.
//!
//! Each pod is joined to the node by a veth pair, and its capture is set up by
//! `isthmus iptables --redirect-dns`, as the injected init step does. Sidecars and the
//! control plane run as UID 1337. A packet capture on pod A's link shows what leaves it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const UID: &str = "1337";
const KUBE_DNS: &str = "10.96.0.10";
const ECHO_IP: &str = "10.96.0.20";

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A network namespace of this test, removed (with its links and resolv.conf) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Self {
        let name = format!("isthmus-{role}-{}", std::process::id());
        ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        ok(Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args));
    }

    /// `ip netns exec` bind-mounts this over the namespace's /etc/resolv.conf.
    fn resolv_conf(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name).join("resolv.conf")
    }

    /// A command in the namespace, as `uid` when given.
    fn command(&self, uid: Option<&str>, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        if let Some(uid) = uid {
            cmd.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        cmd.arg(program);
        cmd
    }

    fn isthmus(&self, uid: Option<&str>) -> Command {
        self.command(uid, env!("CARGO_BIN_EXE_isthmus"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The processes of the test, killed on drop (before the namespaces go).
#[derive(Default)]
struct Processes(Vec<Child>);

impl Processes {
    /// An isthmus process, logging to `log`; it exits when the test does.
    fn isthmus(&mut self, mut cmd: Command, log: &Path) {
        let file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .arg("--exit-with-stdin")
            .spawn()
            .expect("spawns");
        self.0.push(child);
    }

    fn plain(&mut self, mut cmd: Command, log: &Path) {
        let file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawns");
        self.0.push(child);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Joins `pod` to `node`: the pod has `10.244.<subnet>.2`, the node `.1`, which is the
/// pod's default route (cluster IPs, the other pod and the node all lie beyond it).
fn link(node: &Netns, pod: &Netns, subnet: u8, node_side: &str) {
    ok(Command::new("ip").args([
        "link", "add", node_side, "netns", &node.name, "type", "veth", "peer", "name", "eth0",
        "netns", &pod.name,
    ]));
    node.ip(&[
        "addr",
        "add",
        &format!("10.244.{subnet}.1/24"),
        "dev",
        node_side,
    ]);
    node.ip(&["link", "set", node_side, "up"]);
    pod.ip(&[
        "addr",
        "add",
        &format!("10.244.{subnet}.2/24"),
        "dev",
        "eth0",
    ]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.244.{subnet}.1"),
    ]);
    std::fs::create_dir_all(pod.resolv_conf().parent().expect("dir")).expect("netns dir");
    std::fs::write(
        pod.resolv_conf(),
        format!("search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver {KUBE_DNS}\noptions ndots:5\n"),
    )
    .expect("resolv.conf");
}

fn logs_text(logs: &Path) -> String {
    std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            format!(
                "== {}\n{}",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn unmodified_apps_reach_services_by_name_through_capture_and_the_sidecar_dns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for sub in ["fed", "c1", "c2", "cfg1", "cfg2", "logs"] {
        std::fs::create_dir_all(d.join(sub)).expect("dir");
    }
    ok(Command::new("chmod").args(["755"]).arg(d));
    ok(Command::new("chown")
        .args(["-R", &format!("{UID}:{UID}")])
        .arg(d));
    let logs = d.join("logs");
    std::fs::write(
        d.join("cfg1/echo.yaml"),
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  clusterIP: {ECHO_IP}\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: tcp-echo, port: 7000, targetPort: 7000}}, {{name: web, port: 8000, targetPort: 8080}}, {{name: raw, port: 7100, targetPort: 7000}}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: echo-0, namespace: demo}}\nspec: {{address: 10.244.2.2, labels: {{app: echo}}, serviceAccount: echo}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: client, namespace: demo}}\nspec: {{address: 10.244.1.2, labels: {{app: client}}, serviceAccount: client}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo-pods, namespace: demo}}\nspec:\n  clusterIP: None\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 8080}}]\n"),
    )
    .expect("config");
    // `hello` runs only in c2, which exports it; it has no cluster IP anywhere.
    std::fs::write(
        d.join("cfg2/hello.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: hello, namespace: demo}\nspec:\n  selector: {app: hello}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: hello-pods, namespace: demo}\nspec:\n  clusterIP: None\n  selector: {app: hello}\n  ports: [{name: http, port: 8080}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: hello-0, namespace: demo}\nspec: {address: 10.244.0.13, labels: {app: hello}, serviceAccount: hello}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: hello-1, namespace: demo}\nspec: {address: 10.244.0.14, labels: {app: hello}, serviceAccount: hello}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: hello, namespace: demo}\n---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: hello-pods, namespace: demo}\n",
    )
    .expect("config");

    let node = Netns::new("node");
    let (pod_a, pod_b) = (Netns::new("pod-a"), Netns::new("pod-b"));
    let mut procs = Processes::default();
    // The node's own addresses: control plane, gateways, c2's workload, the cluster DNS.
    for ip in [
        "10.244.0.1",
        "10.244.0.2",
        "10.244.0.11",
        "10.244.0.12",
        "10.244.0.13",
        "10.244.0.14",
        KUBE_DNS,
    ] {
        node.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    ok(node
        .command(None, "sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"]));
    link(&node, &pod_a, 1, "va");
    link(&node, &pod_b, 2, "vb");

    let mut dns = node.command(None, "dnsmasq");
    dns.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file",
        "--bind-interfaces",
        &format!("--listen-address={KUBE_DNS}"),
        "--address=/outside.example/192.0.2.80",
        "--local=/example/",
        "--local=/cluster.local/",
        "--log-queries",
        "--log-facility=-",
    ]);
    procs.plain(dns, &logs.join("dnsmasq.log"));

    // Control plane and c2, in the node.
    let mut fed = node.isthmus(Some(UID));
    fed.args([
        "federation",
        "--listen",
        "10.244.0.1:15200",
        "--admin",
        "10.244.0.1:15300",
        "--state-dir",
    ])
    .arg(d.join("fed"));
    procs.isthmus(fed, &logs.join("federation.log"));
    let root = d.join("fed/root-cert.pem");
    wait_for("the federation's root", Duration::from_secs(10), || {
        root.exists()
    });
    for (cluster, ip) in [("c1", "10.244.0.1"), ("c2", "10.244.0.11")] {
        let join = ok(node
            .isthmus(Some(UID))
            .args(["token", "join", "--cluster", cluster, "--state-dir"])
            .arg(d.join("fed")));
        let mut ctl = node.isthmus(Some(UID));
        ctl.args(["controller", "--cluster", cluster])
            .args(["--listen", &format!("{ip}:15012")])
            .args(["--admin", &format!("{ip}:15014")])
            .args(["--federation", "10.244.0.1:15200", "--join-token", &join])
            .arg("--config-dir")
            .arg(d.join(format!("cfg{}", &cluster[1..])))
            .arg("--state-dir")
            .arg(d.join(cluster))
            .arg("--federation-root")
            .arg(&root);
        procs.isthmus(ctl, &logs.join(format!("{cluster}-controller.log")));
    }
    let token_for = |cluster: &str, ns: &str, sa: &str| -> String {
        let mut out = String::new();
        wait_for("the controller's CA", Duration::from_secs(20), || {
            let o = node
                .isthmus(Some(UID))
                .args(["token", "workload", "--cluster", cluster])
                .args(["--namespace", ns, "--service-account", sa, "--state-dir"])
                .arg(d.join(cluster))
                .output()
                .expect("runs");
            out = text(&o);
            o.status.success()
        });
        out
    };
    let proxy = |ns: &Netns, role: &str, cluster: &str, controller: &str, token: &str| {
        let mut cmd = ns.isthmus(Some(UID));
        cmd.args([role, "--cluster", cluster, "--controller", controller])
            .args(["--token", token])
            .arg("--root")
            .arg(&root);
        cmd.env("RUST_LOG", "info,isthmus_sidecar=debug");
        cmd
    };
    for (cluster, controller, gw) in [
        ("c1", "10.244.0.1:15012", "10.244.0.2"),
        ("c2", "10.244.0.11:15012", "10.244.0.12"),
    ] {
        let token = token_for(cluster, "isthmus-system", "isthmus-eastwestgateway");
        let mut g = proxy(&node, "gateway", cluster, controller, &token);
        g.args(["--tunnel", &format!("{gw}:15008")])
            .args(["--quic", &format!("{gw}:15443")])
            .args(["--admin", &format!("{gw}:15000")]);
        procs.isthmus(g, &logs.join(format!("{cluster}-gateway.log")));
    }
    // c2's two workloads, hello-0 and hello-1: the app and its sidecar each.
    let token = token_for("c2", "demo", "hello");
    for (name, ip) in [("hello-0", "10.244.0.13"), ("hello-1", "10.244.0.14")] {
        let mut app = node.isthmus(Some(UID));
        app.args(["echo", "--listen", &format!("{ip}:8080"), "--cluster", "c2"]);
        app.args(["--workload", name]);
        procs.isthmus(app, &logs.join(format!("{name}-app.log")));
        let mut sidecar = proxy(&node, "sidecar", "c2", "10.244.0.11:15012", &token);
        sidecar
            .args([
                "--workload",
                &format!("demo/{name}"),
                "--service-account",
                "hello",
            ])
            .args(["--outbound", &format!("{ip}:15001")])
            .args(["--inbound", &format!("{ip}:15008")])
            .args(["--admin", &format!("{ip}:15000")])
            .args(["--app", &format!("{ip}:8080")]);
        procs.isthmus(sidecar, &logs.join(format!("{name}-sidecar.log")));
    }

    // The pods: the sample app in B, a sidecar in each, capture set up as the init step does.
    let mut echo_app = pod_b.command(None, env!("CARGO_BIN_EXE_isthmus"));
    echo_app.args(["echo", "--listen", "10.244.2.2:8080", "--cluster", "c1"]);
    echo_app.args(["--workload", "echo-0", "--tcp", "10.244.2.2:7000"]);
    procs.isthmus(echo_app, &logs.join("echo-app.log"));
    for (pod, name, ip, app) in [
        (&pod_a, "client", "10.244.1.2", None),
        (&pod_b, "echo", "10.244.2.2", Some("10.244.2.2:8080")),
    ] {
        let token = token_for("c1", "demo", name);
        let workload = if app.is_some() {
            "demo/echo-0"
        } else {
            "demo/client"
        };
        let mut s = proxy(pod, "sidecar", "c1", "10.244.0.1:15012", &token);
        s.args(["--workload", workload, "--service-account", name])
            .args(["--outbound", "0.0.0.0:15001"])
            .args(["--capture-inbound", "0.0.0.0:15006"])
            .args(["--inbound", &format!("{ip}:15008")])
            .args(["--admin", "127.0.0.1:15000"])
            .args(["--dns", "127.0.0.1:15053"]);
        if let Some(app) = app {
            s.args(["--app", app]);
        }
        procs.isthmus(s, &logs.join(format!("{name}-sidecar.log")));
        ok(pod.isthmus(None).args([
            "iptables",
            "--redirect-dns",
            "--exclude-outbound-ports",
            "9998",
        ]));
    }

    // Plain servers in the node: one on an excluded port, one that only passthrough reaches.
    for port in ["9998", "9999"] {
        let mut plain = node.command(None, "python3");
        plain.args(["-m", "http.server", port, "--bind", "10.244.0.1"]);
        procs.plain(plain, &logs.join(format!("http-{port}.log")));
    }

    // A packet capture on pod A's link, from before the first request.
    let pcap = d.join("pod-a.pcap");
    let mut dump = node.command(None, "tcpdump");
    dump.args([
        "-i",
        "va",
        "--immediate-mode",
        "-U",
        "-n",
        "-s",
        "0",
        "-Z",
        "root",
        "-w",
    ])
    .arg(&pcap);
    procs.plain(dump, &logs.join("tcpdump.log"));
    wait_for("tcpdump", Duration::from_secs(10), || {
        std::fs::read_to_string(logs.join("tcpdump.log")).is_ok_and(|l| l.contains("listening on"))
    });

    let curl = |url: &str| -> Output {
        pod_a
            .command(None, "curl")
            .args(["-s", "--max-time", "5", url])
            .output()
            .expect("curl runs")
    };
    let code = |ns: &Netns, url: &str| -> String {
        let out = ns
            .command(None, "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                url,
            ])
            .output()
            .expect("curl runs");
        text(&out)
    };
    let json_of = |out: &Output| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();

    // The app knows nothing of the mesh: it calls the service by its DNS name.
    let marker = "plaintext-marker-5f1d";
    let url = format!("http://echo.demo.svc.cluster.local/{marker}");
    let mut answer = None;
    let started = Instant::now();
    while answer.is_none() && started.elapsed() < Duration::from_secs(40) {
        answer = json_of(&curl(&url)).filter(|j| j["workload"] == "echo-0");
        std::thread::sleep(Duration::from_millis(250));
    }
    let answer = answer.unwrap_or_else(|| {
        panic!(
            "no answer by name through capture: {:?}\n{}",
            curl(&url),
            logs_text(&logs)
        )
    });
    assert_eq!(
        answer["caller"], "spiffe://cluster.local/ns/demo/sa/client",
        "the app sees the client's identity, proved over mTLS between the sidecars"
    );
    // The short name, through the pod's search list; and the name resolves to the
    // Service's cluster IP.
    assert_eq!(
        json_of(&curl("http://echo/")).expect("json")["workload"],
        "echo-0"
    );
    let resolve = |name: &str| -> Output {
        pod_a
            .command(None, "python3")
            .args([
                "-c",
                "import socket, sys\ntry:\n    print(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)}))\nexcept socket.gaierror as e:\n    print('error', e.args[0])",
                name,
            ])
            .output()
            .expect("python runs")
    };
    assert_eq!(
        text(&resolve("echo.demo.svc.cluster.local")),
        format!("['{ECHO_IP}']")
    );

    // A headless Service resolves to its endpoints, each with a name of its own; a call to
    // one goes to that endpoint, still through both sidecars.
    assert_eq!(
        text(&resolve("echo-pods.demo.svc.cluster.local")),
        "['10.244.2.2']"
    );
    let pod = json_of(&curl(
        "http://10-244-2-2.echo-pods.demo.svc.cluster.local:8080/",
    ))
    .unwrap_or_else(|| panic!("the pod's own name\n{}", logs_text(&logs)));
    assert_eq!(pod["workload"], "echo-0");
    assert_eq!(pod["caller"], "spiffe://cluster.local/ns/demo/sa/client");

    // A TCP port of the service, by name: the bytes go through both sidecars and back.
    // (The receiving sidecar accepts a tunnel only to a port its pushed services declare
    // for it, so the first attempts may be refused until that push has landed.)
    let tcp_marker = "tcp-marker-9c2e";
    let tcp_echo = || {
        pod_a.command(None, "python3").args([
            "-c",
            &format!("import socket; s = socket.create_connection(('echo.demo.svc.cluster.local', 7000), 5); s.sendall(b'{tcp_marker}'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())"),
        ]).output().expect("python runs")
    };
    wait_for(
        "the TCP port through both sidecars",
        Duration::from_secs(10),
        || text(&tcp_echo()) == tcp_marker,
    );
    let tcp = tcp_echo();
    assert_eq!(
        text(&tcp),
        tcp_marker,
        "{}\n{}",
        String::from_utf8_lossy(&tcp.stderr),
        logs_text(&logs)
    );

    // Ports that declare no protocol (`web`, `raw`: no prefix, no appProtocol) are sniffed:
    // HTTP is served as HTTP, anything else goes through as opaque TCP.
    let web = json_of(&curl("http://echo.demo.svc.cluster.local:8000/"))
        .expect("HTTP on an undeclared port");
    assert_eq!(web["caller"], "spiffe://cluster.local/ns/demo/sa/client");
    let raw = pod_a.command(None, "python3").args([
        "-c",
        "import socket; s = socket.create_connection(('echo.demo.svc.cluster.local', 7100), 5); s.sendall(b'\\x00\\x01 not http'); s.shutdown(socket.SHUT_WR); print(s.recv(100))",
    ]).output().expect("python runs");
    assert_eq!(
        text(&raw),
        "b'\\x00\\x01 not http'",
        "{}\n{}",
        String::from_utf8_lossy(&raw.stderr),
        logs_text(&logs)
    );

    // A service only c2 runs: its name resolves, in pod A's sidecar, to the virtual IP the
    // controller gave it, and a connection to that address goes through both gateways.
    let mut hello = None;
    let started = Instant::now();
    while hello.is_none() && started.elapsed() < Duration::from_secs(30) {
        hello = json_of(&curl("http://hello.demo.svc.cluster.local/")).filter(|j| {
            j["workload"]
                .as_str()
                .is_some_and(|w| w.starts_with("hello-"))
        });
        std::thread::sleep(Duration::from_millis(250));
    }
    let hello =
        hello.unwrap_or_else(|| panic!("c2's service not reached by name\n{}", logs_text(&logs)));
    assert_eq!(hello["cluster"], "c2");
    assert_eq!(hello["caller"], "spiffe://cluster.local/ns/demo/sa/client");
    let vip = text(&resolve("hello.demo.svc.clusterset.local"));
    assert!(vip.starts_with("['240.240."), "a virtual IP: {vip}");

    // A headless Service of c2: in the clusterset domain each of its endpoints has a name
    // (`<endpoint>.<cluster>.<service>`), at a virtual IP of its own, and a call to it
    // reaches that endpoint and no other, through both gateways.
    let everywhere = text(&resolve("hello-pods.demo.svc.clusterset.local"));
    assert_eq!(
        everywhere.matches("'240.240.").count(),
        2,
        "one per endpoint: {everywhere}"
    );
    for (label, workload) in [("10-244-0-13", "hello-0"), ("10-244-0-14", "hello-1")] {
        let url = format!("http://{label}.c2.hello-pods.demo.svc.clusterset.local:8080/");
        for _ in 0..3 {
            let reply = json_of(&curl(&url))
                .unwrap_or_else(|| panic!("{url} not reached\n{}", logs_text(&logs)));
            assert_eq!(reply["workload"], workload, "{url}");
            assert_eq!(reply["caller"], "spiffe://cluster.local/ns/demo/sa/client");
        }
    }

    // Names outside the mesh go to the pod's resolver, from the sidecar (not captured
    // again, or it would loop back to itself): an answer, and NXDOMAIN as the resolver
    // says it.
    assert_eq!(text(&resolve("outside.example")), "['192.0.2.80']");
    assert_eq!(
        text(&resolve("nosuch.example")),
        "error -2",
        "EAI_NONAME: the resolver's NXDOMAIN"
    );
    let dnsmasq = || std::fs::read_to_string(logs.join("dnsmasq.log")).unwrap_or_default();
    assert!(
        dnsmasq().contains("query[A] outside.example from 10.244.1.2"),
        "dnsmasq answered the sidecar's forwarded query:\n{}",
        dnsmasq()
    );
    // A mesh name the sidecar knows never reaches the cluster DNS (before c2's export
    // arrived it did, and was NXDOMAIN there, as for any unknown name).
    let before = dnsmasq().len();
    assert!(text(&resolve("hello.demo.svc.cluster.local")).starts_with("['240.240."));
    let since = dnsmasq()[before..].to_owned();
    assert!(
        !since.contains("] hello.demo.svc.cluster.local from"),
        "mesh names are answered by the sidecar:\n{since}"
    );

    // An excluded port bypasses the sidecar: reached even under REGISTRY_ONLY, which
    // refuses the same server on a captured port.
    assert_eq!(code(&pod_a, "http://10.244.0.1:9998/"), "200");
    assert_eq!(
        code(&pod_a, "http://10.244.0.1:9999/"),
        "000",
        "REGISTRY_ONLY"
    );
    std::fs::write(
        d.join("cfg1/sidecar.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\nspec:\n  egress: [{hosts: ['./*', '*/*']}]\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n",
    )
    .expect("sidecar config");
    let passthrough_marker = "passthrough-marker-77aa";
    wait_for("the passthrough", Duration::from_secs(10), || {
        code(
            &pod_a,
            &format!("http://10.244.0.1:9999/{passthrough_marker}"),
        ) == "404"
    });

    // Inbound from outside the pod (the node, as a kubelet probe comes) is captured to
    // 15006 and handed on to the port it was going to.
    assert_eq!(code(&node, "http://10.244.2.2:8080/"), "200");
    // With an AuthorizationPolicy on paths, the plaintext caller's HTTP is judged request
    // by request, as Istio judges it: /private is denied, the rest of the app is not.
    let deny_private = d.join("cfg1/deny-private.yaml");
    std::fs::write(
        &deny_private,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-private, namespace: demo}\nspec:\n  action: DENY\n  rules: [{to: [{operation: {paths: [/private]}}]}]\n",
    )
    .expect("policy");
    wait_for("plaintext /private denied", Duration::from_secs(10), || {
        code(&node, "http://10.244.2.2:8080/private") == "403"
    });
    assert_eq!(code(&node, "http://10.244.2.2:8080/"), "200");
    assert_eq!(code(&node, "http://10.244.2.2:8080/x/../private"), "403");
    std::fs::remove_file(&deny_private).expect("policy removed");
    wait_for(
        "plaintext /private allowed again",
        Duration::from_secs(10),
        || code(&node, "http://10.244.2.2:8080/private") == "200",
    );

    // Istio's mutual TLS migration, last step (deploy/examples/security/mtls-strict.yaml):
    // with the namespace STRICT, the plaintext caller is refused, while the mesh callers
    // (mTLS between the sidecars) go on.
    let strict = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/security/mtls-strict.yaml"
    ))
    .expect("example");
    std::fs::write(d.join("cfg1/mtls-strict.yaml"), strict).expect("policy");
    wait_for("plaintext refused", Duration::from_secs(10), || {
        code(&node, "http://10.244.2.2:8080/") == "000"
    });
    let by_name = json_of(&curl("http://echo.demo.svc.cluster.local/")).expect("mTLS still works");
    assert_eq!(
        by_name["caller"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );

    // What crossed pod A's link: the mesh traffic was encrypted, while the passthrough
    // request (plaintext by nature) shows the capture would have seen plaintext.
    std::thread::sleep(Duration::from_millis(500));
    let captured = std::fs::read(&pcap).expect("pcap");
    let seen = |m: &str| captured.windows(m.len()).any(|w| w == m.as_bytes());
    assert!(
        seen(passthrough_marker),
        "the capture sees plaintext traffic ({} bytes captured)\n{}",
        captured.len(),
        logs_text(&logs)
    );
    assert!(
        !seen(marker),
        "the HTTP request crossed the link in plaintext"
    );
    assert!(
        !seen(tcp_marker),
        "the TCP bytes crossed the link in plaintext"
    );
    assert!(
        !seen("spiffe://cluster.local/ns/demo/sa/client"),
        "the caller's identity header crossed the link in plaintext"
    );
}
