//! A worker whose `ORT_DYLIB_PATH` names no library refuses a model that needs ONNX Runtime with
//! that reason (not ready, `ModelRuntimeUnavailable`), and still runs tract models. Its own test
//! binary: the library is loaded once per process.

use streamscore_crds::pipeline::{BatchConfig, ModelConfig, ModelRuntime, ModelSignature, OutputMapping};
use streamscore_worker::model::{Model, ORT_DYLIB_ENV};

fn config(name: &str, runtime: ModelRuntime, output: u32, column: u32) -> ModelConfig {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.reference.json"))).unwrap()).unwrap();
    ModelConfig {
        path: dir.join(format!("{name}.onnx")).display().to_string(),
        sha256: reference["sha256"].as_str().unwrap().into(),
        version: "v".into(),
        signature: ModelSignature {
            input_name: String::new(),
            features: vec!["tx_1h".into(), "amount_24h".into(), "rides_1h".into(), "event.amount".into()],
            outputs: vec![OutputMapping { name: "score".into(), output, column }],
            batch: BatchConfig::default(),
            runtime,
        },
    }
}

#[test]
fn a_missing_onnxruntime_library_is_a_clear_model_error() {
    let missing = tempfile::tempdir().unwrap().path().join("libonnxruntime.so.1.32.0");
    // The only test of this binary: no other thread reads the environment.
    std::env::set_var(ORT_DYLIB_ENV, &missing);
    for runtime in [ModelRuntime::Onnxruntime, ModelRuntime::Auto] {
        let err = Model::load(&config("fraud-lgbm", runtime, 1, 1)).unwrap_err();
        assert_eq!(err.kind(), "ModelRuntimeUnavailable", "{err}");
        assert!(err.to_string().contains(&format!("{ORT_DYLIB_ENV}={}: no such file", missing.display())), "{err}");
    }
    // tract does not need it.
    let m = Model::load(&config("fraud-logreg", ModelRuntime::Auto, 0, 0)).unwrap();
    assert_eq!(m.runtime(), ModelRuntime::Tract);
}
