//! Gradient-boosted trees through the worker binary, against the real broker: a pipeline with
//! `model.runtime: auto` on each tree model of `models/` (scikit-learn, LightGBM, XGBoost) scores
//! on ONNX Runtime, and every score equals the training library's own `predict_proba` within
//! 1e-5.
//!
//! The events are built so that the reference pipeline's features of each user's last event are
//! exactly one reference row `[tx_1h, amount_24h, rides_1h, amount]`: one event 2 h earlier carries
//! `amount_24h − amount` (inside the 24 h window, outside the 1 h ones), `tx_1h − 1` events of
//! amount 0 in the last hour, `rides_1h` of them (or of them and the last) `ride_requested`. The
//! test checks those features from the output record too, so a wrong score cannot hide behind
//! a wrong input.

use std::time::Duration;

use streamscore_tests::{create_topics, produce, producer, reference_pipeline, repo_root, unique, WorkerProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_models_score_through_the_worker_like_their_training_libraries() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH must name ONNX Runtime's shared library (make test sets it)"
    );
    for name in ["fraud-gbt-sklearn", "fraud-lgbm", "fraud-xgb"] {
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo_root().join(format!("models/{name}.reference.json"))).unwrap())
                .unwrap();
        let (input, out, dlq) = (unique("t-in"), unique("t-out"), unique("t-dlq"));
        create_topics(&[&input, &out, &dlq], 3).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = reference_pipeline(&input, &out, &dlq, &unique("t-group"), "/unused");
        cfg.model.path = repo_root().join(format!("models/{name}.onnx")).display().to_string();
        cfg.model.sha256 = reference["sha256"].as_str().unwrap().to_owned();
        cfg.model.version = name.to_owned();
        cfg.model.signature.runtime = streamscore_crds::pipeline::ModelRuntime::Auto;
        // Output #1: the probabilities [N, 2]; column 1 is P(fraud).
        cfg.model.signature.outputs[0].output = 1;
        cfg.model.signature.outputs[0].column = 1;
        cfg.postprocess.passthrough = vec!["last".into()];
        cfg.validate().unwrap();
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();

        let (records, want) = streamscore_tests::tree_reference_input(&reference);
        let total = records.len();
        produce(&producer(), &input, &records).await;

        let mut worker = WorkerProcess::spawn(&file, &dir.path().join("state"), dir.path().join("worker.log"));
        let scored = tokio::task::spawn_blocking({
            let out = out.clone();
            move || streamscore_tests::consume(&out, total, Duration::from_secs(120))
        })
        .await
        .unwrap();
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        worker.kill();
        assert_eq!(scored.len(), total, "{name}: every event scored; worker log:\n{log}");
        let loaded = log.lines().find(|l| l.contains("model loaded and probed")).unwrap_or_default();
        assert!(loaded.contains("\"onnxruntime\""), "{name}: `auto` chose ONNX Runtime: {loaded}");
        streamscore_tests::check_tree_scores(&scored, &want, name, name);
    }
}
