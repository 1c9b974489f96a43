//! The ONNX model: loaded once, checked (digest, a probe inference), run in micro-batches, on
//! one of two runtimes (`model.runtime`).
//!
//! ```text
//!  file ──► sha256 == spec? ──► runtime: tract | onnxruntime | auto (tree ensembles → onnxruntime)
//!     tract:       parse, fix input [b, features] per batch size b, optimise ──┐
//!     onnxruntime: one session (1 intra-op thread), dynamic batch ─────────────┴─► probe
//!  feature rows (≤ batch) ──► [n, features] f32 tensor ──► outputs ──► named scores
//! ```
//! tract: one plan is optimised per batch size b in 1, 4, 16, 64, … up to `batch.maxSize`; a
//! batch of n rows runs on the smallest b ≥ n (zero-padded), so a small batch (low input rate)
//! does not pay for a full-size inference. ONNX Runtime takes any n as it is.
//!
//! ONNX Runtime is not linked: it is loaded once per process from the shared library that
//! `ORT_DYLIB_PATH` names (the worker image carries `libonnxruntime.so.<version>`).
//!
//! A model that fails any step is a [`ModelError`]: the worker stays not ready with that
//! reason and consumes nothing.

use std::path::Path;

use std::sync::{Mutex, OnceLock};

use ort::value::{TensorElementType, ValueType};
use sha2::{Digest, Sha256};
use streamscore_crds::pipeline::{ModelConfig, ModelRuntime, OutputMapping};
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
    /// The runtime could not load or optimise the model.
    #[error("model does not load: {0}")]
    Load(String),
    /// `model.runtime` resolved to ONNX Runtime and its shared library cannot be loaded.
    #[error("ONNX Runtime is not available: {0}")]
    RuntimeUnavailable(String),
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
            ModelError::RuntimeUnavailable(_) => "ModelRuntimeUnavailable",
            ModelError::Probe(_) => "ModelProbeFailed",
            ModelError::Inference(_) => "InferenceFailed",
        }
    }
}

type Plan = std::sync::Arc<TypedRunnableModel>;

/// The environment variable naming ONNX Runtime's shared library (the versioned file, e.g.
/// `/usr/lib/streamscore/libonnxruntime.so.1.32.0`).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// What runs the model.
enum Backend {
    /// (batch size, plan), ascending; the last one has `batch` rows.
    Tract(Vec<(usize, Plan)>),
    /// One ONNX Runtime session. `run` takes the session mutably; only the processing thread
    /// scores, so the lock is never contended.
    Onnxruntime {
        session: Mutex<ort::session::Session>,
        /// Input name.
        input: String,
        /// A batch dimension fixed by the model (rows are padded to it), if any.
        fixed_rows: Option<usize>,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Tract(plans) => write!(f, "Tract({} plans)", plans.len()),
            Backend::Onnxruntime { input, .. } => write!(f, "Onnxruntime({input})"),
        }
    }
}

/// A loaded, checked model.
#[derive(Debug)]
pub struct Model {
    backend: Backend,
    batch: usize,
    width: usize,
    outputs: Vec<OutputMapping>,
    version: String,
}

/// The operators that make `model.runtime: auto` choose ONNX Runtime: the `ai.onnx.ml` tree
/// ensembles, which tract does not run.
const TREE_OPERATORS: [&str; 3] = ["TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"];

/// The runtime that runs `bytes` under `model.runtime: requested` (`auto` resolved; the others
/// as they are).
pub fn resolve_runtime(bytes: &[u8], requested: ModelRuntime) -> Result<ModelRuntime, ModelError> {
    if requested != ModelRuntime::Auto {
        return Ok(requested);
    }
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| ModelError::Load(format!("{e:#}")))?;
    let trees = proto.graph.iter().flat_map(|g| &g.node).any(|n| TREE_OPERATORS.contains(&n.op_type.as_str()));
    Ok(if trees { ModelRuntime::Onnxruntime } else { ModelRuntime::Tract })
}

