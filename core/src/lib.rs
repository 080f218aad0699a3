//! Shared model of Isthmus: the config kinds and their validation, workload identities,
//! TLS credentials and verifiers, bootstrap tokens, the xDS-style discovery client, and the
//! admin server every proxy exposes.
//!
//! Everything that crosses a component boundary in more than one crate lives here; each
//! component crate (sidecar, gateway, controller, federation) depends on it and nothing else
//! of the others.

pub mod identity;
pub mod tls;
pub mod token;
pub mod fsutil;
pub mod config;
pub mod locality;
pub mod admin;
pub mod grpc;
pub mod readiness;
pub mod backoff;
pub mod ca_client;
pub mod xds;
pub mod headers;
pub mod drain;
