//! Smoke tests of the real binary: help, `validate` exit codes and messages, and the
//! whole demo (federation + three clusters as child processes, failover with no failed
//! request).

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The demo binds the topology's fixed addresses: one demo at a time in this binary.
static DEMO: Mutex<()> = Mutex::new(());

/// Sends SIGTERM, as a process manager stops a process.
fn sigterm(child: &std::process::Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
}

fn one_demo_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    DEMO.lock().unwrap_or_else(|p| p.into_inner())
}

fn isthmus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
}

/// A federation on ephemeral loopback ports, its state in `dir`.
fn federation(dir: &std::path::Path) -> Command {
    let mut cmd = isthmus();
    cmd.args([
        "federation",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
    ])
    .arg(dir);
    cmd
}

/// Waits until a federation started with [`federation`] has written its root CA.
fn wait_for_root(dir: &std::path::Path) {
    let started = Instant::now();
    while !dir.join("root-cert.pem").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "federation did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_explains_every_role() {
    let out = isthmus().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "demo",
        "validate",
        "analyze",
        "federation",
        "controller",
        "gateway",
        "sidecar",
        "echo",
        "token",
        "bench",
        "status",
        "--concurrency",
    ] {
        assert!(text.contains(cmd), "--help lists {cmd}:\n{text}");
    }
}

#[test]
fn status_names_the_controller_it_cannot_reach() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let out = isthmus()
        .args(["status", "--controller-admin", &format!("127.0.0.1:{port}")])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the controller's admin listener at 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

#[test]
fn concurrency_sets_the_worker_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = federation(dir.path())
        .args(["--concurrency", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starts");
    wait_for_root(dir.path());
    let workers = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .expect("tasks")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(workers, 1, "one worker thread");
}

#[test]
fn validate_accepts_the_demo_config() {
    for cluster in ["east", "west", "eu"] {
        let out = isthmus()
            .args([
                "validate",
                "-f",
                &format!("{}/deploy/demo/{cluster}", env!("CARGO_MANIFEST_DIR")),
            ])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout)
            .contains("valid (1 services, 1 workload entries, 1 exports)"));
    }
}

