//! Which objects belong to a TenantModel (pure): exactly those whose controller owner
//! reference is the TenantModel's uid. The operator creates a child only when no object
//! has its name yet, updates only children it controls, and prunes only those; an object
//! someone else made (or a TenantModel's child that carries its labels by accident or on
//! purpose) is never adopted, changed or deleted.
//!
//! ```text
//!  child name taken? ── no ──────────────────────► create (server-side apply)
//!                    └─ yes, controller = our uid ► update (server-side apply)
//!                    └─ yes, anything else ──────► Degraded NameConflict, nothing applied
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Whether the object's controller owner reference is the TenantModel with `uid`.
pub fn is_controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == uid)
}

/// Who controls the object, for a NameConflict message.
pub fn controller_of(meta: &ObjectMeta) -> String {
    match meta.owner_references.iter().flatten().find(|r| r.controller == Some(true)) {
        Some(r) => format!("it is controlled by {} {:?} (uid {})", r.kind, r.name, r.uid),
        None => "it has no controller".to_owned(),
    }
}

/// The NameConflict message for an existing object `kind`/`name` not controlled by `uid`,
/// or None when it is ours.
pub fn conflict(kind: &str, name: &str, meta: &ObjectMeta, uid: &str) -> Option<String> {
    (!is_controlled_by(meta, uid)).then(|| {
        format!(
            "{kind} {name:?} already exists and was not created by this TenantModel ({}); the operator does not \
             adopt it: delete or rename it, or rename the TenantModel",
            controller_of(meta)
        )
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn meta(refs: &[(&str, bool)]) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(
                refs.iter()
                    .map(|(uid, controller)| OwnerReference {
                        api_version: "streamscore.io/v1alpha1".into(),
                        kind: "TenantModel".into(),
                        name: "fraud".into(),
                        uid: (*uid).into(),
                        controller: Some(*controller),
                        block_owner_deletion: None,
                    })
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_the_controller_reference_with_our_uid_counts() {
        assert!(is_controlled_by(&meta(&[("u1", true)]), "u1"));
        assert!(!is_controlled_by(&meta(&[("u1", false)]), "u1"), "a non-controller reference is not ownership");
        assert!(!is_controlled_by(&meta(&[("u0", true)]), "u1"), "a previous TenantModel of the same name");
        assert!(!is_controlled_by(&ObjectMeta::default(), "u1"));
        assert_eq!(conflict("Service", "fraud", &meta(&[("u1", true)]), "u1"), None);
        let msg = conflict("Service", "fraud", &ObjectMeta::default(), "u1").unwrap();
        assert!(msg.starts_with("Service \"fraud\" already exists") && msg.contains("no controller"), "{msg}");
        let msg = conflict("ConfigMap", "fraud-pipeline", &meta(&[("u0", true)]), "u1").unwrap();
        assert!(msg.contains("controlled by TenantModel \"fraud\" (uid u0)"), "{msg}");
    }
}
