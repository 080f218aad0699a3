//! Admission results written back where Kubernetes users look: a status on each mesh
//! object and an Event for each rejection.
//!
//! Status follows the shape of Istio's `IstioStatus`, on the `status` subresource:
//! `observedGeneration`, an `Accepted` condition (`True`, or `False` with reason
//! `Rejected` and the faults as its message), and `validationMessages` carrying Istio's
//! analyzer codes (`IST0101`, `IST0106`, ...), each with the field and the message that
//! `isthmus validate` prints. A rejected object keeps its last admitted version serving;
//! the condition says so.
//!
//! Only the leader among controller replicas writes (see `lease`). Writes are made only
//! when the status would change, so a status write (itself a watch
//! event) settles after one round. They run on their own task: a slow API server delays
//! statuses, never config pushes. The Event (core/v1, type Warning, reason `Rejected`) is
//! created when an object becomes rejected, or is rejected with different faults, not on
//! every rebuild, and not again by a new leader.

use std::collections::HashMap;
use std::sync::Arc;

use isthmus_core::config::{Code, ConfigError};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::resources::{source_of, MeshKind};

/// Who writes statuses and Events, as `kubectl describe` shows it.
pub const COMPONENT: &str = "isthmus-controller";

/// The mesh objects of one admission and the faults it found (rejections and warnings).
#[derive(Default)]
pub struct Outcome {
    pub objects: Vec<(MeshKind, Arc<DynamicObject>)>,
    pub faults: Vec<ConfigError>,
}

/// Istio's analyzer message name for a code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Reference => "ReferencedResourceNotFound",
        Code::Schema | Code::InvalidValue | Code::Missing => "SchemaValidationError",
        Code::Deprecated => "Deprecated",
        Code::Syntax => "SyntaxError",
        Code::UnknownKind => "UnknownKind",
        Code::Duplicate => "Conflict",
        Code::Io => "Unreadable",
        Code::Ignored => "Ignored",
    }
}

/// What a fault says, without where it is (the object is where it is).
fn description(e: &ConfigError) -> String {
    if e.field.is_empty() {
        e.message.clone()
    } else {
        format!("{}: {}", e.field, e.message)
    }
}

/// The status an object should carry, without times (compared to decide on a write).
fn desired(obj: &DynamicObject, faults: &[&ConfigError]) -> Value {
    let errors: Vec<&&ConfigError> = faults.iter().filter(|e| !e.code.is_warning()).collect();
    let messages: Vec<Value> = faults
        .iter()
        .map(|e| {
            json!({
                "level": if e.code.is_warning() { "WARNING" } else { "ERROR" },
                "type": {"code": e.code.as_str(), "name": code_name(e.code)},
                "description": description(e),
            })
        })
        .collect();
    let condition = if errors.is_empty() {
        json!({"type": "Accepted", "status": "True", "reason": "Accepted",
               "message": "admitted and serving"})
    } else {
        let faults: Vec<String> = errors.iter().map(|e| description(e)).collect();
        json!({"type": "Accepted", "status": "False", "reason": "Rejected",
               "message": format!("rejected; the last admitted version, if any, keeps serving: {}", faults.join("; "))})
    };
    json!({
        "observedGeneration": obj.metadata.generation.unwrap_or_default(),
        "conditions": [condition],
        "validationMessages": messages,
    })
}

/// `status` with the condition's transition time taken out, for comparison.
fn without_times(status: &Value) -> Value {
    let mut s = status.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    s
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Writes statuses and Events for every outcome it is sent, latest first, while `leader`
/// says this replica leads, until the sender is gone.
pub async fn run(
    client: kube::Client,
    mut outcomes: watch::Receiver<Arc<Outcome>>,
    mut leader: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = outcomes.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
        if !*leader.borrow_and_update() {
            continue;
        }
        let outcome = outcomes.borrow_and_update().clone();
        write_all(&client, &outcome).await;
    }
}