#[test]
fn validate_names_file_document_and_field_of_every_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string(format!(
        "{}/deploy/demo/east/echo.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("demo config");
    std::fs::write(
        dir.path().join("a.yaml"),
        good.replace("address: 127.0.1.10", "address: 127.0.1.300"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\n",
    )
    .expect("write");
    let out = isthmus()
        .args(["validate", "-f"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.yaml: document 2 (WorkloadEntry demo/echo-east): spec.address: `127.0.1.300` is not an IP address [IST0106]"), "{err}");
    assert!(err.contains("b.yaml: document 1: kind: Gateway (networking.istio.io/v1) is not a kind Isthmus reads"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

/// The demo is also the hung-peer test on real processes: phase 2 freezes the east
/// workload with SIGSTOP, phase 3 west's gateway; each verdict includes leaving the hung
/// peer within one second, under steady traffic, with no failed request.
#[test]
fn demo_fails_over_from_hung_and_dead_peers_within_a_second_and_exits_zero() {
    let _one = one_demo_at_a_time();
    let out = isthmus()
        .args(["demo", "--phase-seconds", "2"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in [
        "1 baseline",
        "2 east backend hung",
        "3 west gateway hung",
        "4 restored",
    ] {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with(phase))
            .unwrap_or_default();
        assert!(line.ends_with("ok"), "phase {phase}: {line}\n{stdout}");
    }
    assert!(stdout.contains("demo passed"));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    // With --exit-with-stdin too, while standard input stays open: the reader blocked on
    // it must not hold the drained process.
    for exit_with_stdin in [false, true] {
        use std::io::Read;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = federation(dir.path());
        if exit_with_stdin {
            cmd.arg("--exit-with-stdin");
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starts");
        let _held_open = child.stdin.take();
        wait_for_root(dir.path());
        std::thread::sleep(Duration::from_millis(200));
        sigterm(&child);
        let stopped = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if stopped.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!("still running 15 s after SIGTERM (--exit-with-stdin: {exit_with_stdin})");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut log = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut log)
            .expect("log");
        assert!(status.success(), "exit {:?}\n{log}", status.code());
        assert!(log.contains("draining") && log.contains("SIGTERM"), "{log}");
    }
}

/// Processes whose command line mentions `needle` (the demo passes its folder to every
/// child), read from /proc.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a demo in `dir` and waits until it has started at least `n` children.
fn demo_with_children(dir: &std::path::Path, n: usize) -> std::process::Child {
    let child = isthmus()
        .args(["demo", "--keep-running", "--dir"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let mut child = child;
    let needle = dir.display().to_string();
    wait_for("the demo's children", Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the demo exited early ({status}): {err}");
        }
        processes_mentioning(&needle).len() > n
    });
    child
}

#[test]
fn a_demo_killed_with_sigkill_takes_its_children_with_it() {
    let _one = one_demo_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut demo = demo_with_children(dir.path(), 4);
    demo.kill().expect("SIGKILL");
    let _ = demo.wait();
    let needle = dir.path().display().to_string();
    wait_for("every child to exit", Duration::from_secs(10), || {
        processes_mentioning(&needle).is_empty()
    });
}

#[test]
fn a_demo_stopped_with_sigterm_stops_its_children_and_a_second_demo_names_the_busy_address() {
    let _one = one_demo_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = demo_with_children(dir.path(), 4);
    // While it runs, a second demo refuses to start and says why.
    let second = isthmus().args(["demo"]).output().expect("runs");
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("is not free") && err.contains("earlier `isthmus demo` still running"),
        "{err}"
    );
    sigterm(&demo);
    let out = demo.wait_with_output().expect("exits");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SIGTERM: stopping every process"),
        "{stdout}"
    );
    let needle = dir.path().display().to_string();
    wait_for("every child to exit", Duration::from_secs(10), || {
        processes_mentioning(&needle).is_empty()
    });
}

#[test]
fn a_role_that_cannot_bind_names_the_address_and_the_likely_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = isthmus()
        .args([
            "federation",
            "--listen",
            &addr,
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "names the address: {err}");
    assert!(
        err.contains("hint: another process holds that address"),
        "says why: {err}"
    );
}

#[test]
fn validate_takes_files_folders_and_stdin_and_passes_over_non_mesh_kinds() {
    let demo = |cluster: &str| format!("{}/deploy/demo/{cluster}", env!("CARGO_MANIFEST_DIR"));
    // A file, and several -f validated together.
    let out = isthmus()
        .args(["validate", "-f", &format!("{}/echo.yaml", demo("east"))])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path().join("app.yaml");
    std::fs::write(
        &app,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\nspec: {replicas: 2}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: demo}\n---\n\
         apiVersion: networking.istio.io/v1alpha3\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: demo}\nspec: {address: 10.0.0.9, labels: {app: web}}\n",
    )
    .expect("write");
    let out = isthmus()
        .args(["validate", "-f", &demo("east"), "-f"])
        .arg(&app)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "document 1 (Deployment web): Deployment (apps/v1) is not mesh config; skipped"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("ServiceAccount (v1) is not mesh config"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 workload entries"),
        "the v1alpha3 WorkloadEntry counts: {stdout}"
    );
    // Standard input.
    let mut child = isthmus()
        .args(["validate", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        b"apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: x}\n",
    )
    .expect("write");
    let out = child.wait_with_output().expect("exits");
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unknown Istio kind is still an error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<stdin>: document 1: kind: Gateway"), "{err}");
}

#[test]
fn analyze_reports_findings_by_severity_and_fails_at_the_threshold() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("vs.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n",
    )
    .expect("write");
    let run = |threshold: &str| {
        isthmus()
            .args(["analyze", "--failure-threshold", threshold, "-f"])
            .arg(dir.path())
            .output()
            .expect("runs")
    };
    // Only warnings: fine at the default threshold (Error), a failure at Warning.
    let out = run("Error");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("Warning")
            && stdout.contains("no Service named `reviews`")
            && stdout.contains("[IST0101]"),
        "{stdout}"
    );
    assert_eq!(run("Warning").status.code(), Some(79));
}

#[test]
fn the_registry_benchmark_runs_end_to_end_and_prints_its_figures() {
    let out = isthmus()
        .args([
            "bench",
            "registry",
            "--clusters",
            "3",
            "--services",
            "2",
            "--endpoints",
            "12,60",
            "--changes",
            "4",
            "--rate",
            "5",
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for figure in [
        "memory with no config",
        "       12 |",
        "       60 |",
        "to every client that sees it: p50",
        "bytes per change",
        "changes at 5/s",
        "every client current in",
    ] {
        assert!(stdout.contains(figure), "no `{figure}` in:\n{stdout}");
    }
}

/// The sidecar-pair benchmark runner (`bench/run.sh`) starts every setup (across clusters
/// too), drives them, injects loss with nft (CI runs as root) and prints its tables; short
/// runs of the debug binary, no figure is judged.
#[test]
fn the_pair_benchmark_runs_every_setup_and_prints_its_tables() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("bench/run.sh"))
        .env("ISTHMUS_BIN", env!("CARGO_BIN_EXE_isthmus"))
        .env("SETUPS", "direct haproxy isthmus isthmus-xc")
        .env("DURATION", "1")
        .env("RATE", "100")
        .output()
        .expect("bench/run.sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |prefix: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row `{prefix}` in:\n{stdout}\n{stderr}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let number = |cells: &[String], i: usize, what: &str| -> f64 {
        cells[i]
            .parse()
            .unwrap_or_else(|_| panic!("{what} is `{}` in {cells:?}", cells[i]))
    };
    for setup in ["direct", "haproxy", "isthmus", "isthmus-xc"] {
        // | setup | run | h1 | /direct | h2 | /direct | p50 | p99 | added | cpu1 | cpu2 | rss | errors |
        let cells = row(&format!("| {setup} | 1 |"));
        for (i, what) in [(3, "HTTP/1.1 req/s"), (5, "HTTP/2 req/s"), (8, "p99")] {
            assert!(
                number(&cells, i, what) > 0.0,
                "{setup}: {what} in {cells:?}"
            );
        }
        assert_eq!(cells[13], "0/0", "{setup} had errors: {cells:?}");
        if setup != "direct" {
            number(&cells, 10, "CPU per request");
            let proxies = if setup == "isthmus-xc" { 4 } else { 2 };
            assert_eq!(
                cells[12].split('/').count(),
                proxies,
                "RSS per proxy: {cells:?}"
            );
        }
    }
    assert!(stdout.contains("Isthmus pair / haproxy pair"), "{stdout}");
    // The gateway pair's share of the cross-cluster path: the first row under its header.
    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.contains("gateway pair CPU"))
        .unwrap_or_else(|| panic!("no cross-cluster table in:\n{stdout}"));
    let xc: Vec<String> = lines[header + 2]
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect();
    number(&xc, 2, "gateway pair CPU per request");
    for setup in ["haproxy", "isthmus-xc"] {
        for loss in ["0%", "1%"] {
            // | setup | between the proxies | loss | p50 | p99 | p99.9 | failed |
            let cells = lines
                .iter()
                .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
                .find(|c| c.len() == 9 && c[1] == setup && c[3] == loss)
                .unwrap_or_else(|| panic!("no {loss} loss row for {setup} in:\n{stdout}"));
            assert!(
                cells[5].parse::<f64>().is_ok(),
                "{setup} at {loss}: {cells:?}"
            );
        }
    }
}
