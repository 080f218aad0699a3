//! The document kinds of the file adapter, as users write them. Field names and meanings
//! follow the Kubernetes and Istio APIs; fields we do not support are rejected by
//! `deny_unknown_fields`, so nothing is silently ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `metadata` of every document. Server-populated fields (uid, resourceVersion, ...) are
/// accepted so that documents exported from a cluster load unchanged; they carry no behaviour.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `v1/Service`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(rename = "type")]
    pub service_type: Option<String>,
    /// The Service's virtual IP (`None` for a headless Service): what transparently
    /// captured connections to it are going to.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: i64,
    pub target_port: Option<IntOrString>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// `networking.istio.io/v1` `WorkloadEntry`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<i64>,
    pub service_account: Option<String>,
}

/// `multicluster.x-k8s.io/v1alpha1` `ServiceExport`: its spec is empty.
#[derive(Debug, Clone, Deserialize, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceExportSpec {}

/// The head of every document: enough to know what it is.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Head {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// `isthmus.io/v1alpha1` `LocalRateLimit`: a token bucket per sidecar of the target service
/// (Istio has no first-class API for local rate limits, only EnvoyFilter).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalRateLimitSpec {
    pub target_ref: TargetRefSpec,
    /// Name of a VirtualService route (`http[].name`); all requests when absent.
    pub route: Option<String>,
    pub tokens_per_interval: i64,
    pub interval: String,
    /// Bucket size; `tokensPerInterval` when absent.
    pub burst: Option<i64>,
    /// One bucket per calling identity (SPIFFE ID) instead of one for all callers.
    #[serde(default)]
    pub per_caller: bool,
}

/// `isthmus.io/v1alpha1` `GlobalRateLimit`: one budget for the target service's sidecars
/// in every cluster. The federation splits it between clusters by their demand; no
/// central service is on the request path.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GlobalRateLimitSpec {
    pub target_ref: TargetRefSpec,
    /// Name of a VirtualService route (`http[].name`); all requests when absent.
    pub route: Option<String>,
    /// The budget for the whole mesh, in requests per second.
    pub requests_per_second: i64,
}

/// `isthmus.io/v1alpha1` `HealthCheck`: how the target service's endpoints are checked
/// actively (Istio has no API for it; Envoy's own is per cluster, which Istio does not
/// expose). Each endpoint's own sidecar probes its app; the cluster's controller takes an
/// endpoint that fails out for every proxy and every cluster, so no endpoint is probed by
/// each of its callers.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    pub target_ref: TargetRefSpec,
    /// The service port (number or name) whose target port on the app is probed; the
    /// service's first port when absent.
    pub port: Option<IntOrString>,
    /// An HTTP/1.1 `GET`. Exactly one of `http`, `grpc` and `tcp`.
    pub http: Option<HttpHealthCheckSpec>,
    /// gRPC's `grpc.health.v1.Health/Check`; passes on `SERVING`.
    pub grpc: Option<GrpcHealthCheckSpec>,
    /// A TCP connection that comes up.
    pub tcp: Option<TcpHealthCheckSpec>,
    /// Time between probes (default 5s).
    pub interval: Option<String>,
    /// Time a probe may take (default 1s; at most the interval).
    pub timeout: Option<String>,
    /// Up to this much is added at random to each interval, so that probes spread out
    /// (default a tenth of the interval).
    pub interval_jitter: Option<String>,
    /// Successes in a row that put a failing endpoint back (default 2).
    pub healthy_threshold: Option<i64>,
    /// Failures in a row that take an endpoint out (default 3).
    pub unhealthy_threshold: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpHealthCheckSpec {
    pub path: String,
    /// The Host header (default: the service's host name).
    pub host: Option<String>,
    /// Statuses that pass: codes (`204`) or inclusive ranges (`"200-299"`); default
    /// 200-399, as Kubernetes's `httpGet` probes.
    #[serde(default)]
    pub expected_statuses: Vec<IntOrString>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcHealthCheckSpec {
    /// The service name asked about (default "": the server as a whole).
    #[serde(default)]
    pub service: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheckSpec {}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRefSpec {
    pub kind: String,
    pub name: String,
}

/// Kubernetes's own schema for a port that is a number or a name.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for IntOrString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"x-kubernetes-int-or-string": true})
    }
}