/// Writes each status that differs from the stored one. An Event goes with a write that
/// rejects the object anew, or for other reasons than before; the stored status is the
/// memory, so a new leader does not report again what its predecessor reported.
async fn write_all(client: &kube::Client, outcome: &Outcome) {
    let mut by_source: HashMap<&str, Vec<&ConfigError>> = HashMap::new();
    for e in &outcome.faults {
        by_source.entry(e.file.as_str()).or_default().push(e);
    }
    for (kind, obj) in &outcome.objects {
        let source = source_of(kind, obj);
        let faults = by_source.get(source.as_str()).cloned().unwrap_or_default();
        let want = desired(obj, &faults);
        let have = obj.data.get("status").cloned().unwrap_or(Value::Null);
        if without_times(&have) == want {
            continue;
        }
        write_status(client, kind, obj, want.clone(), &have).await;
        let (now, before) = (&want["conditions"][0], &have["conditions"][0]);
        if now["status"] == "False"
            && (before["status"] != "False" || before["message"] != now["message"])
        {
            event(
                client,
                kind,
                obj,
                now["message"].as_str().unwrap_or_default(),
            )
            .await;
        }
    }
}

async fn write_status(
    client: &kube::Client,
    kind: &MeshKind,
    obj: &DynamicObject,
    mut want: Value,
    have: &Value,
) {
    let (Some(name), Some(ns)) = (&obj.metadata.name, &obj.metadata.namespace) else {
        return;
    };
    // The transition time moves only when the condition's status does.
    let before = &have["conditions"][0];
    let time = if before["status"] == want["conditions"][0]["status"] {
        before["lastTransitionTime"].as_str().map(str::to_owned)
    } else {
        None
    };
    want["conditions"][0]["lastTransitionTime"] = json!(time.unwrap_or_else(now));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &kind.api_resource());
    let patch = json!({"status": want});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(object = %source_of(kind, obj), error = %e, "cannot write status");
    }
}

async fn event(client: &kube::Client, kind: &MeshKind, obj: &DynamicObject, message: &str) {
    let (Some(name), Some(ns)) = (&obj.metadata.name, &obj.metadata.namespace) else {
        return;
    };
    let time = now();
    let event = json!({
        "metadata": {"name": format!("{name}.{:x}", rand_suffix()), "namespace": ns},
        "involvedObject": {
            "apiVersion": format!("{}/{}", kind.group, kind.version), "kind": kind.kind,
            "name": name, "namespace": ns, "uid": obj.metadata.uid,
            "resourceVersion": obj.metadata.resource_version,
        },
        "reason": "Rejected",
        "message": message,
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": COMPONENT,
        "firstTimestamp": time, "lastTimestamp": time, "count": 1,
    });
    let event: Event = match serde_json::from_value(event) {
        Ok(e) => e,
        Err(e) => return tracing::warn!(error = %e, "cannot build an Event"),
    };
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(object = %source_of(kind, obj), error = %e, "cannot record an Event");
    }
}

/// A suffix that makes Event names unique, as `generateName` would.
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(code: Code, field: &str, message: &str) -> ConfigError {
        ConfigError {
            file: "virtualservices.networking.istio.io/shop/reviews".into(),
            document: 1,
            object: Some("VirtualService shop/reviews".into()),
            field: field.into(),
            code,
            message: message.into(),
        }
    }

    fn object() -> DynamicObject {
        serde_json::from_value(
            json!({"metadata": {"name": "reviews", "namespace": "shop", "generation": 3}}),
        )
        .expect("object")
    }

    #[test]
    fn a_rejected_object_says_why_with_istio_codes() {
        let bad = fault(
            Code::Schema,
            "spec.http[0].retries.attempts",
            "invalid type",
        );
        let missing = fault(
            Code::Reference,
            "spec.http[0].route[0].destination.subset",
            "no subset v9",
        );
        let s = desired(&object(), &[&bad, &missing]);
        assert_eq!(s["observedGeneration"], 3);
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(s["conditions"][0]["reason"], "Rejected");
        let message = s["conditions"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("spec.http[0].retries.attempts: invalid type"),
            "{message}"
        );
        assert!(
            !message.contains("subset"),
            "warnings do not reject: {message}"
        );
        assert_eq!(s["validationMessages"][0]["type"]["code"], "IST0106");
        assert_eq!(s["validationMessages"][1]["level"], "WARNING");
        assert_eq!(
            s["validationMessages"][1]["type"]["name"],
            "ReferencedResourceNotFound"
        );
    }

    #[test]
    fn an_admitted_object_is_accepted_and_times_do_not_count_as_changes() {
        let s = desired(&object(), &[]);
        assert_eq!(s["conditions"][0]["status"], "True");
        let mut written = s.clone();
        written["conditions"][0]["lastTransitionTime"] = json!("2026-11-26T00:00:00Z");
        assert_eq!(without_times(&written), s);
    }
}
