//! The integration suite: whole clusters in this process, each simulated pod on its own
//! `127.0.C.W` address, with real sockets, mTLS, QUIC and xDS between them. One test binary
//! for all of it, so the suite links once (each binary carries every crate of the product);
//! `cargo test -p isthmus-tests --test clusters routing::` runs one module.

mod adversarial;
mod authorization;
mod capture;
mod control_plane;
mod examples;
mod failover;
mod faults;
mod federation_ha;
mod global_rate_limit;
mod health_check;
mod kubernetes;
mod membership;
mod mesh;
mod rotation;
mod routing;
mod scale;
mod scoping;
mod security;
mod service_entry;
mod telemetry;
mod wasm;
