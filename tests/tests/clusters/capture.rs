//! Transparent capture in a real network namespace (needs root, `ip` and `nft`, as CI
//! has): the rules `isthmus iptables` applies send an unmodified client's connections to
//! the capture port with their original destination intact, and leave the proxy's own
//! connections and excluded ports alone.

use std::process::{Command, Stdio};
use std::time::Duration;

use isthmus_sidecar::capture::{Cidr, Rules, Scope};

/// A network namespace of this test, and the host end of its veth; both deleted when
/// dropped.
struct Netns(String, String);

impl Netns {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!("isthmus-{tag}-{}", std::process::id());
        let host_end = format!("v{tag}{}", std::process::id());
        let ns = Self(name.clone(), host_end.clone());
        run("ip", &["netns", "add", &name], None)?;
        // A veth whose host end has no address: a default route through it goes nowhere,
        // so connections that are not captured fail.
        run(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
            None,
        )?;
        run("ip", &["link", "set", &host_end, "up"], None)?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", "10.200.0.1/24", "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["route", "add", "default", "dev", "eth0"],
        ] {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend(args);
            run("ip", &full, None)?;
        }
        Ok(ns)
    }

    fn exec(&self, program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", &self.0, program];
        full.extend(args);
        run("ip", &full, input)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.1]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdin"))?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A listener on the capture port that answers each connection with the destination
/// the client asked for, read with `SO_ORIGINAL_DST` (as the sidecar reads it).
const REPORTER: &str = r#"
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 15001)); s.listen(16); print("ready", flush=True)
while True:
    c, _ = s.accept()
    raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, ip = struct.unpack("!2xH4s8x", raw)
    c.recv(4096)
    body = "%s:%d" % (socket.inet_ntoa(ip), port)
    c.sendall(("HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)).encode())
    c.close()
"#;

#[test]
fn captured_connections_keep_their_destination_and_the_proxy_is_never_captured(
) -> anyhow::Result<()> {
    let ns = Netns::new("cap")?;
    let rules = Rules {
        exclude_outbound_ports: vec![3306],
        exclude_outbound_cidrs: vec!["10.201.0.0/16"
            .parse::<Cidr>()
            .map_err(anyhow::Error::msg)?],
        include_outbound_cidrs: Scope::All,
        ..Rules::default()
    };
    ns.exec("nft", &["-f", "-"], Some(&rules.nft()))?;
    let mut reporter = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-u", "-c", REPORTER])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(
            reporter
                .stdout
                .take()
                .ok_or_else(|| anyhow::anyhow!("stdout"))?,
        ),
        &mut ready,
    )?;
    assert_eq!(ready.trim(), "ready");
    let curl = |uid: Option<&str>, url: &str| -> Option<String> {
        let mut args: Vec<&str> = Vec::new();
        if let Some(uid) = uid {
            args.extend(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        args.extend([
            "curl",
            "-s",
            "--connect-timeout",
            "1",
            "--max-time",
            "3",
            url,
        ]);
        ns.exec(args[0], &args[1..], None).ok()
    };

    // An app's connection, to a Service address and port, lands on the capture port with
    // where it was going.
    assert_eq!(
        curl(None, "http://10.96.0.20/").as_deref(),
        Some("10.96.0.20:80")
    );
    assert_eq!(
        curl(None, "http://10.96.0.21:9090/").as_deref(),
        Some("10.96.0.21:9090")
    );
    // The proxy's own connections (UID 1337) are not captured: they would loop.
    assert_eq!(curl(Some("1337"), "http://10.96.0.20/"), None);
    // Excluded ports and ranges are left alone.
    assert_eq!(curl(None, "http://10.96.0.20:3306/"), None);
    assert_eq!(curl(None, "http://10.201.3.4/"), None);

    // Cleanup removes the capture.
    ns.exec(
        "nft",
        &["-f", "-"],
        Some(&isthmus_sidecar::capture::nft_cleanup()),
    )?;
    assert_eq!(curl(None, "http://10.96.0.20/"), None);
    let _ = reporter.kill();
    let _ = reporter.wait();
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
