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
                ..Default::default()
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

/// What the upgrade reads: drained offsets, and a candidate's shadow mode with its barrier.
#[test]
fn the_operator_reads_offsets_and_the_shadow_barrier() {
    use streamscore_crds::pipeline::ShadowConfig;
    use streamscore_worker::admin::{Barrier, DrainOptions};
    let health = Health::default();
    let read = |h: &Health| serde_json::from_value::<WorkerStatus>(admin_status_body(h)).expect("operator reads it");
    assert_eq!(read(&health).shadow, None, "a live worker is not in shadow mode");
    *health.admin.shadow() = Some(ShadowConfig {
        topic: "scores.shadow".into(),
        dead_letter_topic: "dlq.shadow".into(),
        feature_topic: None,
        live_from: None,
    });
    let st = read(&health);
    assert_eq!(st.shadow.as_ref().map(|s| s.topic.as_str()), Some("scores.shadow"));
    assert_eq!(st.shadow.as_ref().and_then(|s| s.live_from.clone()), None);
    let barrier: Barrier = BTreeMap::from([("in".to_owned(), BTreeMap::from([(0, 17), (1, 4)]))]);
    health.admin.go_live(&barrier).unwrap();
    assert_eq!(read(&health).shadow.and_then(|s| s.live_from), Some(barrier.clone()));
    // The operator's barrier text round-trips.
    let text = streamscore_operator::upgrade::barrier_text(&barrier);
    assert_eq!(streamscore_operator::upgrade::parse_barrier(Some(&text)), Some(barrier));
    // A fenced drain without checkpoints reports the committed offsets the barrier is made of.
    let admin = &health.admin;
    admin.request_drain_with(
        "u1-live-1",
        std::time::Duration::from_secs(60),
        DrainOptions { checkpoint: false, fence: true },
    );
    let (id, _) = admin.pending_with().unwrap();
    admin.finish(
        &id,
        Ok(DrainReport {
            id: id.clone(),
            paused_at_ms: 1,
            checkpoint_store: true,
            partitions: vec![DrainedPartition {
                partition: 0,
                offsets: BTreeMap::from([("in".to_owned(), 17)]),
                manifest: None,
                output_offsets: BTreeMap::from([("in".to_owned(), 25)]),
            }],
        }),
    );
    let answers = vec![("w-0".to_owned(), Ok(read(&health)))];
    let at = streamscore_operator::upgrade::drained_positions(&answers, "u1-live-1").unwrap().unwrap();
    // The barrier is made of output positions (the state is at 17, replaying up to 25: the
    // outputs below 25 were written before), not of the state's offsets.
    assert_eq!(at, BTreeMap::from([("in".to_owned(), BTreeMap::from([(0, 25)]))]));
}
