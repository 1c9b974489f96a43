//! The ONNX model: loaded once, checked (digest, a probe inference), run in micro-batches.
//!
//! ```text
//!  file ──► sha256 == spec? ──► tract: parse, fix input [batch, features], optimise ──► probe
//!  feature rows (≤ batch) ──► zero-padded [b, features] tensor ──► outputs ──► named scores
//! ```
//! One plan is optimised per batch size b in 1, 4, 16, 64, … up to `batch.maxSize`; a batch of
//! n rows runs on the smallest b ≥ n, so a small batch (low input rate) does not pay for a
//! full-size inference.
//! ```text
//! ```
//! A model that fails any step is a [`ModelError`]: the worker stays not ready with that
//! reason and consumes nothing.

use std::path::Path;

use sha2::{Digest, Sha256};
use streamscore_crds::pipeline::{ModelConfig, OutputMapping};
use tract_onnx::prelude::*;

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file is larger than [`MAX_MODEL_BYTES`].
    #[error("model file {path} has {bytes} bytes, more than the limit of {MAX_MODEL_BYTES}")]
    TooLarge {
        /// Path.
        path: String,
        /// Its size.
        bytes: u64,
    },
    /// The file could not be read.
    #[error("cannot read model file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The digest differs from the spec.
    #[error("model digest mismatch: expected sha256 {expected}, file has {actual}")]
    DigestMismatch {
        /// From the spec.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// tract could not load or optimise the model.
    #[error("model does not load: {0}")]
    Load(String),
    /// The probe inference failed or produced unusable output.
    #[error("model probe inference failed: {0}")]
    Probe(String),
    /// Inference failed on a batch.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl ModelError {
    /// Low-cardinality kind, for metrics and readiness reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelError::Read { .. } => "ModelUnreadable",
            ModelError::TooLarge { .. } => "ModelTooLarge",
            ModelError::DigestMismatch { .. } => "ModelDigestMismatch",
            ModelError::Load(_) => "ModelInvalid",
            ModelError::Probe(_) => "ModelProbeFailed",
            ModelError::Inference(_) => "InferenceFailed",
        }
    }
}

type Plan = std::sync::Arc<TypedRunnableModel>;

/// A loaded, checked model.
#[derive(Debug)]
pub struct Model {
    /// (batch size, plan), ascending; the last one has `batch` rows.
    plans: Vec<(usize, Plan)>,
    batch: usize,
    width: usize,
    outputs: Vec<OutputMapping>,
    version: String,
}

/// The largest model file a worker reads (1 GiB): a bigger one is refused before it is read.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `path` (`model.path`) names an object in an object store (`s3://`, `gs://`, `az://`)
/// rather than a file of the worker.
pub fn is_remote(path: &str) -> bool {
    ["s3://", "gs://", "az://"].iter().any(|s| path.starts_with(s))
}

/// Downloads the model at `cfg.path` (an object-store URI) into `dir` as `model-<sha256>.onnx`
/// and verifies its digest before anything uses it; returns the local path. A file already
/// there with the right digest is used as is. Credentials as for checkpoints: the environment,
/// then the files of `credentials_dir`.
pub fn fetch(cfg: &ModelConfig, credentials_dir: Option<&str>, dir: &Path) -> Result<std::path::PathBuf, String> {
    let dest = dir.join(format!("model-{}.onnx", cfg.sha256));
    if std::fs::read(&dest).is_ok_and(|b| sha256_hex(&b) == cfg.sha256) {
        return Ok(dest);
    }
    let (parent, name) = cfg.path.rsplit_once('/').ok_or_else(|| format!("{}: not an object URI", cfg.path))?;
    let settings = match credentials_dir {
        Some(d) => crate::checkpoint::read_credentials(Path::new(d)).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let store = crate::checkpoint::ObjectCheckpoints::open_with(parent, &settings).map_err(|e| e.to_string())?;
    let bytes = store.fetch(name, MAX_MODEL_BYTES).map_err(|e| e.to_string())?;
    let actual = sha256_hex(&bytes);
    if actual != cfg.sha256 {
        return Err(format!("{}: sha256 {actual} does not match model.sha256 {}", cfg.path, cfg.sha256));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".model-{}.part", cfg.sha256));
    std::fs::write(&tmp, &bytes).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).map_err(|e| format!("writing {}: {e}", dest.display()))?;
    Ok(dest)
}

impl Model {
    /// Reads, verifies and loads the model described by `cfg`.
    pub fn load(cfg: &ModelConfig) -> Result<Self, ModelError> {
        let path = cfg.path.strip_prefix("file://").unwrap_or(&cfg.path);
        let read_err = |source| ModelError::Read { path: path.into(), source };
        let len = std::fs::metadata(Path::new(path)).map_err(read_err)?.len();
        if len > MAX_MODEL_BYTES {
            return Err(ModelError::TooLarge { path: path.into(), bytes: len });
        }
        let bytes = std::fs::read(Path::new(path)).map_err(read_err)?;
        Self::from_bytes(&bytes, cfg)
    }

