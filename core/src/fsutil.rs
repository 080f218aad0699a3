//! Small file helpers for state directories.

use std::io::Write;
use std::path::Path;

/// Writes a secret file readable only by its owner, atomically (write then rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Keeps a state file current without writing on every change: after a `dirty`
/// notification it writes what `encode` returns at that moment, then waits `interval`
/// before the next write, so a quiet change is on disk at once and a burst of changes costs
/// one write per `interval`. Runs until the task is dropped; a crash loses at most the
/// changes of the last `interval`, which the peers that made them send again.
pub async fn write_behind(
    path: std::path::PathBuf,
    interval: std::time::Duration,
    dirty: std::sync::Arc<tokio::sync::Notify>,
    encode: impl Fn() -> Vec<u8>,
) {
    loop {
        dirty.notified().await;
        let bytes = encode();
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || write_private(&target, &bytes)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep state on disk; a restart would start from an older copy");
        }
        tokio::time::sleep(interval).await;
    }
}
