//! A replicated component's state kept in one Secret of the API server (see
//! [`isthmus_core::state_store`]): each file is a key of the Secret's `data`.
//!
//! Every save is a compare-and-swap on the Secret's `resourceVersion`: a create when the
//! Secret did not exist when last read (409 if someone created it meanwhile), else a
//! replace carrying the `resourceVersion` last read or written (409 if someone wrote it
//! meanwhile). Either 409 is a [`SaveError::Conflict`]: another replica leads.
//!
//! The API server refuses a Secret whose data exceeds 1 MiB; a larger state is refused
//! here by name before it is sent.

use std::sync::Mutex;

use isthmus_core::state_store::{Files, SaveError, StateStore};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

/// The API server's limit on a Secret's data (`MaxSecretSize`).
pub const MAX_BYTES: usize = 1024 * 1024;

pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
    /// The `resourceVersion` last read or written; `None` when the Secret did not exist.
    seen: Mutex<Option<String>>,
}

impl SecretStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            seen: Mutex::new(None),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conflict(&self) -> SaveError {
        SaveError::Conflict {
            store: self.describe(),
        }
    }
}

impl StateStore for SecretStore {
    fn describe(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    async fn load(&self) -> anyhow::Result<Option<Files>> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.describe()))?;
        *self.seen() = secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    async fn save(&self, files: &Files) -> Result<(), SaveError> {
        let size: usize = files.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_BYTES {
            return Err(SaveError::TooLarge {
                size,
                limit: MAX_BYTES,
                store: self.describe(),
            });
        }
        let mut secret = Secret {
            type_: Some("Opaque".into()),
            data: Some(
                files
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            ..Default::default()
        };
        secret.metadata.name = Some(self.name.clone());
        secret.metadata.namespace = Some(self.namespace.clone());
        secret.metadata.labels = Some(
            [(
                crate::imports::MANAGED_BY.0.to_owned(),
                crate::imports::MANAGED_BY.1.to_owned(),
            )]
            .into(),
        );
        let seen = self.seen().clone();
        let written = match seen {
            None => self.api.create(&PostParams::default(), &secret).await,
            Some(rv) => {
                secret.metadata.resource_version = Some(rv);
                self.api
                    .replace(&self.name, &PostParams::default(), &secret)
                    .await
            }
        };
        match written {
            Ok(s) => {
                *self.seen() = s.metadata.resource_version;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(self.conflict()),
            Err(e) => Err(SaveError::Failed(anyhow::anyhow!(
                "writing {}: {e}",
                self.describe()
            ))),
        }
    }
}
