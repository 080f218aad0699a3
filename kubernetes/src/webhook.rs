//! The validating admission webhook: `kubectl apply` of a mesh object that the controller
//! would reject fails at once, with the faults `isthmus validate` prints.
//!
//! The API server POSTs an `AdmissionReview` (admission.k8s.io/v1) to `/validate` over
//! HTTPS. The object is parsed and validated on its own, by the same code as `isthmus
//! validate` and the controller's admission. Checks against other objects (a second
//! VirtualService for the same host, a reference to a missing subset) are left to the
//! controller, which reports them in the object's status, as Istio's webhook leaves them
//! to istiod. A denial lists each fault as `Kind ns/name: field: message [code]`.
//! Deletions, and kinds the mesh does not read, are allowed.
//!
//! The serving certificate is issued by the cluster's CA. The API server must trust the
//! mesh root, so at start the controller writes the root into the `caBundle` of its
//! ValidatingWebhookConfiguration ([`publish_ca_bundle`]), as istiod does for its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use isthmus_core::config::{admit_on, ConfigError, LastGood, Platform};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::admission::{AdmissionResponse, AdmissionReview, Operation};

use crate::resources::{self, MESH_KINDS};

/// The path the API server calls.
pub const PATH: &str = "/validate";
/// Largest review accepted: the API server's own object limit is about 1.5 MiB, and a
/// review carries the old object as well.
const MAX_REVIEW_BYTES: usize = 8 << 20;
/// A connection that sends nothing for this long is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One fault as a denial shows it.
fn shown(e: &ConfigError) -> String {
    let mut out = e.object.clone().unwrap_or_else(|| e.file.clone());
    if !e.field.is_empty() {
        out.push_str(": ");
        out.push_str(&e.field);
    }
    format!("{out}: {} [{}]", e.message, e.code.as_str())
}

/// The faults that reject `obj` of `group`/`kind` on its own; empty when it is admitted
/// or is not a kind the mesh reads.
pub fn faults(group: &str, kind: &str, obj: &DynamicObject) -> Vec<String> {
    let Some(mesh_kind) = MESH_KINDS
        .iter()
        .find(|k| k.group == group && k.kind == kind)
    else {
        return Vec::new();
    };
    let parsed = resources::parse(mesh_kind, obj);
    let (_, rejected) = admit_on(&Platform::default(), parsed, &mut LastGood::default());
    rejected.iter().map(shown).collect()
}

/// Answers one AdmissionReview.
pub fn review(body: &[u8]) -> Vec<u8> {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let resp = AdmissionResponse::invalid(format!("not an AdmissionReview: {e}"));
            return serde_json::to_vec(&resp.into_review()).unwrap_or_default();
        }
    };
    let request = match review.try_into() {
        Ok(r) => r,
        Err(_) => {
            let resp = AdmissionResponse::invalid("the AdmissionReview has no request");
            return serde_json::to_vec(&resp.into_review()).unwrap_or_default();
        }
    };
    let request: kube::core::admission::AdmissionRequest<DynamicObject> = request;
    let mut resp = AdmissionResponse::from(&request);
    if matches!(request.operation, Operation::Create | Operation::Update) {
        if let Some(obj) = &request.object {
            let faults = faults(&request.kind.group, &request.kind.kind, obj);
            if !faults.is_empty() {
                resp = resp.deny(faults.join("\n"));
            }
        }
    }
    serde_json::to_vec(&resp.into_review()).unwrap_or_default()
}

/// Answers one AdmissionReview of a pod being created with the injection patch, if the
/// pod is to be injected (see `inject`).
pub fn review_injection(body: &[u8], template: &crate::inject::Template) -> Vec<u8> {
    use k8s_openapi::api::core::v1::Pod;
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let resp = AdmissionResponse::invalid(format!("not an AdmissionReview of a Pod: {e}"));
            return serde_json::to_vec(&resp.into_review()).unwrap_or_default();
        }
    };
    let request: kube::core::admission::AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(_) => {
            let resp = AdmissionResponse::invalid("the AdmissionReview has no request");
            return serde_json::to_vec(&resp.into_review()).unwrap_or_default();
        }
    };
    let mut resp = AdmissionResponse::from(&request);
    if let (Operation::Create, Some(pod)) = (&request.operation, &request.object) {
        if let Some(ops) = crate::inject::patch(pod, template) {
            let patched = serde_json::from_value::<json_patch::Patch>(ops)
                .ok()
                .and_then(|p| resp.clone().with_patch(p).ok());
            resp = match patched {
                Some(r) => r,
                None => resp.deny("the injection patch could not be made"),
            };
        }
    }
    serde_json::to_vec(&resp.into_review()).unwrap_or_default()
}

