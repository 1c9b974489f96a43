//! streamscore worker: the data plane of one TenantModel.
//!
//! ```text
//!  Kafka input ─► kafka (consume, batch) ─► engine ─► decode/validate ─► features (RocksDB state)
//!                                                  ├─► model (tract, micro-batched) ─► postprocess
//!                                                  └─► emitted windows, closed by the watermark
//!  Kafka output / dead-letter / feature topic ◄── kafka (produce, commit after acks + durable state)
//!  HTTP (http): /healthz /readyz /metrics /v1/entities/{key}
//! ```
//! Modules: [`config`] (load + validate), [`decode`], [`features`], [`emitted`], [`state`], [`model`],
//! [`engine`], [`kafka`], [`http`], [`metrics`].

pub mod config;
pub mod decode;
pub mod emitted;
pub mod engine;
pub mod features;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod state;
