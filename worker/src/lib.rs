//! streamscore worker: the data plane of one TenantModel.
//!
//! ```text
//!  Kafka input ─► kafka (consume, batch) ─► engine ─► decode/validate ─► features (RocksDB state)
//!                                                  └─► model (tract, micro-batched) ─► postprocess
//!  Kafka output / dead-letter topic ◄── kafka (produce, commit after acks + durable state)
//!  HTTP (http): /healthz /readyz /metrics /v1/entities/{key}
//! ```
//! Modules: [`config`] (load + validate), [`decode`], [`features`], [`state`], [`model`],
//! [`engine`], [`kafka`], [`http`], [`metrics`].

pub mod config;
pub mod decode;
pub mod engine;
pub mod features;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod state;
