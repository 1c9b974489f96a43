//! librdkafka client settings from the pipeline configuration: consumer and producer
//! properties, secret references (`${env:}`, `${file:}`), the transactional id.

use super::*;

/// Resolves `${env:NAME}` and `${file:/path}` in a Kafka property value.
pub fn resolve_property(value: &str) -> Result<String, String> {
    if let Some(name) = value.strip_prefix("${env:").and_then(|v| v.strip_suffix('}')) {
        return std::env::var(name).map_err(|_| format!("environment variable {name} is not set"));
    }
    if let Some(path) = value.strip_prefix("${file:").and_then(|v| v.strip_suffix('}')) {
        return std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}"));
    }
    Ok(value.to_owned())
}

/// The owner map of the first input topic's partitions, when this worker knows its own query
/// address (see `crate::owners`).
pub fn owners(cfg: &PipelineConfig) -> Result<Option<crate::owners::Owners>, Error> {
    let Some(me) = crate::owners::query_address(&cfg.runtime.http_listen) else { return Ok(None) };
    let (consumer, _) = client_config(cfg)?;
    crate::owners::Owners::new(me, consumer, &cfg.source.group_id, &cfg.source.topics[0])
        .map(Some)
        .map_err(|message| Error::Config { setting: "source".into(), message })
}

pub(super) fn client_config(cfg: &PipelineConfig) -> Result<(ClientConfig, ClientConfig), Error> {
    let invalid = |setting: String| move |message: String| Error::Config { setting, message };
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.source.bootstrap_servers)
        .set("group.id", &cfg.source.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // The broker answers a fetch once 64 KiB are ready or after 5 ms: at moderate rates this
        // turns a fetch per few records into one per 5 ms (12 % less worker CPU and a p99 of
        // 29–44 ms instead of 66–148 ms at 20k events/s, BENCHMARKS.md) for at most 5 ms more.
        .set("fetch.min.bytes", "65536")
        .set("fetch.wait.max.ms", "5")
        // librdkafka stops fetching a partition once this many of its records wait in the local
        // queue, and by default looks again only after 1 s (`fetch.queue.backoff.ms`): a
        // backlogged partition then delivered 20,000 records a second at most, and the worker
        // sat idle three quarters of the time (a pre-loaded 1M-event topic over 6 partitions
        // took 29 s; with a 10 ms backoff 7.7 s, for the same CPU). BENCHMARKS.md.
        .set("queued.min.messages", "20000")
        .set("fetch.queue.backoff.ms", "10")
        // Broker connection states for readiness (`ConsumerCtx::stats_raw`).
        .set("statistics.interval.ms", "1000")
        .set(
            "auto.offset.reset",
            match cfg.source.start_from {
                StartPosition::Latest => "latest",
                _ => "earliest",
            },
        );
    // The query address in the group's description: any worker finds a key's owner
    // (`crate::owners`). A client.id of source.properties wins.
    if let Some(addr) = crate::owners::query_address(&cfg.runtime.http_listen) {
        c.set("client.id", crate::owners::client_id(&addr));
    }
    for (k, v) in &cfg.source.properties {
        c.set(k, resolve_property(v).map_err(invalid(format!("source.properties.{k}")))?);
    }
    let mut p = ClientConfig::new();
    let servers =
        if cfg.sink.bootstrap_servers.is_empty() { &cfg.source.bootstrap_servers } else { &cfg.sink.bootstrap_servers };
    p.set("bootstrap.servers", servers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "1")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        // Bounded memory while the brokers are unreachable: at 256 MiB of unsent records the
        // engine waits (QueueFull) instead of buffering more (librdkafka's default is 1 GiB).
        .set("queue.buffering.max.kbytes", "262144")
        // Explicit, because the engine sizes every record (dead letters truncated, outputs too
        // large dead-lettered) to this limit; `sink.properties` may set another (validated) one.
        .set(
            "message.max.bytes",
            cfg.sink.message_max_bytes().map_err(invalid("sink.properties.message.max.bytes".into()))?.to_string(),
        );
    for (k, v) in &cfg.sink.properties {
        p.set(k, resolve_property(v).map_err(invalid(format!("sink.properties.{k}")))?);
    }
    if cfg.sink.delivery == Delivery::ExactlyOnce {
        let timeout =
            cfg.sink.transaction_timeout_ms().map_err(invalid("sink.properties.transaction.timeout.ms".into()))?;
        // Deliveries give up with the transaction: the worker then stops without committing.
        p.set("transactional.id", transactional_id(&cfg.source.group_id))
            .set("transaction.timeout.ms", timeout.to_string())
            .set("message.timeout.ms", timeout.to_string());
        // Chained pipelines: never read another exactly-once producer's aborted records.
        c.set("isolation.level", "read_committed");
    }
    Ok((c, p))
}

/// The exactly-once producer's `transactional.id`: `<groupId>.<instance>`, where the instance is
/// `STREAMSCORE_POD_NAME` (the operator sets it to the pod's name, which a container restart
/// keeps, so the restarted worker fences and aborts its predecessor's open transaction), else
/// the host name and process id.
pub fn transactional_id(group: &str) -> String {
    let instance = std::env::var("STREAMSCORE_POD_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    format!("{group}.{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_limit_is_the_one_the_engine_sizes_records_for() {
        let yaml = r#"
source: {bootstrapServers: "k:9092", topics: [in], keyField: user, eventTime: {field: ts}}
model: {path: m, sha256: "0000000000000000000000000000000000000000000000000000000000000000", version: v, features: [event.amount], outputs: [{name: s}]}
sink: {topic: out, deadLetterTopic: dlq}
"#;
        let mut cfg = PipelineConfig::from_yaml(yaml).unwrap();
        let (_, p) = client_config(&cfg).unwrap();
        assert_eq!(p.get("message.max.bytes"), Some("1000000"));
        cfg.sink.properties.insert("message.max.bytes".into(), "2000000".into());
        let (_, p) = client_config(&cfg).unwrap();
        assert_eq!(p.get("message.max.bytes"), Some("2000000"));
        cfg.sink.properties.insert("message.max.bytes".into(), "big".into());
        assert!(client_config(&cfg).unwrap_err().to_string().contains("message.max.bytes"));
    }

    #[test]
    fn property_references_resolve_from_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(resolve_property(&format!("${{file:{}}}", f.display())).unwrap(), "s3cret");
        assert_eq!(resolve_property("plain").unwrap(), "plain");
        assert!(resolve_property("${env:STREAMSCORE_SURELY_UNSET_VAR}").unwrap_err().contains("not set"));
    }
}
