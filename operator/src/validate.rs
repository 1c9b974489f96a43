//! Checks of a TenantModel that the API server's schema and CEL rules cannot make
//! (pure). A failure is permanent until the spec changes: the TenantModel goes
//! `Degraded` with the message and the operator waits for a change.

use streamscore_crds::tenantmodel::TenantModel;

use crate::build::render_pipeline;

/// Every problem with the spec, each naming its field.
pub fn validate(tm: &TenantModel) -> Result<(), Vec<String>> {
    let s = &tm.spec;
    let mut errs = Vec::new();
    if s.parallelism < 1 {
        errs.push("spec.parallelism: must be at least 1".to_owned());
    }
    match (&s.model.config_map, &s.model.uri) {
        (Some(_), Some(_)) | (None, None) => {
            errs.push("spec.model: exactly one of configMap and uri must be set".to_owned());
        }
        (None, Some(uri)) if !(uri.starts_with("file:///") || uri.starts_with('/')) => errs.push(format!(
            "spec.model.uri: {uri:?} is not supported yet: use a ConfigMap or a file:/// path inside the worker image"
        )),
        _ => {}
    }
    if let Some(store) = &s.checkpoint_store {
        let ok = ["s3://", "gs://", "az://", "file:///"].iter().any(|p| store.starts_with(p));
        if !ok {
            errs.push(format!("spec.checkpointStore: {store:?} must start with s3://, gs://, az:// or file:///"));
        }
    }
    if let Err(pipeline_errs) = render_pipeline(tm).validate() {
        for e in pipeline_errs {
            // model.path is rendered by the operator: report the spec field the user wrote.
            if e.field == "model.path" {
                continue;
            }
            errs.push(format!("spec.{e}"));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}
