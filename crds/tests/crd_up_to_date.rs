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

/// Every field a `kubectl explain` text names exists: dotted paths (`spec.state.size`,
/// `status.lastRescale`) from the root, and camelCase words (`checkpointStore`) as some field or
/// enum value of the schema. A description that promises a field the CRD does not have fails.
#[test]
fn explain_text_names_only_fields_that_exist() {
    let crd: serde_json::Value =
        serde_yaml::from_str(streamscore_crds::crd_yaml().split_once('\n').map(|(_, rest)| rest).unwrap_or_default())
            .unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    assert!(!root["description"].as_str().unwrap().starts_with("Auto-generated"), "the root has its own description");
    let mut paths = std::collections::BTreeSet::new();
    let mut words = std::collections::BTreeSet::new();
    let mut texts = Vec::new();
    walk(root, "", &mut paths, &mut words, &mut texts);
    // Fields of Kubernetes objects the texts refer to (a ConfigMap's, a pod volume's).
    words.extend(["binaryData", "emptyDir"].map(String::from));
    let mut wrong = Vec::new();
    for (at, text) in &texts {
        for token in text.split('`').skip(1).step_by(2) {
            let token = token.trim();
            let dotted = token.split(['[', ' ', '=', ':']).next().unwrap_or_default();
            if (dotted.starts_with("spec.") || dotted.starts_with("status.")) && dotted.len() > 5 {
                if !paths.contains(dotted.trim_end_matches('.')) {
                    wrong.push(format!("{at}: `{token}` is not a field"));
                }
            } else if token.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && token.chars().all(|c| c.is_ascii_alphanumeric())
                && token.chars().any(|c| c.is_ascii_uppercase())
                && !words.contains(token)
            {
                wrong.push(format!("{at}: `{token}` is neither a field nor a value"));
            }
        }
    }
    assert!(wrong.is_empty(), "kubectl explain names what does not exist:\n{}", wrong.join("\n"));
}

fn walk(
    node: &serde_json::Value,
    path: &str,
    paths: &mut std::collections::BTreeSet<String>,
    words: &mut std::collections::BTreeSet<String>,
    texts: &mut Vec<(String, String)>,
) {
    if let Some(d) = node["description"].as_str() {
        texts.push((if path.is_empty() { "<root>".into() } else { path.to_owned() }, d.to_owned()));
    }
    for v in node["enum"].as_array().into_iter().flatten() {
        if let Some(v) = v.as_str() {
            words.insert(v.to_owned());
        }
    }
    if let Some(props) = node["properties"].as_object() {
        for (name, child) in props {
            let p = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            paths.insert(p.clone());
            words.insert(name.clone());
            walk(child, &p, paths, words, texts);
        }
    }
    for key in ["items", "additionalProperties"] {
        if node[key].is_object() {
            walk(&node[key], path, paths, words, texts);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for v in node[key].as_array().into_iter().flatten() {
            walk(v, path, paths, words, texts);
        }
    }
}
