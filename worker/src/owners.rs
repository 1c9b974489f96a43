//! Which worker owns which input partition, from the consumer group itself: each worker's
//! consumer names its query address in its `client.id` (`streamscore-worker@<ip>:<port>`,
//! [`client_id`]), and the group's description (the broker's DescribeGroups: every member's
//! client id and assignment) maps partitions to addresses. So any worker answers a query for
//! any key: it forwards the request to the owner (`crate::http`). No DNS, no API server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The prefix of a worker consumer's `client.id` before its query address.
pub const CLIENT_ID_PREFIX: &str = "streamscore-worker@";

/// How long a group description is used before it is read again.
const FRESH: Duration = Duration::from_secs(2);

/// The `client.id` that advertises `address` (`ip:port` of the query API).
pub fn client_id(address: &str) -> String {
    format!("{CLIENT_ID_PREFIX}{address}")
}

/// The partitions of `topic` in a member's assignment as the broker returns it (Kafka's
/// consumer protocol `ConsumerProtocolAssignment`, versions 0–3: int16 version, then an array of
/// (string topic, array of int32 partitions), then user data, ignored). None when malformed.
pub fn assigned_partitions(bytes: &[u8], topic: &str) -> Option<Vec<i32>> {
    let mut r = Reader(bytes);
    let _version = r.i16()?;
    let topics = r.i32()?;
    let mut out = Vec::new();
    for _ in 0..topics.max(0) {
        let len = usize::try_from(r.i16()?).ok()?;
        let name = r.take(len)?;
        let n = r.i32()?;
        for _ in 0..n.max(0) {
            let p = r.i32()?;
            if name == topic.as_bytes() {
                out.push(p);
            }
        }
    }
    Some(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// This worker's query address (`<pod IP>:<port of runtime.httpListen>`), when the pod's IP is
/// known (`STREAMSCORE_POD_IP`, which the operator sets from the downward API).
pub fn query_address(http_listen: &str) -> Option<String> {
    let ip = std::env::var("STREAMSCORE_POD_IP").ok().filter(|ip| !ip.is_empty())?;
    let port = http_listen.rsplit_once(':')?.1;
    Some(if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") })
}

/// The owner of each partition of the first input topic, read from the group's description.
pub struct Owners {
    /// This worker's own query address.
    pub me: String,
    /// The client forwarded queries go through.
    pub http: reqwest::Client,
    consumer: BaseConsumer,
    group: String,
    topic: String,
    cache: Mutex<Option<(Instant, HashMap<i32, String>)>>,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners").field("group", &self.group).field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl Owners {
    /// A client of the brokers `config` names (the worker's consumer settings, without joining
    /// the group) for `group`'s assignment of `topic`.
    pub fn new(me: String, mut config: ClientConfig, group: &str, topic: &str) -> Result<Self, String> {
        config.set("client.id", "streamscore-worker-owners");
        let consumer: BaseConsumer = config.create().map_err(|e| format!("creating the owners client: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("creating the query forwarding client: {e}"))?;
        Ok(Self { me, http, consumer, group: group.to_owned(), topic: topic.to_owned(), cache: Mutex::new(None) })
    }

    /// The query address of the worker that owns `partition` (None: no member owns it now, e
    /// g. during a rebalance, or the group cannot be described). Blocking (a broker request when
    /// the last description is older than 2 s or lacks the partition).
    pub fn owner(&self, partition: i32) -> Option<String> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, map)) = cache.as_ref() {
            if at.elapsed() < FRESH {
                return map.get(&partition).cloned();
            }
        }
        let map = self.describe()?;
        let owner = map.get(&partition).cloned();
        *cache = Some((Instant::now(), map));
        owner
    }

    /// Forgets the last description (its owner answered that it no longer owns a partition).
    pub fn forget(&self) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn describe(&self) -> Option<HashMap<i32, String>> {
        let list = self.consumer.fetch_group_list(Some(&self.group), Duration::from_secs(2)).ok()?;
        let group = list.groups().iter().find(|g| g.name() == self.group)?;
        let mut map = HashMap::new();
        for m in group.members() {
            let Some(address) = m.client_id().strip_prefix(CLIENT_ID_PREFIX) else { continue };
            for p in m.assignment().and_then(|a| assigned_partitions(a, &self.topic)).unwrap_or_default() {
                map.insert(p, address.to_owned());
            }
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut b = vec![0, 1];
        b.extend((topics.len() as i32).to_be_bytes());
        for (t, ps) in topics {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
            b.extend((ps.len() as i32).to_be_bytes());
            for p in *ps {
                b.extend(p.to_be_bytes());
            }
        }
        b.extend((-1i32).to_be_bytes()); // no user data
        b
    }

    #[test]
    fn an_assignment_lists_the_topics_partitions() {
        let a = assignment(&[("tx", &[0, 3]), ("other", &[1]), ("tx2", &[5])]);
        assert_eq!(assigned_partitions(&a, "tx"), Some(vec![0, 3]));
        assert_eq!(assigned_partitions(&a, "other"), Some(vec![1]));
        assert_eq!(assigned_partitions(&a, "missing"), Some(vec![]));
        assert_eq!(assigned_partitions(&a[..a.len() - 9], "tx"), None, "truncated");
        assert_eq!(assigned_partitions(&assignment(&[]), "tx"), Some(vec![]));
    }

    #[test]
    fn the_client_id_carries_the_address() {
        assert_eq!(client_id("10.0.0.7:8080").strip_prefix(CLIENT_ID_PREFIX), Some("10.0.0.7:8080"));
    }
}
