//! The local Kafka broker is real: topics, produce and consume through rdkafka, metadata.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use streamscore_tests::{bootstrap, consume, create_topics, produce, producer, unique};

#[tokio::test]
async fn metadata_lists_one_broker() {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(10)).expect("metadata from the local broker");
    assert_eq!(md.brokers().len(), 1, "single-node KRaft cluster");
    assert!(md.brokers()[0].host().starts_with("127.0.0.1"));
}

#[tokio::test]
async fn records_round_trip_through_a_new_topic() {
    let topic = unique("env-roundtrip");
    create_topics(&[&topic], 3).await;
    let p = producer();
    let records: Vec<(String, Vec<u8>)> =
        (0..50).map(|i| (format!("k{}", i % 7), format!("{{\"i\":{i}}}").into_bytes())).collect();
    produce(&p, &topic, &records).await;
    let got = consume(&topic, 50, Duration::from_secs(30));
    assert_eq!(got.len(), 50);
    let mut is: Vec<i64> = got.iter().map(|c| c.json()["i"].as_i64().unwrap()).collect();
    is.sort_unstable();
    assert_eq!(is, (0..50).collect::<Vec<_>>());
    // the same key always lands in the same partition
    for k in 0..7 {
        let parts: std::collections::BTreeSet<i32> =
            got.iter().filter(|c| c.key == format!("k{k}")).map(|c| c.partition).collect();
        assert_eq!(parts.len(), 1, "key k{k} in {parts:?}");
    }
}
