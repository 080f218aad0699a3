//! The proxy-wasm plugins the tests run in sidecars (`tests/plugins/assembly/*.ts`, written
//! with the AssemblyScript proxy-wasm SDK), built once per test process by
//! `tests/plugins/build.sh` (node and npm; `.ci/run` makes sure they are there).

use std::path::PathBuf;
use std::sync::Mutex;

/// The built module of plugin `name` (`add_header`, `require_header`, `count`, `trap`),
/// building them all first if needed.
pub fn module(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !*built {
        let out = std::process::Command::new(dir.join("build.sh"))
            .output()
            .map_err(|e| {
                anyhow::anyhow!("running tests/plugins/build.sh (needs node and npm): {e}")
            })?;
        anyhow::ensure!(
            out.status.success(),
            "tests/plugins/build.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        *built = true;
    }
    let path = dir.join("build").join(format!("{name}.wasm"));
    anyhow::ensure!(path.exists(), "no plugin {name} in tests/plugins/assembly");
    Ok(path)
}
