//! The worker's admin API answers as the operator reads them (pure: the worker's types are
//! serialised and read back with the operator's).

use std::collections::BTreeMap;

use streamscore_operator::rescale::{DrainState, WorkerStatus};
use streamscore_worker::admin::{DrainReport, DrainedPartition};
use streamscore_worker::http::admin_status_body;
use streamscore_worker::kafka::Health;

#[test]
fn the_operator_reads_every_drain_state_the_worker_reports() {
    let health = Health::default();
    health.set_partitions(vec![0, 1]);
    health.input_partitions.store(4, std::sync::atomic::Ordering::Relaxed);
    let admin = &health.admin;
    let read = |h: &Health| serde_json::from_value::<WorkerStatus>(admin_status_body(h)).expect("operator reads it");
    assert_eq!(read(&health).drain, DrainState::Idle);
    let st = read(&health);
    assert_eq!((st.input_partitions, st.partitions, st.ready), (4, vec![0, 1], false));
    assert!(st.not_ready.iter().any(|r| r.contains("model loading")), "{:?}", st.not_ready);
    admin.request_drain("op-1", std::time::Duration::from_secs(60));
    assert_eq!(read(&health).drain, DrainState::Draining { id: "op-1".into() });
    let id = admin.pending().unwrap();
    admin.finish(
        &id,
        Ok(DrainReport {
            id: id.clone(),
            paused_at_ms: 1_700_000_000_123,
            checkpoint_store: true,
            partitions: vec![DrainedPartition {
                partition: 1,
                offsets: BTreeMap::from([("in".to_owned(), 42)]),
                manifest: Some("0000000000000007-abc.json".into()),
            }],
        }),
    );
    match read(&health).drain {
        DrainState::Drained { report } => {
            assert_eq!(
                (report.id.as_str(), report.paused_at_ms, report.checkpoint_store),
                ("op-1", 1_700_000_000_123, true)
            );
            assert_eq!(report.partitions[0].partition, 1);
            assert_eq!(report.partitions[0].manifest.as_deref(), Some("0000000000000007-abc.json"));
        }
        other => panic!("{other:?}"),
    }
    admin.resume();
    admin.request_drain("op-2", std::time::Duration::from_secs(60));
    let id = admin.pending().unwrap();
    admin.finish(&id, Err("checkpoint of partition 1: unreachable".into()));
    assert_eq!(
        read(&health).drain,
        DrainState::Failed { id: "op-2".into(), error: "checkpoint of partition 1: unreachable".into() }
    );
}
