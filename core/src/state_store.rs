//! Where a replicated component keeps its state besides its own disk, so that another
//! replica can take over: a set of named files, saved as a whole with compare-and-swap.
//!
//! The federation runs as several replicas; the one that leads mirrors its state folder
//! into a store every replica reaches (a Kubernetes Secret), and a replica that takes over
//! restores the folder from it before it serves. A save succeeds only if nobody else saved
//! since this replica last loaded or saved, so a replica that lost the lead without
//! noticing cannot overwrite its successor's state.

use std::collections::BTreeMap;
use std::future::Future;

/// File name → contents.
pub type Files = BTreeMap<String, Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Someone else saved since this replica last loaded or saved: it no longer leads.
    #[error("another replica saved the state in {store} since this one last did")]
    Conflict { store: String },
    /// The store cannot hold this much.
    #[error("the state is {size} bytes; {store} holds at most {limit}")]
    TooLarge {
        size: usize,
        limit: usize,
        store: String,
    },
    /// The store could not be reached or refused; the next save may succeed.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

pub trait StateStore: Send + Sync + 'static {
    /// Where the state is kept, as logs and dumps name it.
    fn describe(&self) -> String;

    /// The files last saved, or `None` when nothing was ever saved. Later saves succeed
    /// only if the store still holds what this read.
    fn load(&self) -> impl Future<Output = anyhow::Result<Option<Files>>> + Send;

    /// Replaces the files, if the store still holds what this replica last loaded or saved.
    fn save(&self, files: &Files) -> impl Future<Output = Result<(), SaveError>> + Send;
}
