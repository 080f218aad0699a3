//! An unmodified app in a pod joins the mesh by transparent capture: the real binary, in a
//! network namespace of this test (needs root, `ip`, `nft`, `setpriv` and curl, as CI has).
//!
//! In the namespace: a federation, a cluster controller (file adapter), the sample app
//! with its sidecar, and a client pod's sidecar. Every proxy and control-plane process
//! runs as UID 1337, as the injected sidecar does. `isthmus iptables` sets up capture.
//! Then curl, run as root with no proxy settings, calls the Service's cluster IP. It gets
//! the app's answer through both sidecars, and the app sees the client's SPIFFE ID.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UID: &str = "1337";

struct Pod {
    ns: String,
    veth: String,
    children: Vec<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Pod {
    fn new() -> Self {
        let ns = format!("isthmus-pod-{}", std::process::id());
        let veth = format!("vpod{}", std::process::id());
        ok(Command::new("ip").args(["netns", "add", &ns]));
        let pod = Self {
            ns,
            veth,
            children: Vec::new(),
        };
        // Cluster IPs route out of the pod (to nowhere unless captured), as in a cluster.
        ok(Command::new("ip").args([
            "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.ns,
        ]));
        ok(Command::new("ip").args(["link", "set", &pod.veth, "up"]));
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.244.0.5/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["route", "add", "default", "dev", "eth0"],
        ] {
            ok(Command::new("ip")
                .args(["netns", "exec", &pod.ns, "ip"])
                .args(args));
        }
        pod
    }

