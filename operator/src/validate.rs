//! Checks of a TenantModel that the API server's schema and CEL rules cannot make
//! (pure). A failure is permanent until the spec changes: the TenantModel goes
//! `Degraded` with the message and the operator waits for a change.

use streamscore_crds::pipeline::PipelineConfig;
use streamscore_crds::tenantmodel::TenantModel;

use crate::build::render_pipeline;

/// One problem with a spec: the field, as a path the user wrote (`spec.model.uri`), and what
/// is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field, from `spec`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A spec that passed every check, with the worker pipeline it renders to (no Kafka prefix).
#[derive(Debug)]
pub struct Valid {
    /// The pipeline configuration, validated.
    pub pipeline: PipelineConfig,
}

/// The spec as the workers will run it, or every problem with it, each naming its field.
pub fn validate(tm: &TenantModel) -> Result<Valid, Vec<Problem>> {
    let s = &tm.spec;
    let mut errs = Vec::new();
    if s.parallelism < 1 {
        errs.push(Problem::new("spec.parallelism", "must be at least 1"));
    }
    match (&s.model.config_map, &s.model.uri) {
        (Some(_), Some(_)) | (None, None) => {
            errs.push(Problem::new("spec.model", "exactly one of configMap and uri must be set"));
        }
        (None, Some(uri))
            if !(["s3://", "gs://", "az://", "file:///"].iter().any(|p| uri.starts_with(p))
                || uri.starts_with('/'))
                || uri.ends_with('/') =>
        {
            errs.push(Problem::new(
                "spec.model.uri",
                format!(
                    "{uri:?} must name a file: s3://bucket/path, gs://…, az://…, or a file:/// path inside the worker \
                     image"
                ),
            ))
        }
        _ => {}
    }
    if let Some(store) = &s.checkpoint_store {
        let ok = ["s3://", "gs://", "az://", "file:///"].iter().any(|p| store.starts_with(p));
        if !ok {
            errs.push(Problem::new(
                "spec.checkpointStore",
                format!("{store:?} must start with s3://, gs://, az:// or file:///"),
            ));
        }
    }
    let pipeline = render_pipeline(tm, None);
    if let Err(pipeline_errs) = pipeline.validate() {
        for e in pipeline_errs {
            // model.path is rendered by the operator, and spec.checkpointStore is checked above:
            // report the spec fields the user wrote.
            if e.field == "model.path" || e.field == "state.checkpointStore" {
                continue;
            }
            errs.push(Problem::new(format!("spec.{}", e.field), e.message));
        }
    }
    if errs.is_empty() {
        Ok(Valid { pipeline })
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> TenantModel {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
        let mut tm: TenantModel = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tm.metadata.namespace = Some("payments".into());
        tm
    }

    #[test]
    fn examples_are_valid() {
        for name in ["fraud-detection.yaml", "personalization.yaml"] {
            if let Err(problems) = validate(&example(name)) {
                panic!("{name}: {problems:?}");
            }
        }
    }

    /// The CRD admits names of at most 52 characters (DNS-1035): every child of such a name
    /// must itself be a valid name (Services and NetworkPolicies: DNS-1035 labels ≤ 63).
    #[test]
    fn every_child_of_the_longest_admitted_name_has_a_valid_name() {
        let crd = streamscore_crds::crd_yaml();
        assert!(crd.contains("size(self.metadata.name) <= 52"), "the CRD's name limit changed: update this test");
        let mut tm = example("fraud-detection.yaml");
        tm.metadata.name = Some(format!("f{}", "x".repeat(51)));
        tm.metadata.uid = Some("0c5b7a1e-0000-4000-8000-000000000000".into());
        let ctx = crate::build::BuildContext {
            default_image: "streamscore-worker:0.1.0".into(),
            operator_namespace: "streamscore-system".into(),
            kafka_prefix: None,
            default_resources: None,
            worker_egress: None,
            metrics_from: None,
            worker_pod_template: Default::default(),
        };
        let c = crate::build::build(&tm, &ctx);
        let names = [
            c.config_map.metadata.name,
            c.deployment.metadata.name,
            c.service_account.metadata.name,
            c.service.metadata.name,
            c.headless.metadata.name,
            c.pdb.metadata.name,
            c.network_policy.metadata.name,
        ];
        let dns1035 = |n: &str| {
            n.len() <= 63
                && n.starts_with(|c: char| c.is_ascii_lowercase())
                && !n.ends_with('-')
                && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        for n in names.iter().flatten() {
            assert!(dns1035(n), "{n:?} ({} characters) is not a valid child name", n.len());
        }
        let longest = names.iter().flatten().map(String::len).max().unwrap();
        assert!((60..=63).contains(&longest), "{longest}: the limit is no tighter than it needs to be");
    }

    #[test]
    fn emitted_windows_without_a_feature_topic_name_the_spec_field() {
        let mut tm = example("fraud-detection.yaml");
        assert!(!tm.spec.features.emitted.is_empty());
        tm.spec.sink.feature_topic = None;
        let errs = validate(&tm).unwrap_err();
        assert!(
            errs.iter().any(|e| e.field == "spec.sink.featureTopic" && e.message.starts_with("required")),
            "{errs:?}"
        );
        tm.spec.sink.feature_topic = Some(tm.spec.sink.topic.clone());
        let errs = validate(&tm).unwrap_err();
        assert!(errs.iter().any(|e| e.to_string().starts_with("spec.sink.featureTopic: must differ")), "{errs:?}");
    }
}
