//! Child processes of this binary, for `isthmus demo` and `isthmus bench`: each logs to its
//! own file, dies with its parent (see [`Proc`]), and can be signalled, checked and killed
//! by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

/// One child process, restartable with the same arguments. The parent holds the write end
/// of its standard input: the child runs with `--exit-with-stdin`, so when the parent ends,
/// however it ends (SIGKILL included), the kernel closes the pipe and the child drains and
/// exits.
struct Proc {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    stdin: Option<tokio::process::ChildStdin>,
}

pub struct Procs {
    pub exe: PathBuf,
    procs: BTreeMap<String, Proc>,
}

impl Procs {
    /// Children of this very binary.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            procs: BTreeMap::new(),
        })
    }

    /// The process ID of a running child.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name)?.child.as_ref()?.id()
    }

    /// Kills a child (SIGKILL: no drain, as if its machine died) and waits for it.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self
            .procs
            .get_mut(name)
            .with_context(|| format!("no child {name}"))?;
        if let Some(mut c) = p.child.take() {
            c.kill().await?;
        }
        p.stdin = None;
        Ok(())
    }

    /// Starts a killed child again with the arguments it first had.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let mut p = self
            .procs
            .remove(name)
            .with_context(|| format!("no child {name}"))?;
        let started = self.start(&mut p);
        self.procs.insert(name.to_owned(), p);
        started.with_context(|| format!("restarting {name}"))
    }

    pub fn spawn(&mut self, name: &str, args: Vec<String>, logs: &Path) -> anyhow::Result<()> {
        let mut p = Proc {
            args,
            log: logs.join(format!("{name}.log")),
            child: None,
            stdin: None,
        };
        self.start(&mut p)
            .with_context(|| format!("starting {name}"))?;
        self.procs.insert(name.to_owned(), p);
        Ok(())
    }

    fn start(&self, p: &mut Proc) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)?;
        let mut child = Command::new(&self.exe)
            .args(&p.args)
            .arg("--exit-with-stdin")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        p.stdin = child.stdin.take();
        p.child = Some(child);
        Ok(())
    }

    /// Fails with the end of a child's log if it has exited.
    pub fn check_alive(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(p) = self.procs.get_mut(name) else {
            return Ok(());
        };
        let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) else {
            return Ok(());
        };
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::bail!(
            "{name} exited ({status}); the end of {}:\n{}",
            p.log.display(),
            tail.join("\n")
        )
    }

    /// Sends `signal` (`STOP`, `CONT`) to a child, as `kill -STOP` does.
    pub async fn signal(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .procs
            .get(name)
            .and_then(|p| p.child.as_ref())
            .and_then(Child::id)
            .with_context(|| format!("{name} is not running"))?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {name} failed");
        Ok(())
    }

    pub async fn kill_all(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(c) = p.child.as_mut() {
                let _ = c.kill().await;
            }
        }
    }
}