/// The process's ONNX Runtime environment: the library named by [`ORT_DYLIB_ENV`], loaded on first
/// use. A failure is kept: the library does not appear without a restart.
fn ort_environment() -> Result<&'static ort::environment::Environment, ModelError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var_os(ORT_DYLIB_ENV).filter(|p| !p.is_empty()).ok_or_else(|| {
            format!(
                "{ORT_DYLIB_ENV} is not set; it must name ONNX Runtime's shared library \
                 (libonnxruntime.so.<version>, which the worker image carries)"
            )
        })?;
        let shown = std::path::Path::new(&path).display().to_string();
        if !std::path::Path::new(&path).is_file() {
            return Err(format!("{ORT_DYLIB_ENV}={shown}: no such file"));
        }
        let env = ort::init_from(&path)
            .map_err(|e| format!("cannot load {shown}: {e}"))?
            .with_name("streamscore")
            .build()
            .map_err(|e| format!("cannot create an ONNX Runtime environment from {shown}: {e}"))?;
        // ONNX Runtime's own log (through `tracing`, target `ort`): warnings and errors only; its
        // info level describes every arena allocation.
        env.set_log_level(ort::logging::LogLevel::Warning);
        Ok(env)
    })
    .as_ref()
    .map_err(|e| ModelError::RuntimeUnavailable(e.clone()))
}

