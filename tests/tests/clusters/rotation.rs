//! Trust over time: `isthmus root rotate` under steady cross-cluster traffic, paused
//! half-way and resumed across a federation restart, and what the old root's certificates
//! get afterwards; controllers renewing their CA in place, and how long a cluster issues
//! without the federation.

use isthmus_tests::proxy_get as get;
use std::net::SocketAddr;
use std::time::Duration;

use isthmus::operator::{Ask, Operator};
use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::bundle::fingerprint;
use isthmus_core::tls::ca::{ca_csr, CertificateAuthority};
use isthmus_core::tls::parse_certs;
use isthmus_tests::{
    config_dump, credentials_from, eventually, mtls_request, reachable, settles_in, traffic, Mesh,
    NAMESPACE, TRUST_DOMAIN,
};

/// A cluster CA under `root` (as a rogue or retired cluster would have), trusting `bundle`.
fn cluster_ca(root: &CertificateAuthority, bundle: &str) -> anyhow::Result<CertificateAuthority> {
    let (key, csr) = ca_csr()?;
    let cert = root.sign_intermediate(
        &csr,
        "east",
        TRUST_DOMAIN,
        isthmus_core::tls::ca::INTERMEDIATE_TTL,
    )?;
    Ok(CertificateAuthority::from_pem(
        &cert,
        &key.serialize_pem(),
        vec![cert.clone()],
        bundle.to_owned(),
    )?)
}

