//! Wire APIs between Isthmus components, generated from `proto/*.proto` at build time.
//!
//! - `discovery`: controller → proxies config push (xDS-style delta stream).
//! - `routing`: a service's traffic management, pushed inside `discovery.Service`.
//! - `ca`: workload certificate signing by a cluster controller.
//! - `federation`: cluster controllers ↔ federation controller.
//! - `tunnel`: the header on each QUIC stream between gateways.
//! - `echo`: the sample application's gRPC service.
//! - `ext_authz`: Envoy's external authorization API, which sidecars call providers with.
//! - `health`: gRPC's standard health checking API (`grpc.health.v1`), which sidecars ask
//!   of apps a HealthCheck names.

pub mod discovery {
    tonic::include_proto!("isthmus.discovery.v1");
}
pub mod routing {
    tonic::include_proto!("isthmus.routing.v1");
}
pub mod ca {
    tonic::include_proto!("isthmus.ca.v1");
}
pub mod federation {
    tonic::include_proto!("isthmus.federation.v1");
}
pub mod tunnel {
    tonic::include_proto!("isthmus.tunnel.v1");
}
pub mod echo {
    tonic::include_proto!("isthmus.echo.v1");
}
pub mod ext_authz {
    tonic::include_proto!("envoy.service.auth.v3");
}
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// Type URLs of the pushed resources.
pub mod type_url {
    pub const SERVICE: &str = "isthmus.io/Service";
    pub const MESH: &str = "isthmus.io/Mesh";
    pub const PEER: &str = "isthmus.io/Peer";
    pub const WORKLOAD: &str = "isthmus.io/Workload";
}
