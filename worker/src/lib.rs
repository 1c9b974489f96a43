//! streamscore worker: the data plane of one TenantModel.
//!
//! ```text
//!  Kafka input ─► kafka (consume, batch) ─► engine ─► decode/validate ─► lookup (join tables)
//!                                                  ├─► features (RocksDB state)
//!                                                  ├─► model (tract, micro-batched) ─► postprocess
//!                                                  └─► emitted windows, closed by the watermark
//!  state stores ─► checkpoint ─► object store (s3://, gs://, az://, file://) ─► restore on assignment
//!  Kafka output / dead-letter / feature topic ◄── kafka (produce, commit after acks + durable state)
//!  HTTP (http): /healthz /readyz /metrics /v1/entities/{key}
//!  admin HTTP (http, admin): /v1/admin/drain /v1/admin/resume /v1/admin/status (the operator's rescale)
//! ```
//!
//! Layers, bottom-up; a module uses only modules on its own line or below it:
//!
//! ```text
//!  main, http ................... process, HTTP endpoints (health, metrics, entities, admin API)
//!  kafka ........................ consume, produce, commit protocol, rebalances, readiness
//!  owners ....................... who owns each partition (the group's description), query forwarding
//!  admin ........................ drain and cut-over requests shared by http and kafka
//!  engine ....................... per batch: decode → features → model → output records
//!  model, checkpoint ............ tract inference; object-store checkpoints and restore
//!  record ....................... the stored per-key record: its layout and format version
//!  state ........................ RocksDB stores of bytes, write-back cache, snapshots, timers
//!  features, emitted, lookup .... windowed and sequence features; emitted (closed) windows; lookup tables
//!  agg .......................... Scalar, Entry, Agg, FeatureValue
//!  metrics ...................... the Prometheus registry of the worker
//!  decode, watermark ............ record decoding and validation (dead-letter reasons); event time
//!  config, json, codec, fault ... configuration; JSON writing; state bytes; fault injection
//! ```
//! `features`, `emitted`, `agg`, `watermark`, `json` and `codec` are pure logic without I/O.

pub mod admin;
pub mod agg;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod decode;
pub mod emitted;
pub mod engine;
pub mod fault;
pub mod features;
pub mod http;
pub mod json;
pub mod kafka;
pub mod lookup;
pub mod metrics;
pub mod model;
pub mod owners;
pub mod record;
pub mod state;
pub mod watermark;

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

#[cfg(test)]
mod layers {
    use std::collections::HashMap;
    use std::path::Path;

    /// The layer table of this file's documentation: module → height (0: the bottom line).
    fn table() -> HashMap<String, usize> {
        let doc = include_str!("lib.rs");
        let start = doc.find("//! Layers, bottom-up").expect("the layer table");
        let lines: Vec<&str> = doc[start..]
            .lines()
            .skip_while(|l| !l.starts_with("//! ```text"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .collect();
        let mut heights = HashMap::new();
        for (i, line) in lines.iter().rev().enumerate() {
            let names = line.trim_start_matches("//!").split(" ..").next().expect("a module list");
            for name in names.split(',') {
                heights.insert(name.trim().to_owned(), i);
            }
        }
        heights
    }

    /// Module name of a source file: `kafka/commit.rs` → kafka, `engine_tests.rs` → engine.
    fn module_of(path: &Path, src: &Path) -> String {
        let rel = path.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let name = first.trim_end_matches(".rs");
        name.strip_suffix("_tests").unwrap_or(name).to_owned()
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                if !p.ends_with("bin") {
                    sources(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_module_uses_one_above_it_and_every_module_says_what_it_is() {
        let heights = table();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut problems = Vec::new();
        for file in &files {
            let module = module_of(file, &src);
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(file).expect("readable");
            if !text.starts_with("//!") {
                problems.push(format!("{}: does not open with its //! paragraph", file.display()));
            }
            let Some(&own) = heights.get(&module) else {
                problems.push(format!("{module}: not in the layer table of lib.rs"));
                continue;
            };
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                assert!(
                    !code.contains("use crate::{"),
                    "{}:{}: list crate imports one module per line",
                    file.display(),
                    n + 1
                );
                for used in code.split("crate::").skip(1) {
                    let target: String = used.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    match heights.get(&target) {
                        Some(&h) if h > own => problems.push(format!(
                            "{}:{}: {module} uses {target}, a layer above it",
                            file.display(),
                            n + 1
                        )),
                        Some(_) => {}
                        None => {
                            problems.push(format!("{}:{}: {target} is not in the layer table", file.display(), n + 1))
                        }
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
