//! streamscore worker: the data plane of one TenantModel.
//!
//! ```text
//!  Kafka input ─► kafka (consume, batch) ─► engine ─► decode/validate ─► features (RocksDB state)
//!                                                  ├─► model (tract, micro-batched) ─► postprocess
//!                                                  └─► emitted windows, closed by the watermark
//!  state stores ─► checkpoint ─► object store (s3://, gs://, az://, file://) ─► restore on assignment
//!  Kafka output / dead-letter / feature topic ◄── kafka (produce, commit after acks + durable state)
//!  HTTP (http): /healthz /readyz /metrics /v1/entities/{key}
//!  admin HTTP (http, admin): /v1/admin/drain /v1/admin/resume /v1/admin/status (the operator's rescale)
//! ```
//! Modules: [`config`] (load + validate), [`decode`], [`features`], [`emitted`], [`state`],
//! [`checkpoint`] (object-store checkpoints, restore), [`model`], [`engine`], [`kafka`], [`http`],
//! [`admin`] (drain control), [`metrics`].

pub mod admin;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod emitted;
pub mod engine;
pub mod fault;
pub mod features;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod state;

/// mimalloc returns freed memory to the OS after 10 ms by default; the data plane then pays
/// for zeroing fresh (huge) pages again and again (~25% of the engine's time in `perf`,
/// BENCHMARKS.md). Unless `MIMALLOC_PURGE_DELAY` is already set, this re-executes the
/// current program with it set to -1 (keep freed memory for reuse; the resident size stays at
/// its peak, which the state cache bounds). mimalloc reads its options when the process
/// starts, so an environment variable (set here without `unsafe`) is the only way in.
pub fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err =
        std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("MIMALLOC_PURGE_DELAY", "-1").exec();
    // Only reached when exec failed: carry on with the defaults.
    eprintln!("streamscore: could not re-execute with MIMALLOC_PURGE_DELAY=-1: {err}");
}