fn read(path: std::path::PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_under_cross_cluster_traffic_fails_no_request_even_paused_and_resumed(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west", "north"]).await?;
    for c in ["west", "north"] {
        mesh.add_workload(c, &format!("echo-{c}"), Some("echo"), "echo")
            .await?;
    }
    mesh.add_workload("east", "client", None, "frontend")
        .await?;
    mesh.add_workload("north", "local", None, "frontend")
        .await?;
    let host = "echo.demo.svc.cluster.local";
    let (east, north) = (
        mesh.workload("east", "client").outbound(),
        mesh.workload("north", "local").outbound(),
    );
    reachable(east, host).await?;
    reachable(north, host).await?;
    // East has no echo: all of its traffic crosses clusters through the gateways.
    let across = traffic(east, host);
    let local = traffic(north, host);
    settles_in(&local, "north", 20, Duration::from_secs(10)).await?;

    let old_root = CertificateAuthority::from_pem(
        &read(mesh.fed_state.join("root-cert.pem"))?,
        &read(mesh.fed_state.join("root-key.pem"))?,
        Vec::new(),
        String::new(),
    )?;
    let old_fp = fingerprint(&parse_certs(&mesh.bundle_pem)?[0]);
    let operator = Operator {
        federation: mesh.federation_addr,
        state_dir: mesh.fed_state.clone(),
        trust_domain: TRUST_DOMAIN.into(),
    };

    let started = operator.ask(&Ask::Start(None)).await?;
    assert!(
        started.in_progress && started.phase == "distribute",
        "{started:?}"
    );
    assert_eq!(started.active_root, old_fp);
    let new_fp = started.to_root.clone();
    assert_ne!(new_fp, old_fp);
    assert_eq!(
        started.clusters.len(),
        3,
        "every cluster is followed: {started:?}"
    );

    // Half-way: once the new root signs, hold the rotation there.
    eventually(
        "the rotation to reach reissue",
        Duration::from_secs(30),
        || async {
            let s = operator.ask(&Ask::Status).await?;
            anyhow::ensure!(s.phase == "reissue", "{s:?}");
            Ok(())
        },
    )
    .await?;
    let paused = operator.ask(&Ask::Pause).await?;
    assert!(paused.paused, "{paused:?}");
    // While paused, every cluster finishes what reissue asks, and nothing moves on.
    let s = eventually(
        "every cluster reissued under the new root",
        Duration::from_secs(30),
        || async {
            let s = operator.ask(&Ask::Status).await?;
            anyhow::ensure!(s.clusters.iter().all(|c| c.done), "{s:?}");
            Ok(s)
        },
    )
    .await?;
    assert_eq!(
        s.phase, "reissue",
        "a paused rotation stays where it is: {s:?}"
    );
    assert!(
        s.clusters.iter().all(|c| c.proxies >= 2),
        "gateways and sidecars report: {s:?}"
    );
    // Each proxy's certificate now comes from its cluster's new CA; its bundle has both roots.
    let dump = config_dump(mesh.controller_admin("west")).await?;
    let proxies = dump["proxies"].as_array().cloned().unwrap_or_default();
    assert!(!proxies.is_empty());
    for p in &proxies {
        let roots = p["certificate"]["trusted_roots"].as_array().map(Vec::len);
        assert_eq!(roots, Some(2), "{p}");
    }

    // The federation stops half-way and comes back: the rotation is where it was.
    mesh.kill_federation();
    mesh.start_federation().await?;
    let s = operator.ask(&Ask::Status).await?;
    assert!(s.in_progress && s.paused && s.phase == "reissue", "{s:?}");

    // Resume and follow it to the end.
    let resumed_at = std::time::Instant::now();
    operator
        .rotate(Ask::Start(None), true, Duration::from_secs(60))
        .await?;
    let done = operator.ask(&Ask::Status).await?;
    assert!(!done.in_progress, "{done:?}");
    assert_eq!(done.active_root, new_fp);
    let new_root_pem = read(mesh.fed_state.join("root-cert.pem"))?;
    assert_eq!(fingerprint(&parse_certs(&new_root_pem)?[0]), new_fp);

    // Not one request failed, across clusters or within one.
    assert_eq!(
        across.failures(),
        Vec::<String>::new(),
        "cross-cluster traffic"
    );
    assert_eq!(local.failures(), Vec::<String>::new(), "local traffic");
    assert!(
        across.since(resumed_at).len() >= 20,
        "traffic kept flowing through the rotation"
    );

    // A certificate from the old root is refused by a sidecar in every cluster and by every
    // gateway; one from the new root is accepted (so the refusal is about the root).
    let frontend = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "frontend");
    let retired = credentials_from(&cluster_ca(&old_root, "")?, &frontend, &new_root_pem)?;
    let new_root = CertificateAuthority::from_pem(
        &new_root_pem,
        &read(mesh.fed_state.join("root-key.pem"))?,
        Vec::new(),
        String::new(),
    )?;
    let current = credentials_from(&cluster_ca(&new_root, "")?, &frontend, &new_root_pem)?;
    let mut targets: Vec<(String, SocketAddr)> = Vec::new();
    for c in ["west", "north"] {
        targets.push((
            format!("echo-{c}"),
            SocketAddr::new(mesh.workload(c, &format!("echo-{c}")).ip.into(), 15008),
        ));
    }
    for c in ["east", "west", "north"] {
        let gw = mesh
            .cluster(c)
            .gateway
            .as_ref()
            .expect("gateway")
            .tunnel_address;
        targets.push((format!("gateway-{c}"), gw));
    }
    for (name, addr) in &targets {
        let refused = mtls_request(*addr, &retired, get(&format!("{host}:80"))).await;
        assert!(
            refused.is_err(),
            "{name} accepted the old root: {refused:?}"
        );
        let accepted = mtls_request(*addr, &current, get(&format!("{host}:80"))).await;
        assert!(
            accepted.is_ok(),
            "{name} refused the new root: {accepted:?}"
        );
    }

    // The user brings the next root (Istio's cacerts): the same rotation, to that root.
    let (own, own_key) = CertificateAuthority::new_root(TRUST_DOMAIN)?;
    let (cert_file, key_file) = (
        mesh.dir.path().join("own-root.pem"),
        mesh.dir.path().join("own-root-key.pem"),
    );
    std::fs::write(&cert_file, own.bundle_pem())?;
    std::fs::write(&key_file, own_key)?;
    let since = std::time::Instant::now();
    operator
        .rotate(
            Ask::Start(Some((cert_file, key_file))),
            true,
            Duration::from_secs(60),
        )
        .await?;
    let done = operator.ask(&Ask::Status).await?;
    assert_eq!(
        done.active_root,
        fingerprint(&parse_certs(own.bundle_pem())?[0])
    );
    let dump = config_dump(mesh.controller_admin("east")).await?;
    let client = dump["proxies"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "demo/client").cloned())
        .expect("the client's stream");
    assert_eq!(
        client["certificate"]["trusted_roots"],
        serde_json::json!([isthmus_core::tls::bundle::short(&done.active_root)]),
        "{client}"
    );
    assert!(across.since(since).len() >= 20);
    assert_eq!(
        across.failures(),
        Vec::<String>::new(),
        "cross-cluster traffic"
    );
    assert_eq!(local.failures(), Vec::<String>::new(), "local traffic");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_renew_in_place_and_a_cluster_issues_only_until_its_ca_expires_without_the_federation(
) -> anyhow::Result<()> {
    // Lifetimes short enough to watch: cluster CA and controller certificate 12 s.
    let (mut mesh, _, steady) =
        Mesh::with_traffic_from_east_configured(&["east", "west"], &["west"], |m| {
            m.cluster_ca_ttl = Duration::from_secs(12);
            m.controller_cert_ttl = Duration::from_secs(12);
        })
        .await?;
    let admin = mesh.controller_admin("east");
    let first = config_dump(admin).await?["ca"].clone();

    // Renewed in place at half-life, with no token, while traffic flows.
    let renewed = eventually(
        "east's CA to be renewed in place",
        Duration::from_secs(15),
        || async {
            let ca = config_dump(admin).await?["ca"].clone();
            anyhow::ensure!(ca["fingerprint"] != first["fingerprint"], "{ca}");
            anyhow::ensure!(
                ca["controller_certificate_not_after_unix"]
                    != first["controller_certificate_not_after_unix"],
                "{ca}"
            );
            Ok(ca)
        },
    )
    .await?;
    assert_eq!(
        config_dump(admin).await?["federation"]["connected"],
        true,
        "the link stayed up across the renewal"
    );
    // Traffic goes on with the renewed CA's certificates.
    let since = std::time::Instant::now();
    eventually(
        "more traffic after the renewal",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(steady.since(since).len() >= 20);
            Ok(())
        },
    )
    .await?;
    assert_eq!(steady.failures(), Vec::<String>::new());
    drop(steady);

    // Without the federation the CA is not renewed: it issues until it expires, and no
    // certificate it signs outlives it.
    mesh.kill_federation();
    let until = renewed["issues_until_unix"].as_u64().expect("issues until");
    let cert = mesh
        .ca_client("east", "east", "frontend", "frontend")?
        .fetch(None)
        .await?;
    let not_after = isthmus_core::admin::unix_seconds(cert.not_after);
    assert!(
        not_after <= until,
        "a certificate until {not_after} outlives its CA ({until})"
    );
    let client = mesh.ca_client("east", "east", "frontend", "frontend")?;
    eventually("east's CA to expire", Duration::from_secs(20), || async {
        let refused = client
            .fetch(None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        anyhow::ensure!(
            refused.as_ref().is_err_and(|e| e.contains("expired")),
            "{refused:?}"
        );
        Ok(())
    })
    .await?;
    let now = isthmus_core::admin::unix_seconds(std::time::SystemTime::now());
    assert!(
        now + 1 >= until,
        "refused at {now}, before the CA's end {until}"
    );
    let ca = config_dump(admin).await?["ca"].clone();
    assert_eq!(
        ca["issues_until_unix"], renewed["issues_until_unix"],
        "{ca}"
    );
    Ok(())
}