    /// Verifies and loads a model from its bytes. A panic inside tract (a model that trips an
    /// internal assertion) is a [`ModelError::Load`] like any other unusable model: the worker
    /// stays not ready with the reason instead of crash-looping.
    pub fn from_bytes(bytes: &[u8], cfg: &ModelConfig) -> Result<Self, ModelError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::build(bytes, cfg)))
            .unwrap_or_else(|p| Err(ModelError::Load(format!("the ONNX runtime panicked: {}", panic_message(&*p)))))
    }

    fn build(bytes: &[u8], cfg: &ModelConfig) -> Result<Self, ModelError> {
        let actual = sha256_hex(bytes);
        if actual != cfg.sha256 {
            return Err(ModelError::DigestMismatch { expected: cfg.sha256.clone(), actual });
        }
        let sig = &cfg.signature;
        let batch = sig.batch.max_size.max(1) as usize;
        let width = sig.features.len();
        let load = |e: TractError| ModelError::Load(format!("{e:#}"));
        let model = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(bytes)).map_err(load)?;
        let input_ix = if sig.input_name.is_empty() {
            0
        } else {
            model
                .input_outlets()
                .map_err(load)?
                .iter()
                .position(|o| model.node(o.node).name == sig.input_name)
                .ok_or_else(|| ModelError::Load(format!("the model has no input named {:?}", sig.input_name)))?
        };
        let n_outputs = model.output_outlets().map_err(load)?.len();
        for o in &sig.outputs {
            if o.output as usize >= n_outputs {
                return Err(ModelError::Load(format!(
                    "output {:?} refers to output #{} but the model has {n_outputs}",
                    o.name, o.output
                )));
            }
        }
        let mut sizes: Vec<usize> =
            std::iter::successors(Some(1usize), |b| Some(b * 4)).take_while(|b| *b < batch).collect();
        sizes.push(batch);
        let mut plans = Vec::with_capacity(sizes.len());
        for b in sizes {
            let m = model.clone().with_input_fact(input_ix, f32::fact([b, width]).into()).map_err(load)?;
            plans.push((b, m.into_optimized().map_err(load)?.into_runnable().map_err(load)?));
        }
        let m = Self { plans, batch, width, outputs: sig.outputs.clone(), version: cfg.version.clone() };
        let probe = m.score(&[vec![0.0; width]]).map_err(|e| ModelError::Probe(e.to_string()))?;
        if probe.len() != 1 || probe[0].iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Probe(format!("probe produced {probe:?}")));
        }
        Ok(m)
    }

    /// Version label.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Largest batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Score names in output order.
    pub fn score_names(&self) -> impl Iterator<Item = &str> {
        self.outputs.iter().map(|o| o.name.as_str())
    }

    /// Scores `rows` (each of the model's input width), in chunks of the batch size.
    /// Returns one score vector (in `outputs` order) per row.
    pub fn score(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<f64>>, ModelError> {
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.batch) {
            let (size, plan) = self
                .plans
                .iter()
                .find(|(b, _)| *b >= chunk.len())
                .ok_or_else(|| ModelError::Inference("no plan for the batch size".into()))?;
            let mut data = vec![0f32; size * self.width];
            for (i, r) in chunk.iter().enumerate() {
                if r.len() != self.width {
                    return Err(ModelError::Inference(format!(
                        "row has {} values, model takes {}",
                        r.len(),
                        self.width
                    )));
                }
                data[i * self.width..(i + 1) * self.width].copy_from_slice(r);
            }
            let input =
                Tensor::from_shape(&[*size, self.width], &data).map_err(|e| ModelError::Inference(e.to_string()))?;
            // A panic inside tract on some input fails this batch (its records are dead-lettered
            // with reason scoring_failed), not the worker.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(tvec!(input.into()))))
                .map_err(|p| ModelError::Inference(format!("the ONNX runtime panicked: {}", panic_message(&*p))))?
                .map_err(|e| ModelError::Inference(format!("{e:#}")))?;
            // Each mapped output as (row-major values, columns per row).
            let views: Vec<(Vec<f32>, usize)> = self
                .outputs
                .iter()
                .map(|o| {
                    let t =
                        result[o.output as usize].cast_to::<f32>().map_err(|e| ModelError::Inference(e.to_string()))?;
                    let shape = t.shape();
                    let cols = if shape.len() >= 2 { shape[1] } else { 1 };
                    let values = t
                        .to_plain_array_view::<f32>()
                        .map_err(|e| ModelError::Inference(e.to_string()))?
                        .iter()
                        .copied()
                        .collect();
                    Ok((values, cols))
                })
                .collect::<Result<_, ModelError>>()?;
            for i in 0..chunk.len() {
                let mut scores = Vec::with_capacity(self.outputs.len());
                for (o, (values, cols)) in self.outputs.iter().zip(&views) {
                    let col = o.column as usize;
                    if col >= *cols {
                        return Err(ModelError::Inference(format!(
                            "score {:?} reads column {col} but output #{} has {cols}",
                            o.name, o.output
                        )));
                    }
                    let v = values
                        .get(i * cols + col)
                        .copied()
                        .ok_or_else(|| ModelError::Inference(format!("output #{} has too few rows", o.output)))?;
                    scores.push(f64::from(v));
                }
                out.push(scores);
            }
        }
        Ok(out)
    }
}
