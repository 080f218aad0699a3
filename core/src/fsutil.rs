//! Small file helpers for state directories.

use std::io::Write;
use std::path::Path;

/// Writes a secret file readable only by its owner, atomically (write then rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    write_owner_only(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Writes `bytes` to `path`, readable only by its owner, and syncs it.
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates a secret file with `bytes` unless it exists, and returns what the file holds:
/// ours, or what another process (a CLI minting a token while the controller starts)
/// wrote first. The file appears whole or not at all: the bytes go to a file of this
/// caller's own, which is then linked into place, and a link never replaces a file.
pub fn create_private_once(path: &Path, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!(
        "tmp.{}.{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    write_owner_only(&tmp, bytes)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(bytes.to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(path),
        Err(e) => Err(e),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_writer_of_a_secret_wins_and_everyone_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token.key");
        let threads: Vec<_> = (0u8..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    create_private_once(&path, &[i; 32]).expect("created or read")
                })
            })
            .collect();
        let seen: Vec<Vec<u8>> = threads
            .into_iter()
            .map(|t| t.join().expect("joined"))
            .collect();
        let on_disk = std::fs::read(&path).expect("the file");
        assert!(
            seen.iter().all(|s| *s == on_disk),
            "every caller got the key on disk"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary file is left"
        );
    }
}
