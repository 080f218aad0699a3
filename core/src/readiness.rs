//! Readiness as RAII blockers: the process is ready once every registered blocker has been
//! dropped ("workload certificate", "first config", ...).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// Holds readiness back until dropped.
#[derive(Debug)]
pub struct BlockReady {
    readiness: Readiness,
    id: u64,
}

impl Readiness {
    pub fn register(&self, name: &str) -> BlockReady {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id, name.to_owned());
        BlockReady {
            readiness: self.clone(),
            id,
        }
    }

    /// Names of what the process still waits for; empty when ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock().values().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.readiness.lock().remove(&self.id);
    }
}
