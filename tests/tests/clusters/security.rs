//! Identity and trust: certificates from another root are refused by sidecars and gateways,
//! and the CA signs only the identity a caller proved.

use isthmus_core::identity::SpiffeId;
use isthmus_core::tls::ca::CertificateAuthority;
use isthmus_tests::proxy_get as get;
use isthmus_tests::{
    credentials_from, mtls_request, quic_to_gateway, Mesh, NAMESPACE, TRUST_DOMAIN,
};

fn connect(authority: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::builder()
        .method("CONNECT")
        .uri(authority)
        .header("x-isthmus-cluster", "west")
        .body(Default::default())
        .expect("valid request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_chaining_to_another_root_are_refused_by_sidecars_and_gateways(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    let sidecar = std::net::SocketAddr::new(mesh.workload("east", "echo-east").ip.into(), 15008);
    let gateway = mesh
        .cluster("east")
        .gateway
        .as_ref()
        .expect("gateway")
        .tunnel_address;
    let frontend = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "frontend");

    // The real CA's certificate is accepted: the refusals below are about the root alone.
    let good = mesh
        .ca_client("east", "east", "frontend", "frontend")?
        .fetch(None)
        .await?;
    let good = isthmus_core::tls::TlsIdentity::new(good);
    assert_eq!(
        mtls_request(sidecar, &good, get("echo.demo.svc.cluster.local:80")).await?,
        200
    );
    assert_eq!(
        mtls_request(gateway, &good, connect("echo.demo.svc.cluster.local:80")).await?,
        503,
        "accepted, but no west peer"
    );

    // A tunnel may only reach ports the workload's services declare.
    let tunnel = |port: &str| {
        http::Request::builder()
            .method("CONNECT")
            .uri("echo.demo.svc.cluster.local:7000")
            .header("x-isthmus-target-port", port)
            .body(Default::default())
            .expect("valid request")
    };
    isthmus_tests::eventually(
        "the sidecar to know its own service",
        std::time::Duration::from_secs(5),
        || async {
            anyhow::ensure!(mtls_request(sidecar, &good, tunnel("7000")).await? == 200);
            Ok(())
        },
    )
    .await?;
    assert_eq!(
        mtls_request(sidecar, &good, tunnel("22")).await?,
        501,
        "an undeclared port is refused"
    );

    // Same identity, same trusted bundle, but signed by a root the mesh does not trust.
    let (rogue_root, _) = CertificateAuthority::new_root(TRUST_DOMAIN)?;
    let rogue = credentials_from(&rogue_root, &frontend, &mesh.bundle_pem)?;
    let refused = mtls_request(sidecar, &rogue, get("echo.demo.svc.cluster.local:80")).await;
    assert!(
        refused.is_err(),
        "sidecar accepted a certificate from another root: {refused:?}"
    );
    let refused = mtls_request(gateway, &rogue, connect("echo.demo.svc.cluster.local:80")).await;
    assert!(
        refused.is_err(),
        "gateway accepted a certificate from another root: {refused:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_the_identity_the_caller_proved() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    let err = mesh
        .ca_client("east", "east", "frontend", "echo")?
        .fetch(None)
        .await
        .expect_err("asked for another identity");
    let msg = err.to_string();
    assert!(
        msg.contains("PermissionDenied") || msg.contains("permission"),
        "{msg}"
    );
    assert!(
        msg.contains("sa/echo") && msg.contains("sa/frontend"),
        "names both identities: {msg}"
    );

    // A token minted by west's controller proves nothing to east's CA.
    let err = mesh
        .ca_client("east", "west", "frontend", "frontend")?
        .fetch(None)
        .await
        .expect_err("token of another cluster");
    assert!(err.to_string().contains("token refused"), "{err}");

    let ok = mesh
        .ca_client("east", "east", "frontend", "frontend")?
        .fetch(None)
        .await?;
    assert_eq!(ok.id, SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "frontend"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_may_only_subscribe_as_the_workload_its_certificate_names() -> anyhow::Result<()> {
    use isthmus_proto::discovery::{discovery_client::DiscoveryClient, DeltaRequest, Node};
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    let channel = mesh.controller_channel("east", "frontend").await?;
    let subscribe = |role: &str, workload: &str| {
        let first = DeltaRequest {
            node: Some(Node {
                cluster: "east".into(),
                role: role.into(),
                workload: workload.into(),
                ..Default::default()
            }),
            type_url: isthmus_proto::type_url::SERVICE.into(),
            ..Default::default()
        };
        tokio_stream::iter(vec![first])
    };
    for (role, workload) in [("sidecar", "demo/echo-east"), ("gateway", "")] {
        // Once the controller has the WorkloadEntry (it watches its folder), the claim fails.
        isthmus_tests::eventually(
            "the claim to be refused",
            std::time::Duration::from_secs(5),
            || async {
                let refused = DiscoveryClient::new(channel.clone())
                    .delta_resources(subscribe(role, workload))
                    .await;
                match refused {
                    Err(status) if status.code() == tonic::Code::PermissionDenied => Ok(()),
                    other => anyhow::bail!("{role}: {other:?}"),
                }
            },
        )
        .await?;
    }
    // Its own (not yet configured) workload in its namespace is fine.
    let mut ok = DiscoveryClient::new(channel)
        .delta_resources(subscribe("sidecar", "demo/frontend-1"))
        .await?
        .into_inner();
    assert!(ok.message().await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_accepts_exports_only_for_the_cluster_a_controller_proved(
) -> anyhow::Result<()> {
    use isthmus_proto::federation::{federation_client::FederationClient, ExportUpdate};
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    let state = mesh.cluster("east").state_dir.clone();
    let key = rcgen_key_der(&std::fs::read_to_string(state.join("controller-key.pem"))?)?;
    let cert = std::fs::read_to_string(state.join("controller.pem"))?;
    let east = isthmus_core::tls::TlsIdentity::new(isthmus_core::tls::Credentials::from_pem(
        key,
        &[cert],
        &mesh.bundle_pem,
    )?);
    let federation = mesh.federation.as_ref().expect("federation").grpc_address;
    let policy = isthmus_core::tls::PeerPolicy::OneOf(vec![SpiffeId::new(
        TRUST_DOMAIN,
        "isthmus-system",
        "isthmus-federation",
    )]);
    let channel = isthmus_core::grpc::tls_channel(
        federation,
        east.client_config(policy, &[isthmus_core::tls::ALPN_H2]),
    );
    let spoof = ExportUpdate {
        cluster: "west".into(),
        reset: true,
        ..Default::default()
    };
    let mut replies = FederationClient::new(channel)
        .exchange(tokio_stream::iter(vec![spoof]))
        .await?
        .into_inner();
    let status = loop {
        match replies.message().await {
            Ok(Some(_registry)) => continue,
            Ok(None) => anyhow::bail!("stream ended without refusing the spoofed export"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("authenticated as cluster east"),
        "{status:?}"
    );

    // A workload certificate, even a valid one, is no controller's: refused at the handshake.
    let frontend = isthmus_core::tls::TlsIdentity::new(
        mesh.ca_client("east", "east", "frontend", "frontend")?
            .fetch(None)
            .await?,
    );
    let policy = isthmus_core::tls::PeerPolicy::OneOf(vec![SpiffeId::new(
        TRUST_DOMAIN,
        "isthmus-system",
        "isthmus-federation",
    )]);
    let channel = isthmus_core::grpc::tls_channel(
        federation,
        frontend.client_config(policy, &[isthmus_core::tls::ALPN_H2]),
    );
    let refused = FederationClient::new(channel)
        .exchange(tokio_stream::iter(Vec::<ExportUpdate>::new()))
        .await;
    assert!(
        refused.is_err(),
        "a workload certificate opened an export stream"
    );
    Ok(())
}

fn rcgen_key_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    let der = rustls_pemfile::private_key(&mut pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no key in PEM"))?;
    Ok(der.secret_der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_dump_holds_a_key_or_a_token() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    let admins = [
        mesh.federation.as_ref().expect("federation").admin_address,
        mesh.controller_admin("east"),
        mesh.cluster("east")
            .gateway
            .as_ref()
            .expect("gateway")
            .admin_address,
        mesh.workload("east", "echo-east")
            .sidecar
            .as_ref()
            .expect("sidecar")
            .admin_address,
    ];
    for admin in admins {
        let dump = isthmus_tests::config_dump(admin).await?.to_string();
        for secret in ["PRIVATE KEY", "BEGIN", "ist1.", "token"] {
            assert!(
                !dump.contains(secret),
                "{admin}/config_dump holds `{secret}`: {dump}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_self_signed_certificates_are_refused() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    let sidecar = std::net::SocketAddr::new(mesh.workload("east", "echo-east").ip.into(), 15008);
    let frontend = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "frontend");

    // The cluster's own CA, as the controller keeps it, signs a leaf that lives one second.
    let state = mesh.cluster("east").state_dir.clone();
    let ca_cert = std::fs::read_to_string(state.join("cluster-ca.pem"))?;
    let ca = CertificateAuthority::from_pem(
        &ca_cert,
        &std::fs::read_to_string(state.join("cluster-ca-key.pem"))?,
        vec![ca_cert.clone()],
        mesh.bundle_pem.clone(),
    )?;
    let (key, csr) = isthmus_core::tls::ca::leaf_csr(&frontend)?;
    let chain = ca.sign_leaf(&csr, &frontend, std::time::Duration::from_secs(1))?;
    let short = isthmus_core::tls::TlsIdentity::new(isthmus_core::tls::Credentials::from_pem(
        key.serialize_der(),
        &chain,
        &mesh.bundle_pem,
    )?);
    assert_eq!(
        mtls_request(sidecar, &short, get("echo.demo.svc.cluster.local:80")).await?,
        200,
        "accepted while valid"
    );
    isthmus_tests::eventually(
        "the certificate to expire and be refused",
        std::time::Duration::from_secs(5),
        || async {
            let refused =
                mtls_request(sidecar, &short, get("echo.demo.svc.cluster.local:80")).await;
            anyhow::ensure!(refused.is_err(), "still accepted: {refused:?}");
            Ok(())
        },
    )
    .await?;

    // A self-signed leaf naming the same identity.
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(frontend.to_string().try_into()?)];
    let cert = params.self_signed(&key)?;
    let self_signed =
        isthmus_core::tls::TlsIdentity::new(isthmus_core::tls::Credentials::from_pem(
            key.serialize_der(),
            &[cert.pem()],
            &mesh.bundle_pem,
        )?);
    let refused = mtls_request(sidecar, &self_signed, get("echo.demo.svc.cluster.local:80")).await;
    assert!(refused.is_err(), "a self-signed certificate was accepted");
    Ok(())
}

/// Opens a stream that claims to come from `source_cluster`; the gateway's reply.
async fn stream_from(
    conn: &quinn::Connection,
    source_cluster: &str,
) -> anyhow::Result<isthmus_proto::tunnel::StreamReply> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let header = isthmus_proto::tunnel::StreamHeader {
        target_cluster: "east".into(),
        namespace: NAMESPACE.into(),
        service: "echo".into(),
        port: 80,
        source_identity: SpiffeId::new(TRUST_DOMAIN, NAMESPACE, "frontend").to_string(),
        source_cluster: source_cluster.into(),
        ..Default::default()
    };
    isthmus_gateway::header::write(&mut send, &header).await?;
    Ok(isthmus_gateway::header::read_reply(&mut recv).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_proves_one_cluster_and_cannot_speak_or_register_for_another(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west"]).await?;
    mesh.add_workload("east", "echo-east", Some("echo"), "echo")
        .await?;
    // A real, valid gateway certificate, issued by west's CA.
    let west_gateway = mesh.gateway_certificate("west").await?;
    let east_quic = mesh.gateway_quic("east");

    // East's gateway takes it as west's gateway, and serves streams west speaks for...
    let conn = quic_to_gateway(east_quic, &west_gateway, "east").await?;
    isthmus_tests::eventually(
        "west's gateway to reach echo in east",
        std::time::Duration::from_secs(10),
        || async {
            let own = stream_from(&conn, "west").await?;
            anyhow::ensure!(own.ok, "west's gateway speaking for west: {own:?}");
            Ok(())
        },
    )
    .await?;
    // ...but not a stream that claims another cluster.
    let spoofed = stream_from(&conn, "north").await?;
    assert!(!spoofed.ok);
    assert!(
        spoofed
            .error
            .contains("authenticated as the gateway of west, not of north"),
        "{spoofed:?}"
    );
    // A valid workload certificate is no gateway at all.
    let workload = isthmus_core::tls::TlsIdentity::new(
        mesh.ca_client("west", "west", "frontend", "frontend")?
            .fetch(None)
            .await?,
    );
    assert!(
        isthmus_tests::gateway_refuses(east_quic, &workload, "east").await,
        "a workload certificate opened a gateway link"
    );

    // West's gateway certificate cannot register as a gateway of east with east's controller.
    let east = mesh
        .cluster("east")
        .controller
        .as_ref()
        .expect("controller")
        .grpc_address;
    let channel = isthmus_core::grpc::tls_channel(
        east,
        west_gateway.client_config(
            isthmus_core::tls::PeerPolicy::OneOf(vec![SpiffeId::controller(TRUST_DOMAIN, "east")]),
            &[isthmus_core::tls::ALPN_H2],
        ),
    );
    let first = isthmus_proto::discovery::DeltaRequest {
        node: Some(isthmus_proto::discovery::Node {
            cluster: "east".into(),
            role: "gateway".into(),
            tunnel_address: "127.0.9.9:15008".into(),
            quic_address: "127.0.9.9:15443".into(),
            ..Default::default()
        }),
        type_url: isthmus_proto::type_url::PEER.into(),
        ..Default::default()
    };
    let mut client = isthmus_proto::discovery::discovery_client::DiscoveryClient::new(channel);
    let refused = match client
        .delta_resources(tokio_stream::iter(vec![first]))
        .await
    {
        Err(status) => status,
        Ok(resp) => match resp.into_inner().message().await {
            Err(status) => status,
            Ok(m) => anyhow::bail!("east's controller took west's gateway: {m:?}"),
        },
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("issued by cluster west's CA"),
        "{refused:?}"
    );
    Ok(())
}
