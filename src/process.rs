//! How an `isthmus` process ends: on SIGTERM or SIGINT (as a process manager or `kill`
//! stops it), or, with `--exit-with-stdin`, when its standard input closes, which is how
//! `isthmus demo` takes its children with it even when the demo itself is killed (the
//! kernel closes the pipe it held). And what a bind failure most likely means.

/// Resolves when the process is asked to stop, naming why.
pub async fn shutdown_signal(exit_with_stdin: bool) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    let stdin = async {
        if exit_with_stdin {
            stdin_closed().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = stdin => "standard input closed",
    }
}

/// Resolves once standard input reaches end-of-file (or fails).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// A hint for an error that comes from an address already in use.
pub fn bind_hint(e: &anyhow::Error) -> Option<&'static str> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::AddrInUse)
        .then_some(
            "another process holds that address: is an earlier isthmus (an `isthmus demo` \
             left running?) still up? `ss -ltnup` shows who listens where",
        )
}
