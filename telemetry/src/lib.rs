//! Process telemetry shared by every streamscore binary: log setup ([`init_logging`]) and a
//! Prometheus registry that renders the text exposition format ([`MetricsRegistry`]).
//!
//! Logs go to standard output (plain text or one JSON object per line); the level comes from
//! `RUST_LOG` (default `info`). Metrics are registered once, at start, under a prefix
//! (`streamscore_worker`, `streamscore_operator`), and rendered on every scrape.

use std::sync::Mutex;

use prometheus_client::registry::Registry;

/// Log formats a binary accepts (`--log-format`).
pub const LOG_FORMATS: [&str; 2] = ["plain", "json"];

/// Installs the global log subscriber: `format` is `json` (one object per line, for log
/// collectors) or anything else for plain text; the filter is `RUST_LOG`, default `info`.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A registry of metrics under one prefix, rendered as Prometheus text.
#[derive(Debug, Default)]
pub struct MetricsRegistry(Mutex<Registry>);

impl MetricsRegistry {
    /// A registry whose metrics `register` adds, each name prefixed with `prefix_`.
    pub fn new(prefix: &str, register: impl FnOnce(&mut Registry)) -> Self {
        let mut r = Registry::with_prefix(prefix);
        register(&mut r);
        Self(Mutex::new(r))
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn metrics_render_under_their_prefix() {
        let c: Counter = Counter::default();
        let r = MetricsRegistry::new("streamscore_test", |r| r.register("events", "Events seen", c.clone()));
        c.inc_by(3);
        let text = r.encode();
        assert!(text.contains("# HELP streamscore_test_events Events seen."), "{text}");
        assert!(text.contains("streamscore_test_events_total 3"), "{text}");
    }
}
