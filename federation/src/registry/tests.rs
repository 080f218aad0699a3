use super::*;
use isthmus_proto::federation::LocalityCount;

fn service(name: &str, port: u32, healthy: u32) -> ExportedService {
    ExportedService {
        namespace: "demo".into(),
        name: name.into(),
        ports: vec![ExportedPort {
            name: "http".into(),
            port,
            protocol: "http".into(),
        }],
        localities: vec![LocalityCount {
            healthy,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn reset(services: Vec<ExportedService>) -> ExportBatch {
    ExportBatch {
        reset: true,
        upserted: services,
        gateways: Some(vec![]),
        ..Default::default()
    }
}

fn registry(dir: &Path) -> GlobalRegistry {
    let mut metrics = prometheus_client::registry::Registry::default();
    GlobalRegistry::new(Default::default(), vec![], dir, &mut metrics)
}

/// Everything a subscription has pending, as one batch.
fn take(sub: &mut Subscription) -> Option<Heard> {
    let msgs = sub.pending()?;
    let mut b = Heard::default();
    for m in msgs {
        b.reset |= m.reset;
        b.upserted.extend(
            m.upserted
                .iter()
                .map(|u| GlobalService::decode(u.as_ref()).expect("decodes")),
        );
        b.withdrawn.extend(m.withdrawn);
        b.meta = b.meta.or(m.meta);
    }
    Some(b)
}

#[derive(Default)]
struct Heard {
    reset: bool,
    upserted: Vec<GlobalService>,
    withdrawn: Vec<String>,
    meta: Option<RegistryMeta>,
}

#[test]
fn same_name_in_several_clusters_is_one_service_and_conflicts_are_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = registry(dir.path());
    reg.apply("east", reset(vec![service("echo", 80, 1)]));
    reg.apply("west", reset(vec![service("echo", 80, 1)]));
    reg.apply("north", reset(vec![service("echo", 81, 1)]));
    let mut south = reg.subscribe("south");
    let batch = take(&mut south).expect("first batch");
    assert!(batch.reset);
    let clusters: Vec<&str> = batch.upserted[0]
        .clusters
        .iter()
        .map(|c| c.cluster.as_str())
        .collect();
    assert_eq!(clusters, ["east", "west"]);
    let conflicts = batch.meta.expect("meta").conflicts;
    assert_eq!(conflicts.len(), 1);
    assert!(conflicts[0].contains("north is left out"), "{conflicts:?}");
}

#[test]
fn a_change_reaches_only_the_clusters_whose_view_it_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = registry(dir.path());
    let many: Vec<ExportedService> = (0..100).map(|i| service(&format!("s{i}"), 80, 1)).collect();
    reg.apply("east", reset(many.clone()));
    reg.apply("west", reset(many));
    let mut east = reg.subscribe("east");
    let mut north = reg.subscribe("north");
    assert_eq!(
        take(&mut east).expect("first").upserted.len(),
        100,
        "west's entries"
    );
    assert_eq!(take(&mut north).expect("first").upserted.len(), 100);

    // One endpoint of one service in east changes.
    reg.apply(
        "east",
        ExportBatch {
            upserted: vec![service("s7", 80, 2)],
            ..Default::default()
        },
    );
    assert!(take(&mut east).is_none(), "east is not sent its own change");
    let delta = take(&mut north).expect("north sees it");
    assert!(!delta.reset);
    assert_eq!(delta.upserted.len(), 1, "only the changed service");
    assert_eq!(delta.upserted[0].name, "s7");
    assert!(delta.meta.is_none(), "nothing mesh-wide changed");

    // A withdrawal: east still sees west's s9; north sees s9 lose east.
    reg.apply(
        "west",
        ExportBatch {
            withdrawn: vec!["demo/s9".into()],
            ..Default::default()
        },
    );
    let delta = take(&mut east).expect("east loses west's s9");
    assert_eq!(delta.withdrawn, ["demo/s9"]);
    let delta = take(&mut north).expect("north sees s9 shrink");
    assert_eq!(delta.upserted[0].clusters.len(), 1);

    // The same batch again changes nothing and sends nothing.
    reg.apply(
        "west",
        ExportBatch {
            withdrawn: vec!["demo/s9".into()],
            ..Default::default()
        },
    );
    assert!(take(&mut north).is_none());
}

#[test]
fn a_large_registry_travels_in_messages_of_bounded_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = registry(dir.path());
    let mut big = service("big", 80, 1);
    big.localities = (0..200_000)
        .map(|i| LocalityCount {
            healthy: 1,
            labels: [("pod".to_string(), format!("big-{i}"))].into(),
            ..Default::default()
        })
        .collect();
    let services: Vec<ExportedService> = (0..3000)
        .map(|i| service(&format!("s{i}"), 80, 1))
        .chain([big])
        .collect();
    reg.apply("east", reset(services));
    let mut west = reg.subscribe("west");
    let msgs = west.pending().expect("first batch");
    let total: usize = msgs.iter().map(Message::encoded_len).sum();
    assert!(
        total > 4 << 20,
        "{total} bytes: more than gRPC's default limit"
    );
    let largest_small = msgs
        .iter()
        .filter(|m| m.upserted.iter().all(|s| s.len() < 1 << 20))
        .map(Message::encoded_len)
        .max()
        .expect("some");
    assert!(
        largest_small <= isthmus_core::grpc::CHUNK_BYTES + 1024,
        "{largest_small}"
    );
    assert!(msgs[..msgs.len() - 1].iter().all(|m| m.more));
    assert!(!msgs[msgs.len() - 1].more);
    assert_eq!(msgs.iter().map(|m| m.upserted.len()).sum::<usize>(), 3001);
    let decoded: Vec<GlobalService> = msgs
        .iter()
        .flat_map(|m| &m.upserted)
        .map(|u| GlobalService::decode(u.as_ref()).expect("each part decodes"))
        .collect();
    let big = decoded.iter().find(|s| s.name == "big").expect("big");
    assert_eq!(big.clusters.len(), 1);
    assert_eq!(big.clusters[0].cluster, "east");
    assert_eq!(big.clusters[0].localities.len(), 200_000);
}

#[test]
fn a_restarted_registry_keeps_every_cluster_stale_until_it_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = registry(dir.path());
    first.apply("east", reset(vec![service("echo", 80, 1)]));
    first.apply("west", reset(vec![service("echo", 80, 1)]));
    let before = take(&mut first.subscribe("north")).expect("batch");
    assert_eq!(before.upserted[0].clusters.len(), 2);
    assert!(before.meta.expect("meta").stale_clusters.is_empty());
    first.flush().expect("flush");

    let second = registry(dir.path());
    let mut north = second.subscribe("north");
    let after = take(&mut north).expect("batch");
    assert_eq!(after.upserted, before.upserted, "nothing vanished");
    assert_eq!(after.meta.expect("meta").stale_clusters, ["east", "west"]);
    second.apply("east", reset(vec![service("echo", 80, 1)]));
    let confirmed = take(&mut north).expect("east confirmed");
    assert!(
        confirmed.upserted.is_empty(),
        "east's exports did not change"
    );
    assert_eq!(confirmed.meta.expect("meta").stale_clusters, ["west"]);
}

#[test]
fn a_stream_far_behind_a_compacted_log_gets_the_whole_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = registry(dir.path());
    reg.apply("east", reset(vec![service("keep", 80, 1)]));
    let mut west = reg.subscribe("west");
    take(&mut west).expect("first");
    for i in 0..(TOMBSTONE_SLACK + 10) {
        let name = format!("tmp{i}");
        reg.apply(
            "east",
            ExportBatch {
                upserted: vec![service(&name, 80, 1)],
                ..Default::default()
            },
        );
        reg.apply(
            "east",
            ExportBatch {
                withdrawn: vec![key_of("demo", &name)],
                ..Default::default()
            },
        );
    }
    let batch = take(&mut west).expect("catch up");
    assert!(batch.reset, "past the compaction the stream resyncs");
    assert_eq!(batch.upserted.len(), 1);
    assert!(reg.lock().log.len() <= 2 + TOMBSTONE_SLACK + 1);
}
