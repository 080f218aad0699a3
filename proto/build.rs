//! Compiles the `.proto` files with protox, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/discovery.proto",
        "proto/routing.proto",
        "proto/ca.proto",
        "proto/federation.proto",
        "proto/tunnel.proto",
        "proto/echo.proto",
        "proto/ext_authz.proto",
        "proto/grpc/health/v1/health.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    // Each package is one flat module of this crate (see lib.rs), so a package that others
    // import is generated on its own and referred to by its module path.
    let shared = ["proto/routing.proto"];
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(protox::compile(shared, ["proto"])?)?;
    let rest: Vec<&str> = files.into_iter().filter(|f| !shared.contains(f)).collect();
    // BTreeMap keeps encodings deterministic, so resource versions are content hashes.
    tonic_prost_build::configure()
        .btree_map(".")
        // Sent as cut from bytes the federation keeps encoded (see federation/src/registry.rs).
        .bytes(".isthmus.federation.v1.RegistryUpdate.upserted")
        .extern_path(".isthmus.routing.v1", "crate::routing")
        .compile_fds(protox::compile(rest, ["proto"])?)?;
    Ok(())
}
