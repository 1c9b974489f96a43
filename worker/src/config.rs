//! Loading the pipeline configuration: the file the operator mounts, then environment
//! overrides for local runs, then validation (every problem, each naming its field).

use std::path::Path;

use streamscore_crds::pipeline::{ConfigError, PipelineConfig};

/// Environment variables that override file settings (for local runs and tests).
pub const OVERRIDES: [(&str, &str); 5] = [
    ("STREAMSCORE_BOOTSTRAP_SERVERS", "source.bootstrapServers (and sink.bootstrapServers)"),
    ("STREAMSCORE_GROUP_ID", "source.groupId"),
    ("STREAMSCORE_STATE_DIR", "runtime.stateDir"),
    ("STREAMSCORE_HTTP_LISTEN", "runtime.httpListen"),
    ("STREAMSCORE_MODEL_PATH", "model.path"),
];

/// Reads, overrides and validates the pipeline file.
pub fn load(path: &Path) -> Result<PipelineConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read pipeline file {}: {e}", path.display()))?;
    let mut cfg = PipelineConfig::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    apply_overrides(&mut cfg, |k| std::env::var(k).ok());
    cfg.validate().map_err(|errs| format_errors(path, &errs))?;
    Ok(cfg)
}

/// Applies overrides from `get` (the environment in production).
pub fn apply_overrides(cfg: &mut PipelineConfig, get: impl Fn(&str) -> Option<String>) {
    if let Some(v) = get("STREAMSCORE_BOOTSTRAP_SERVERS") {
        cfg.source.bootstrap_servers.clone_from(&v);
        cfg.sink.bootstrap_servers = v;
    }
    if let Some(v) = get("STREAMSCORE_GROUP_ID") {
        cfg.source.group_id = v;
    }
    if let Some(v) = get("STREAMSCORE_STATE_DIR") {
        cfg.runtime.state_dir = v;
    }
    if let Some(v) = get("STREAMSCORE_HTTP_LISTEN") {
        cfg.runtime.http_listen = v;
    }
    if let Some(v) = get("STREAMSCORE_MODEL_PATH") {
        cfg.model.path = v;
    }
    if cfg.source.group_id.is_empty() {
        cfg.source.group_id = "streamscore".into();
    }
}

fn format_errors(path: &Path, errs: &[ConfigError]) -> String {
    let mut s = format!("invalid pipeline file {} ({} problems):", path.display(), errs.len());
    for e in errs {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    s
}