    /// A command in the pod, as `uid` when given.
    fn command(&self, uid: Option<&str>, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        if let Some(uid) = uid {
            cmd.args(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        cmd.arg(program);
        cmd
    }

    fn isthmus(&self, uid: Option<&str>) -> Command {
        self.command(uid, env!("CARGO_BIN_EXE_isthmus"))
    }

    fn spawn(&mut self, mut cmd: Command, log: &Path) {
        let file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .arg("--exit-with-stdin")
            .spawn()
            .expect("spawns");
        self.children.push(child);
    }
}

impl Pod {
    /// A helper process of the test (not an isthmus one), killed with the pod.
    fn spawn_plain(&mut self, mut cmd: Command) {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawns");
        self.children.push(child);
    }
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_unmodified_app_reaches_a_service_by_its_cluster_ip_through_capture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for sub in ["fed", "ctl", "cfg", "logs"] {
        std::fs::create_dir_all(d.join(sub)).expect("dir");
    }
    ok(Command::new("chmod").args(["755"]).arg(d));
    ok(Command::new("chown")
        .args(["-R", &format!("{UID}:{UID}")])
        .arg(d));
    std::fs::write(
        d.join("cfg/echo.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: demo}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: echo}\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-echo, port: 7000, targetPort: 7000}]\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: echo-0, namespace: demo}\nspec: {address: 127.0.0.11, labels: {app: echo}, serviceAccount: echo}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: client, namespace: demo}\nspec: {address: 127.0.0.12, labels: {app: client}, serviceAccount: client}\n",
    )
    .expect("config");
    let mut pod = Pod::new();
    let logs = d.join("logs");
    let mut fed = pod.isthmus(Some(UID));
    fed.args([
        "federation",
        "--listen",
        "127.0.0.1:15200",
        "--admin",
        "127.0.0.1:15300",
        "--state-dir",
    ])
    .arg(d.join("fed"));
    pod.spawn(fed, &logs.join("federation.log"));
    let root = d.join("fed/root-cert.pem");
    wait_for("the federation's root", Duration::from_secs(10), || {
        root.exists()
    });
    let join = ok(pod
        .isthmus(Some(UID))
        .args(["token", "join", "--cluster", "c1", "--state-dir"])
        .arg(d.join("fed")));
    let mut ctl = pod.isthmus(Some(UID));
    ctl.args([
        "controller",
        "--cluster",
        "c1",
        "--listen",
        "127.0.0.1:15012",
        "--admin",
        "127.0.0.1:15014",
    ])
    .args(["--federation", "127.0.0.1:15200", "--join-token", &join])
    .arg("--config-dir")
    .arg(d.join("cfg"))
    .arg("--state-dir")
    .arg(d.join("ctl"))
    .arg("--federation-root")
    .arg(&root);
    pod.spawn(ctl, &logs.join("controller.log"));
    let token_for = |pod: &Pod, sa: &str| -> String {
        let mut out = String::new();
        wait_for("the controller's CA", Duration::from_secs(20), || {
            let o = pod
                .isthmus(Some(UID))
                .args([
                    "token",
                    "workload",
                    "--cluster",
                    "c1",
                    "--namespace",
                    "demo",
                    "--service-account",
                    sa,
                    "--state-dir",
                ])
                .arg(d.join("ctl"))
                .output()
                .expect("runs");
            out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            o.status.success()
        });
        out
    };
    let (echo_token, client_token) = (token_for(&pod, "echo"), token_for(&pod, "client"));
    let mut app = pod.isthmus(Some(UID));
    app.args([
        "echo",
        "--listen",
        "127.0.0.11:8080",
        "--cluster",
        "c1",
        "--workload",
        "echo-0",
        "--tcp",
        "127.0.0.11:7000",
    ]);
    pod.spawn(app, &logs.join("echo.log"));
    for (name, sa, ip, token, outbound, app) in [
        (
            "echo-0",
            "echo",
            "127.0.0.11",
            &echo_token,
            "127.0.0.11:15101",
            Some("127.0.0.11:8080"),
        ),
        // The client pod's sidecar takes what capture redirects to 15001.
        (
            "client",
            "client",
            "127.0.0.12",
            &client_token,
            "0.0.0.0:15001",
            None,
        ),
    ] {
        let mut sidecar = pod.isthmus(Some(UID));
        sidecar
            .args([
                "sidecar",
                "--cluster",
                "c1",
                "--controller",
                "127.0.0.1:15012",
            ])
            .args([
                "--workload",
                &format!("demo/{name}"),
                "--service-account",
                sa,
                "--token",
                token,
            ])
            .args([
                "--outbound",
                outbound,
                "--inbound",
                &format!("{ip}:15008"),
                "--admin",
                &format!("{ip}:15000"),
            ])
            .arg("--root")
            .arg(&root);
        if let Some(app) = app {
            sidecar.args(["--app", app]);
        }
        if name == "client" {
            sidecar.args(["--capture-inbound", "0.0.0.0:15006"]);
        }
        sidecar.env("RUST_LOG", "info,isthmus_sidecar=debug");
        pod.spawn(sidecar, &logs.join(format!("{name}.log")));
    }
    ok(pod.isthmus(None).arg("iptables"));

    // The app knows nothing of the mesh: it calls the cluster IP.
    let mut answer = String::new();
    let curl = |pod: &Pod| {
        pod.command(None, "curl")
            .args(["-s", "--max-time", "3", "http://10.96.0.20/"])
            .output()
            .expect("curl runs")
    };
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let out = curl(&pod);
        answer = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && answer.contains("echo-0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs_text = || {
        std::fs::read_dir(&logs)
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
    };
    let json: serde_json::Value = serde_json::from_str(&answer)
        .unwrap_or_else(|_| panic!("no answer through capture: {answer:?}\n{}", logs_text()));
    assert_eq!(json["workload"], "echo-0");
    assert_eq!(
        json["caller"], "spiffe://cluster.local/ns/demo/sa/client",
        "the app sees the client's identity, proved over mTLS between the sidecars"
    );

    // A TCP port of the service: the bytes go through both sidecars and come back.
    let tcp = pod.command(None, "python3").args([
        "-c",
        "import socket; s = socket.create_connection(('10.96.0.20', 7000), 3); s.sendall(b'ping over tcp'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())",
    ]).output().expect("python runs");
    assert_eq!(
        String::from_utf8_lossy(&tcp.stdout).trim(),
        "ping over tcp",
        "{}\n{}",
        String::from_utf8_lossy(&tcp.stderr),
        logs_text()
    );

    // A destination outside the registry: refused by default (REGISTRY_ONLY, as
    // Isthmus defaults), passed through once a Sidecar says ALLOW_ANY. The destination is
    // a plain server on the pod's own address, reached through the sidecar.
    let mut plain = pod.command(None, "python3");
    plain.args(["-m", "http.server", "9999", "--bind", "10.244.0.5"]);
    pod.spawn_plain(plain);
    let code = |cmd: &mut Command| {
        let out = cmd
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "http://10.244.0.5:9999/",
            ])
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        code(&mut pod.command(None, "curl")),
        "000",
        "REGISTRY_ONLY refuses it"
    );
    std::fs::write(
        d.join("cfg/sidecar.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: demo}\nspec:\n  egress: [{hosts: ['./*']}]\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n",
    )
    .expect("sidecar config");
    wait_for("the passthrough", Duration::from_secs(10), || {
        code(&mut pod.command(None, "curl")) == "200"
    });

    // Inbound from outside the pod (the host, as a kubelet probe comes) is captured to
    // 15006 and handed on to the port it was going to.
    ok(Command::new("ip").args(["addr", "add", "10.244.0.1/24", "dev", &pod.veth]));
    wait_for("inbound through capture", Duration::from_secs(10), || {
        code(&mut Command::new("curl")) == "200"
    });
}
