//! tract's scores equal the reference scores computed by the training script
//! (`models/make_models.py`, numpy) within 1e-5, and bad models are refused with a reason.

use streamscore_crds::pipeline::{BatchConfig, ModelConfig, ModelRuntime, ModelSignature, OutputMapping};
use streamscore_worker::model::{Model, ModelError};

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

#[test]
fn scores_match_the_training_scripts_reference() {
    for name in ["fraud-logreg", "fraud-mlp", "nan-score"] {
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(models_dir().join(format!("{name}.reference.json"))).unwrap())
                .unwrap();
        let inputs: Vec<Vec<f32>> = reference["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect();
        let want: Vec<f64> = reference["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        // A batch smaller than the input set exercises chunking and zero padding.
        for batch in [1, 4, 64] {
            let m = Model::load(&config(name, reference["sha256"].as_str().unwrap(), batch)).unwrap();
            let got = m.score(&inputs).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g[0] - w).abs() < 1e-5, "{name} batch {batch}: {} vs {w}", g[0]);
            }
        }
    }
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
