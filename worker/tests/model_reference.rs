//! Both runtimes' scores equal the reference scores computed by the training script
//! (`models/make_models.py`: numpy for the networks, the training library's own `predict_proba`
//! for the tree ensembles) within 1e-5 at several batch sizes, and bad models are refused with a
//! reason. The ONNX Runtime tests load the library that `ORT_DYLIB_PATH` names (`make test`
//! fetches it and sets it).

use streamscore_crds::pipeline::{BatchConfig, ModelConfig, ModelRuntime, ModelSignature, OutputMapping};
use streamscore_worker::model::{Model, ModelError, ORT_DYLIB_ENV};

fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn config(name: &str, sha: &str, batch: u32) -> ModelConfig {
    ModelConfig {
        path: models_dir().join(format!("{name}.onnx")).display().to_string(),
        sha256: sha.into(),
        version: "ref".into(),
        signature: ModelSignature {
            input_name: String::new(),
            features: vec!["tx_1h".into(), "amount_24h".into(), "rides_1h".into(), "event.amount".into()],
            outputs: vec![OutputMapping { name: "score".into(), output: 0, column: 0 }],
            batch: BatchConfig { max_size: batch, ..BatchConfig::default() },
            runtime: ModelRuntime::Tract,
        },
    }
}

/// The reference file of `name`: (sha256, input rows, expected scores).
fn reference(name: &str) -> (String, Vec<Vec<f32>>, Vec<f64>) {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models_dir().join(format!("{name}.reference.json"))).unwrap()).unwrap();
    let inputs: Vec<Vec<f32>> = reference["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let want: Vec<f64> = reference["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(inputs.len(), want.len());
    (reference["sha256"].as_str().unwrap().to_owned(), inputs, want)
}

/// Scores `cfg`'s model at each batch size (smaller and larger than the input set: chunking and
/// padding) and checks every score against `want` within 1e-5.
fn check_scores(cfg: &ModelConfig, inputs: &[Vec<f32>], want: &[f64], runtime: ModelRuntime, batches: &[u32]) {
    for &batch in batches {
        let mut cfg = cfg.clone();
        cfg.signature.batch.max_size = batch;
        let m = Model::load(&cfg).unwrap_or_else(|e| panic!("{} ({runtime:?}): {e}", cfg.path));
        assert_eq!(m.runtime(), runtime, "{}", cfg.path);
        let got = m.score(inputs).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g[0] - w).abs() < 1e-5, "{} on {runtime:?}, batch {batch}, row {i}: {} vs {w}", cfg.path, g[0]);
        }
    }
}

fn require_onnxruntime() {
    assert!(
        std::env::var_os(ORT_DYLIB_ENV).is_some(),
        "{ORT_DYLIB_ENV} must name ONNX Runtime's shared library for these tests: run them through \
         `make test`, or set it to the file scripts/lib.sh's onnxruntime_lib prints"
    );
}

#[test]
fn scores_match_the_training_scripts_reference() {
    for name in ["fraud-logreg", "fraud-mlp", "nan-score"] {
        let (sha, inputs, want) = reference(name);
        check_scores(&config(name, &sha, 1), &inputs, &want, ModelRuntime::Tract, &[1, 4, 64]);
    }
}

/// The networks on ONNX Runtime, and `auto` keeping them on tract.
#[test]
fn networks_score_the_same_on_onnxruntime_and_auto_keeps_them_on_tract() {
    require_onnxruntime();
    for name in ["fraud-logreg", "fraud-mlp", "nan-score"] {
        let (sha, inputs, want) = reference(name);
        let mut cfg = config(name, &sha, 1);
        cfg.signature.runtime = ModelRuntime::Onnxruntime;
        check_scores(&cfg, &inputs, &want, ModelRuntime::Onnxruntime, &[1, 4, 64]);
        cfg.signature.runtime = ModelRuntime::Auto;
        check_scores(&cfg, &inputs, &want, ModelRuntime::Tract, &[4]);
    }
}