/// Whether an ONNX Runtime output of this type can be read as scores.
fn numeric_tensor(t: &ValueType) -> bool {
    matches!(
        t,
        ValueType::Tensor {
            ty: TensorElementType::Float32
                | TensorElementType::Float64
                | TensorElementType::Int64
                | TensorElementType::Int32,
            ..
        }
    )
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
        let backend = match resolve_runtime(bytes, sig.runtime)? {
            ModelRuntime::Onnxruntime => Self::onnxruntime(bytes, cfg, width)?,
            _ => Self::tract(bytes, cfg, batch, width)?,
        };
        let m = Self { backend, batch, width, outputs: sig.outputs.clone(), version: cfg.version.clone() };
        let probe = m.score(&[vec![0.0; width]]).map_err(|e| ModelError::Probe(e.to_string()))?;
        if probe.len() != 1 || probe[0].iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Probe(format!("probe produced {probe:?}")));
        }
        Ok(m)
    }

    /// Checks that every score mapping names one of the model's `n_outputs` outputs.
    fn check_output_indices(cfg: &ModelConfig, n_outputs: usize) -> Result<(), ModelError> {
        for o in &cfg.signature.outputs {
            if o.output as usize >= n_outputs {
                return Err(ModelError::Load(format!(
                    "output {:?} refers to output #{} but the model has {n_outputs}",
                    o.name, o.output
                )));
            }
        }
        Ok(())
    }

    fn tract(bytes: &[u8], cfg: &ModelConfig, batch: usize, width: usize) -> Result<Backend, ModelError> {
        let sig = &cfg.signature;
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
        Self::check_output_indices(cfg, model.output_outlets().map_err(load)?.len())?;
        let mut sizes: Vec<usize> =
            std::iter::successors(Some(1usize), |b| Some(b * 4)).take_while(|b| *b < batch).collect();
        sizes.push(batch);
        let mut plans = Vec::with_capacity(sizes.len());
        for b in sizes {
            let m = model.clone().with_input_fact(input_ix, f32::fact([b, width]).into()).map_err(load)?;
            plans.push((b, m.into_optimized().map_err(load)?.into_runnable().map_err(load)?));
        }
        Ok(Backend::Tract(plans))
    }

    fn onnxruntime(bytes: &[u8], cfg: &ModelConfig, width: usize) -> Result<Backend, ModelError> {
        use ort::session::builder::GraphOptimizationLevel;
        let sig = &cfg.signature;
        let env = ort_environment()?;
        let load = |e: String| ModelError::Load(e);
        let session = (|| -> Result<ort::session::Session, String> {
            let e = |e: ort::Error<_>| e.to_string();
            ort::session::Session::builder(env)
                .map_err(|e| e.to_string())?
                .with_intra_threads(1)
                .map_err(e)?
                .with_inter_threads(1)
                .map_err(e)?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(e)?
                // Converters declare shapes loosely (LightGBM's label as [1]); ONNX Runtime
                // would warn about it on every batch.
                .with_log_level(ort::logging::LogLevel::Error)
                .map_err(e)?
                .commit_from_memory(bytes)
                .map_err(|e| e.to_string())
        })()
        .map_err(load)?;
        let input = if sig.input_name.is_empty() {
            session.inputs().first().ok_or_else(|| load("the model has no input".into()))?
        } else {
            session
                .inputs()
                .iter()
                .find(|i| i.name() == sig.input_name)
                .ok_or_else(|| load(format!("the model has no input named {:?}", sig.input_name)))?
        };
        if session.inputs().len() > 1 {
            return Err(load(format!(
                "the model has {} inputs; streamscore feeds one float32 [N, features] tensor",
                session.inputs().len()
            )));
        }
        let fixed_rows = match input.dtype() {
            ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } if shape.len() == 2 => {
                if shape[1] > 0 && shape[1] as usize != width {
                    return Err(load(format!(
                        "input {:?} takes {} features but model.features lists {width}",
                        input.name(),
                        shape[1]
                    )));
                }
                (shape[0] > 0).then_some(shape[0] as usize)
            }
            t => {
                return Err(load(format!(
                    "input {:?} is {t}; streamscore feeds a float32 [N, {width}] tensor",
                    input.name()
                )))
            }
        };
        let input = input.name().to_owned();
        Self::check_output_indices(cfg, session.outputs().len())?;
        for o in &sig.outputs {
            let out = &session.outputs()[o.output as usize];
            if !numeric_tensor(out.dtype()) {
                return Err(load(format!(
                    "score {:?} reads output #{} ({:?}), which is {}, not a numeric tensor (a classifier \
                     converted with ZipMap outputs a sequence of maps: convert it without, e.g. skl2onnx \
                     options={{'zipmap': False}} or onnxmltools zipmap=False)",
                    o.name,
                    o.output,
                    out.name(),
                    out.dtype()
                )));
            }
        }
        Ok(Backend::Onnxruntime { session: Mutex::new(session), input, fixed_rows })
    }

    /// The runtime that runs this model (`auto` resolved).
    pub fn runtime(&self) -> ModelRuntime {
        match self.backend {
            Backend::Tract(_) => ModelRuntime::Tract,
            Backend::Onnxruntime { .. } => ModelRuntime::Onnxruntime,
        }
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
        let chunk_rows = match &self.backend {
            Backend::Onnxruntime { fixed_rows: Some(f), .. } => self.batch.min(*f),
            _ => self.batch,
        };
        for chunk in rows.chunks(chunk_rows) {
            if let Some(r) = chunk.iter().find(|r| r.len() != self.width) {
                return Err(ModelError::Inference(format!("row has {} values, model takes {}", r.len(), self.width)));
            }
            let views = match &self.backend {
                Backend::Tract(plans) => self.run_tract(plans, chunk)?,
                Backend::Onnxruntime { session, input, fixed_rows } => {
                    self.run_onnxruntime(session, input, fixed_rows.unwrap_or(chunk.len()), chunk)?
                }
            };
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
                    scores.push(v);
                }
                out.push(scores);
            }
        }
        Ok(out)
    }

    /// `chunk` as a row-major `[rows, width]` buffer, zero-padded to `rows`.
    fn input_data(&self, chunk: &[Vec<f32>], rows: usize) -> Vec<f32> {
        let mut data = vec![0f32; rows * self.width];
        for (dst, r) in data.chunks_exact_mut(self.width).zip(chunk) {
            dst.copy_from_slice(r);
        }
        data
    }

    /// Runs one chunk on tract. Each mapped output as (row-major values, columns per row).
    fn run_tract(&self, plans: &[(usize, Plan)], chunk: &[Vec<f32>]) -> Result<Vec<(Vec<f64>, usize)>, ModelError> {
        let (size, plan) = plans
            .iter()
            .find(|(b, _)| *b >= chunk.len())
            .ok_or_else(|| ModelError::Inference("no plan for the batch size".into()))?;
        let data = self.input_data(chunk, *size);
        let input =
            Tensor::from_shape(&[*size, self.width], &data).map_err(|e| ModelError::Inference(e.to_string()))?;
        // A panic inside tract on some input fails this batch (its records are dead-lettered
        // with reason scoring_failed), not the worker.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(tvec!(input.into()))))
            .map_err(|p| ModelError::Inference(format!("the ONNX runtime panicked: {}", panic_message(&*p))))?
            .map_err(|e| ModelError::Inference(format!("{e:#}")))?;
        self.outputs
            .iter()
            .map(|o| {
                let t = result[o.output as usize].cast_to::<f32>().map_err(|e| ModelError::Inference(e.to_string()))?;
                let shape = t.shape();
                let cols = if shape.len() >= 2 { shape[1] } else { 1 };
                let values = t
                    .to_plain_array_view::<f32>()
                    .map_err(|e| ModelError::Inference(e.to_string()))?
                    .iter()
                    .map(|v| f64::from(*v))
                    .collect();
                Ok((values, cols))
            })
            .collect()
    }

    /// Runs one chunk on ONNX Runtime, padded to `rows`. Each mapped output as (row-major values,
    /// columns per row).
    fn run_onnxruntime(
        &self,
        session: &Mutex<ort::session::Session>,
        input: &str,
        rows: usize,
        chunk: &[Vec<f32>],
    ) -> Result<Vec<(Vec<f64>, usize)>, ModelError> {
        let inference = |e: ort::Error| ModelError::Inference(e.to_string());
        let tensor =
            ort::value::Tensor::from_array(([rows, self.width], self.input_data(chunk, rows))).map_err(inference)?;
        let mut session = session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = session.run(ort::inputs![input => tensor]).map_err(inference)?;
        self.outputs
            .iter()
            .map(|o| {
                let v = &result[o.output as usize];
                let (shape, values): (Vec<i64>, Vec<f64>) = match v.dtype() {
                    ValueType::Tensor { ty: TensorElementType::Float32, .. } => {
                        let (s, d) = v.try_extract_tensor::<f32>().map_err(inference)?;
                        (s.to_vec(), d.iter().map(|x| f64::from(*x)).collect())
                    }
                    ValueType::Tensor { ty: TensorElementType::Float64, .. } => {
                        let (s, d) = v.try_extract_tensor::<f64>().map_err(inference)?;
                        (s.to_vec(), d.to_vec())
                    }
                    ValueType::Tensor { ty: TensorElementType::Int64, .. } => {
                        let (s, d) = v.try_extract_tensor::<i64>().map_err(inference)?;
                        (s.to_vec(), d.iter().map(|x| *x as f64).collect())
                    }
                    ValueType::Tensor { ty: TensorElementType::Int32, .. } => {
                        let (s, d) = v.try_extract_tensor::<i32>().map_err(inference)?;
                        (s.to_vec(), d.iter().map(|x| f64::from(*x)).collect())
                    }
                    t => return Err(ModelError::Inference(format!("output #{} is {t}", o.output))),
                };
                let cols = if shape.len() >= 2 { shape[1].max(0) as usize } else { 1 };
                Ok((values, cols))
            })
            .collect()
    }
}