/// Serves the webhooks on `listener` until the task is dropped: validation always,
/// injection when `inject` says how.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    inject: Option<crate::inject::Template>,
) {
    let inject = inject.map(Arc::new);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let (acceptor, inject) = (acceptor.clone(), inject.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    return tracing::debug!(%remote, error = %e, "webhook handshake failed")
                }
                Err(_) => return,
            };
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let inject = inject.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(handle(req, inject.as_deref()).await)
                    }
                });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
    inject: Option<&crate::inject::Template>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: http::StatusCode, body: Vec<u8>| {
        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    };
    let path = req.uri().path().to_owned();
    let known = path == PATH || (path == crate::inject::PATH && inject.is_some());
    if req.method() != http::Method::POST || !known {
        return reply(http::StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => reply(
            http::StatusCode::OK,
            match inject {
                Some(t) if path == crate::inject::PATH => review_injection(&body.to_bytes(), t),
                _ => review(&body.to_bytes()),
            },
        ),
        Err(e) => reply(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("{{\"error\": \"{e}\"}}").into_bytes(),
        ),
    }
}

/// A webhook configuration, validating or mutating: what its webhooks' client configs are.
trait WebhookConfiguration:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
{
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig>;
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config)
            .collect()
    }
}

/// Writes `bundle_pem` as the `caBundle` of every webhook of configuration `name`, so the
/// API server trusts the webhook's certificate. Returns whether the configuration exists
/// (`isthmus install kubernetes` installs it).
async fn publish<K: WebhookConfiguration>(
    client: &kube::Client,
    name: &str,
    bundle_pem: &str,
) -> anyhow::Result<bool> {
    let api: Api<K> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let bundle = k8s_openapi::ByteString(bundle_pem.as_bytes().to_vec());
    let mut changed = false;
    for c in config.client_configs() {
        if c.ca_bundle.as_ref() != Some(&bundle) {
            c.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &config).await?;
    }
    Ok(true)
}

/// The validation webhook's configuration `name`: see [`publish`].
pub async fn publish_ca_bundle(
    client: &kube::Client,
    name: &str,
    bundle_pem: &str,
) -> anyhow::Result<bool> {
    publish::<ValidatingWebhookConfiguration>(client, name, bundle_pem).await
}

/// The injector's MutatingWebhookConfiguration (`inject::CONFIGURATION`): see [`publish`].
pub async fn publish_injector_ca_bundle(
    client: &kube::Client,
    bundle_pem: &str,
) -> anyhow::Result<bool> {
    publish::<MutatingWebhookConfiguration>(client, crate::inject::CONFIGURATION, bundle_pem).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review_of(object: serde_json::Value, operation: &str) -> serde_json::Value {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "networking.istio.io", "version": "v1beta1", "kind": "VirtualService"},
                "resource": {"group": "networking.istio.io", "version": "v1beta1", "resource": "virtualservices"},
                "name": "reviews", "namespace": "shop", "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": null, "dryRun": false,
            }
        });
        let out = review(&serde_json::to_vec(&body).expect("json"));
        serde_json::from_slice(&out).expect("a review")
    }

    #[test]
    fn a_bad_object_is_denied_with_the_validator_s_faults() {
        let vs = json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "timeout": "soon"}]}});
        let out = review_of(vs, "CREATE");
        let resp = &out["response"];
        assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(resp["allowed"], false);
        let message = resp["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("VirtualService shop/reviews: spec.http[0].timeout: "),
            "{message}"
        );
        assert!(message.ends_with("[IST0106]"), "{message}");
    }

    #[test]
    fn good_objects_deletions_and_other_kinds_are_allowed() {
        let good = json!({"metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v9"}}]}]}});
        assert_eq!(
            review_of(good, "CREATE")["response"]["allowed"],
            true,
            "a missing subset is the controller's to report"
        );
        let bad =
            json!({"metadata": {"name": "reviews", "namespace": "shop"}, "spec": {"hosts": 7}});
        assert_eq!(review_of(bad, "DELETE")["response"]["allowed"], true);
        assert_eq!(
            faults(
                "apps",
                "Deployment",
                &serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("object")
            ),
            Vec::<String>::new()
        );
        let garbage = review(b"not json");
        let garbage: serde_json::Value = serde_json::from_slice(&garbage).expect("a review");
        assert_eq!(garbage["response"]["allowed"], false);
    }
}
