//! The federation run as several replicas on Kubernetes (`isthmus federation
//! --kubernetes`): the replicas elect a leader with the Lease [`LEASE`], and the leader
//! keeps its state in the Secret [`STATE_SECRET`], both in the federation's namespace.
//! See [`isthmus_federation::Replica`] for what leading and taking over mean.

use std::time::Duration;

use isthmus_federation::{Replica, Role};
use isthmus_kubernetes::lease::{self, LeaseConfig};
use tokio::sync::watch;

/// The Lease the federation's replicas elect their leader with, and the Secret the leader
/// keeps the state in (named as the install manifests grant them).
pub use isthmus_kubernetes::install::{
    FEDERATION_LEASE as LEASE, FEDERATION_STATE_SECRET as STATE_SECRET,
};

/// A federation replica and its part in the election.
pub struct Replicated {
    replica: Replica,
    election: tokio::task::JoinHandle<()>,
    client: isthmus_kubernetes::Client,
    lease: LeaseConfig,
}

impl Replicated {
    /// Starts a replica of `config` that takes part in the election `lease` (its identity
    /// names the replica) through `client`.
    pub fn start(
        config: isthmus_federation::Config,
        client: isthmus_kubernetes::Client,
        lease: LeaseConfig,
    ) -> Self {
        let (leader, leading) = watch::channel(false);
        let election = tokio::spawn(lease::run(client.clone(), lease.clone(), leader));
        let store = isthmus_kubernetes::state_secret::SecretStore::new(
            client.clone(),
            &lease.namespace,
            STATE_SECRET,
        );
        let replica = Replica::start(config, &lease.identity, store, leading);
        Self {
            replica,
            election,
            client,
            lease,
        }
    }

    /// What the replica does, as it changes; closed if it stopped.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.replica.role()
    }

    /// Stops at once, as if the process died: the Lease is left to expire.
    pub fn abort(self) {
        self.election.abort();
        self.replica.abort();
    }

    /// Stops: a leader drains, saves its state a last time and gives the Lease up, so that
    /// another replica takes over at its next try.
    pub async fn shutdown(self, deadline: Duration) {
        self.replica.shutdown(deadline).await;
        self.election.abort();
        if let Err(e) = lease::release(self.client, &self.lease).await {
            tracing::warn!(error = %e, "cannot release the lease; another replica takes over when it expires");
        }
    }
}
