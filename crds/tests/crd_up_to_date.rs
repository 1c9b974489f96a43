//! The committed CRD YAML is exactly what `crdgen` prints (run `make crds` after changing
//! the types).

#[test]
fn committed_crd_yaml_is_current() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/streamscore/files/crds/tenantmodels.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == streamscore_crds::crd_yaml(),
        "{} is stale: run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn crd_has_columns_scale_and_docs() {
    let y = streamscore_crds::crd_yaml();
    for needle in [
        "shortNames:\n    - tm",
        "specReplicasPath: .spec.parallelism",
        "name: Phase",
        "name: Model",
        "name: Parallelism",
        "x-kubernetes-validations",
        "Number of worker pods",
        "helm.sh/resource-policy: keep",
    ] {
        assert!(y.contains(needle), "CRD lacks {needle:?}");
    }
}