/// Gradient-boosted trees from scikit-learn, LightGBM and XGBoost, converted by their own
/// converters: ONNX Runtime's scores equal the training library's predict_proba, `auto` picks
/// ONNX Runtime for them; tract refuses two of them with a reason.
#[test]
fn tree_ensembles_score_like_their_training_libraries_on_onnxruntime() {
    require_onnxruntime();
    for name in ["fraud-gbt-sklearn", "fraud-lgbm", "fraud-xgb"] {
        let (sha, inputs, want) = reference(name);
        assert!(inputs.len() > 200, "{name}: the reference holds the held-out rows");
        let mut cfg = config(name, &sha, 1);
        // Output #1 is the probabilities [N, 2]; column 1 is P(fraud).
        cfg.signature.outputs = vec![OutputMapping { name: "score".into(), output: 1, column: 1 }];
        cfg.signature.runtime = ModelRuntime::Onnxruntime;
        check_scores(&cfg, &inputs, &want, ModelRuntime::Onnxruntime, &[1, 7, 64, 512]);
        cfg.signature.runtime = ModelRuntime::Auto;
        check_scores(&cfg, &inputs, &want, ModelRuntime::Onnxruntime, &[64]);
        // The label output (#0, int64 [N]) reads as a score too: 1 exactly where P(fraud) > 0.5.
        cfg.signature.outputs.push(OutputMapping { name: "label".into(), output: 0, column: 0 });
        let m = Model::load(&cfg).unwrap();
        for (row, w) in m.score(&inputs).unwrap().iter().zip(&want) {
            assert_eq!(row[1], if *w > 0.5 { 1.0 } else { 0.0 }, "{name}: {row:?} vs {w}");
        }
        // tract loads LightGBM's ensemble (single base value) and scores it the same, but not the
        // binary classifiers of scikit-learn and XGBoost (two base values).
        cfg.signature.runtime = ModelRuntime::Tract;
        if name == "fraud-lgbm" {
            cfg.signature.outputs.pop();
            check_scores(&cfg, &inputs, &want, ModelRuntime::Tract, &[64]);
        } else {
            let err = Model::load(&cfg).unwrap_err();
            assert_eq!(err.kind(), "ModelInvalid", "{name}: {err}");
            assert!(err.to_string().contains("TreeEnsembleClassifier"), "{name}: {err}");
        }
    }
}

/// What ONNX Runtime refuses at load time says what is wrong with the signature.
#[test]
fn onnxruntime_refuses_a_signature_that_does_not_fit_the_model() {
    require_onnxruntime();
    let (sha, _, _) = reference("fraud-lgbm");
    let mut cfg = config("fraud-lgbm", &sha, 8);
    cfg.signature.runtime = ModelRuntime::Onnxruntime;
    cfg.signature.outputs = vec![OutputMapping { name: "score".into(), output: 2, column: 0 }];
    let err = Model::load(&cfg).unwrap_err();
    assert!(err.to_string().contains("refers to output #2 but the model has 2"), "{err}");
    cfg.signature.outputs = vec![OutputMapping { name: "score".into(), output: 1, column: 2 }];
    let err = Model::load(&cfg).unwrap_err();
    assert_eq!(err.kind(), "ModelProbeFailed", "{err}");
    assert!(err.to_string().contains("reads column 2 but output #1 has 2"), "{err}");
    cfg.signature.outputs = vec![OutputMapping { name: "score".into(), output: 1, column: 1 }];
    cfg.signature.input_name = "features".into();
    let err = Model::load(&cfg).unwrap_err();
    assert!(err.to_string().contains("no input named \"features\""), "{err}");
    cfg.signature.input_name = String::new();
    cfg.signature.features.pop();
    let err = Model::load(&cfg).unwrap_err();
    assert_eq!(err.kind(), "ModelInvalid", "{err}");
    assert!(err.to_string().contains("takes 4 features but model.features lists 3"), "{err}");
}

#[test]
fn wrong_digest_and_corrupt_files_are_refused_with_a_reason() {
    let err = Model::load(&config("fraud-logreg", &"0".repeat(64), 8)).unwrap_err();
    assert!(matches!(err, ModelError::DigestMismatch { .. }), "{err}");
    assert_eq!(err.kind(), "ModelDigestMismatch");
    let garbage = b"this is not an onnx model";
    let sha = streamscore_worker::model::sha256_hex(garbage);
    let err = Model::from_bytes(garbage, &config("x", &sha, 8)).unwrap_err();
    assert_eq!(err.kind(), "ModelInvalid", "{err}");
    let err = Model::load(&config("does-not-exist", &sha, 8)).unwrap_err();
    assert_eq!(err.kind(), "ModelUnreadable", "{err}");
}

#[test]
fn a_model_file_over_the_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.onnx");
    // Sparse: 1 GiB + 1 byte on the file system's books, nothing on disk.
    std::fs::File::create(&path).unwrap().set_len(streamscore_worker::model::MAX_MODEL_BYTES + 1).unwrap();
    let mut cfg = config("fraud-logreg", &"0".repeat(64), 4);
    cfg.path = path.display().to_string();
    let err = Model::load(&cfg).unwrap_err();
    assert!(matches!(err, ModelError::TooLarge { bytes, .. } if bytes == (1 << 30) + 1), "{err}");
    assert_eq!(err.kind(), "ModelTooLarge");
}
