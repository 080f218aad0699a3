//! Smoke tests of the real binary: help, `validate` exit codes and messages, and the
//! whole demo (federation + three clusters as child processes, failover with no failed
//! request).

use std::process::Command;

fn isthmus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_isthmus"))
}

#[test]
fn help_explains_every_role() {
    let out = isthmus().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "demo",
        "validate",
        "federation",
        "controller",
        "gateway",
        "sidecar",
        "echo",
        "token",
    ] {
        assert!(text.contains(cmd), "--help lists {cmd}:\n{text}");
    }
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
    assert!(err.contains("a.yaml: document 2 (WorkloadEntry demo/echo-east): spec.address: `127.0.1.300` is not an IP address [IST0004]"), "{err}");
    assert!(err.contains("b.yaml: document 1: kind: Gateway (networking.istio.io/v1) is not a kind Isthmus reads"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
/// The demo is also the hung-peer test on real processes: phase 2 freezes the east
/// workload with SIGSTOP, phase 3 kills west's gateway; each verdict includes leaving the
/// peer within one second, under steady traffic, with no failed request.
fn demo_fails_over_from_hung_and_dead_peers_within_a_second_and_exits_zero() {
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
        "3 west gateway down",
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
    let dir = tempfile::tempdir().expect("tempdir");
    let child = isthmus()
        .args([
            "federation",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let root = dir.path().join("root-cert.pem");
    let started = std::time::Instant::now();
    while !root.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "federation did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let out = child.wait_with_output().expect("exits");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{log}", out.status.code());
    assert!(log.contains("draining") && log.contains("SIGTERM"), "{log}");
}
