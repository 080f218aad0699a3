//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection
//! does it, so that two controller replicas can run for availability.
//!
//! Every replica serves its proxies (config and certificates). Only the leader writes to
//! the API server: statuses, Events, and the webhook's CA bundle.
//!
//! Each replica tries every `retry` to take or renew the Lease. Every write is a
//! compare-and-swap on the Lease's `resourceVersion`, so two replicas never both believe
//! they won. A replica takes the Lease when it is free or when its holder has not renewed
//! it for `duration`. A leader that cannot renew within `renew_deadline` steps down by
//! itself, before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Where the Lease is and how it is held.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica, as `holderIdentity` names it.
    pub identity: String,
    /// How long a Lease holds without renewal (client-go's default: 15 s).
    pub duration: Duration,
    /// How long a leader keeps trying to renew before it steps down (10 s).
    pub renew_deadline: Duration,
    /// How often each replica tries (2 s).
    pub retry: Duration,
}

impl LeaseConfig {
    /// The controller's Lease in `namespace`, held by `identity` with client-go's timings.
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self::named("isthmus-controller", namespace, identity)
    }

    /// The Lease `name` in `namespace`, held by `identity` with client-go's timings.
    pub fn named(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What one attempt found.
enum Attempt {
    Leading,
    Following(String),
}

async fn attempt(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let now = Timestamp::now();
    let secs = i32::try_from(cfg.duration.as_secs())
        .unwrap_or(i32::MAX)
        .max(1);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        api.create(&PostParams::default(), &lease).await?;
        return Ok(Attempt::Leading);
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let held_for = Duration::from_secs(
        u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
    );
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        now.duration_since(t.0)
            .try_into()
            .is_ok_and(|age: Duration| age > held_for)
    });
    if holder != cfg.identity && !holder.is_empty() && !expired {
        return Ok(Attempt::Following(holder));
    }
    if holder != cfg.identity {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(secs);
    // A replace carries the resourceVersion read above: if another replica wrote the
    // Lease since, this fails with 409 and the other one wins.
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await?;
    Ok(Attempt::Leading)
}

/// Runs the election until the receiver is dropped; `leader` says whether this replica
/// leads.
pub async fn run(client: kube::Client, cfg: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    let mut following: Option<String> = None;
    loop {
        if leader.is_closed() {
            return;
        }
        match tokio::time::timeout(
            cfg.retry.max(Duration::from_millis(100)),
            attempt(&api, &cfg),
        )
        .await
        {
            Ok(Ok(Attempt::Leading)) => {
                last_renewed = Some(tokio::time::Instant::now());
                following = None;
                if !*leader.borrow() {
                    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
                    leader.send_replace(true);
                }
            }
            Ok(Ok(Attempt::Following(holder))) => {
                last_renewed = None;
                if *leader.borrow() {
                    leader.send_replace(false);
                }
                if following.as_ref() != Some(&holder) {
                    tracing::info!(lease = %cfg.name, %holder, "following");
                    following = Some(holder);
                }
            }
            Ok(Err(e)) => tracing::debug!(lease = %cfg.name, error = %e, "lease attempt failed"),
            Err(_) => tracing::debug!(lease = %cfg.name, "lease attempt timed out"),
        }
        if *leader.borrow() && last_renewed.is_none_or(|t| t.elapsed() > cfg.renew_deadline) {
            tracing::warn!(lease = %cfg.name, "could not renew the lease in time; stepping down");
            leader.send_replace(false);
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// Gives the Lease up if this replica holds it, as client-go's `ReleaseOnCancel` does, so
/// that another replica takes over at its next try instead of after `duration`.
pub async fn release(client: kube::Client, cfg: &LeaseConfig) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await?;
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "lease released");
    Ok(())
}

/// Keeps something in the API server matching `wanted` while this replica leads:
/// `reconcile` runs with the latest value when it changes, when this replica becomes the
/// leader, and every `resync` (for what someone else edited or deleted); a failure is
/// logged with `what` and retried after a second.
pub async fn reconcile_while_leading<T, F, Fut>(
    mut wanted: watch::Receiver<T>,
    mut leader: watch::Receiver<bool>,
    resync: Duration,
    what: &str,
    mut reconcile: F,
) where
    T: Clone,
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    loop {
        if *leader.borrow_and_update() {
            let current = wanted.borrow_and_update().clone();
            if let Err(e) = reconcile(current).await {
                tracing::warn!(error = %e, "cannot update {what}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(resync) => {}
        }
    }
}
