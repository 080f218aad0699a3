//! The `isthmus` binary's library: the sample app, the local multi-cluster demo and the
//! helpers the CLI and the integration tests share. Every component itself lives in its own
//! crate (`isthmus-sidecar`, `-gateway`, `-controller`, `-federation`).

pub mod bench;
pub mod children;
pub mod client;
pub mod demo;
pub mod echo;
pub mod explain;
pub mod operator;
pub mod process;
pub mod replicas;
pub mod status;
pub mod traffic;
