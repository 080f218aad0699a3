//! Shared model of Isthmus: the config kinds and their validation, workload identities,
//! TLS credentials and verifiers, bootstrap tokens, the xDS-style discovery client, and the
//! admin server every proxy exposes.
//!
//! Everything that crosses a component boundary in more than one crate lives here; each
//! component crate (sidecar, gateway, controller, federation) depends on it and nothing else
//! of the others.

pub mod access_format;
pub mod admin;
pub mod backoff;
pub mod ca_client;
pub mod cel;
pub mod config;
pub mod drain;
pub mod fetch;
pub mod fsutil;
pub mod grpc;
pub mod headers;
pub mod identity;
pub mod locality;
pub mod otlp;
pub mod path;
pub mod proxy_trust;
pub mod readiness;
pub mod routing;
pub mod state_store;
pub mod tls;
pub mod token;
pub mod xds;
