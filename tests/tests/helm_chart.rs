//! The Helm chart: lint, render, server-side dry run, and a real install/upgrade/uninstall
//! against the local API server (no `--wait`: there is no kubelet), plus manifests/ in sync.

use std::process::Command;

use serde::Deserialize;

use streamscore_tests::{kube_client, namespace, repo_root, unique};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).current_dir(repo_root()).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd} {args:?} failed:\n{text}");
    text
}

#[test]
fn chart_lints_and_manifests_are_in_sync() {
    run("helm", &["lint", "charts/streamscore"]);
    run(
        "helm",
        &["lint", "charts/streamscore", "--set", "watchNamespaces={a,b}", "--set", "serviceMonitor.enabled=true"],
    );
    run("bash", &["scripts/manifests.sh", "--check"]);
    // clusterWide: a ClusterRole and no namespace list; with watchNamespaces too, refused.
    let wide = run("helm", &["template", "x", "charts/streamscore", "--set", "clusterWide=true"]);
    assert!(wide.contains("kind: ClusterRole") && !wide.contains("--namespaces="), "{wide}");
    let both = Command::new("helm")
        .args(["template", "x", "charts/streamscore", "--set", "clusterWide=true", "--set", "watchNamespaces={a}"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!both.status.success(), "clusterWide with watchNamespaces must be refused");
    let bad = Command::new("helm")
        .args(["template", "x", "charts/streamscore", "--set", "replicaCount=0"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!bad.status.success(), "values.schema.json must reject replicaCount=0");
    // The tenant policy reaches the operator's flags; a wildcard that is not after `/`, `:` or
    // `@` is refused before it reaches the operator.
    let out = run(
        "helm",
        &[
            "template",
            "x",
            "charts/streamscore",
            "--set",
            "tenantPolicy.allowedImages={registry.example.com/streamscore/*,reg.example.com/w@*}",
            "--set",
            "tenantPolicy.requireImageDigest=true",
        ],
    );
    assert!(out.contains("--allowed-images=registry.example.com/streamscore/*,reg.example.com/w@*"), "{out}");
    assert!(out.contains("--require-image-digest=true"), "{out}");
    let bad = Command::new("helm")
        .args(["template", "x", "charts/streamscore", "--set", "tenantPolicy.allowedImages={registry.example.com/w*}"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!bad.status.success(), "values.schema.json must reject a wildcard inside a name");
}

/// Metric names a PromQL expression uses (`streamscore_…`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("streamscore_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The monitoring pack: the chart renders a PodMonitor, a ServiceMonitor, PrometheusRules and a
/// Grafana dashboard; every metric their queries name is one the worker or the operator exports
/// (a renamed metric fails here); promtool checks the rules and runs their unit tests
/// (tests/promtool/rules-test.yaml: each alert fires, and does not fire, on recorded series).
#[test]
fn the_monitoring_pack_queries_exported_metrics_and_its_alerts_fire_as_written() {
    let out = run(
        "helm",
        &[
            "template",
            "x",
            "charts/streamscore",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "podMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "watchNamespaces={t1,t2}",
        ],
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k} in\n{out}"));
    let pm = kind("PodMonitor");
    assert_eq!(
        pm["spec"]["namespaceSelector"]["matchNames"],
        serde_yaml::from_str::<serde_yaml::Value>("[t1, t2]").unwrap()
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(kind("ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"], true);
    let rule = kind("PrometheusRule");
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let dashboard: serde_json::Value =
        serde_json::from_str(dashboard["data"]["streamscore.json"].as_str().unwrap()).expect("dashboard JSON");

    // Every query names exported metrics only (a family is described once it has a series).
    let worker = streamscore_worker::metrics::Metrics::new();
    for family in [&worker.consumer_lag, &worker.restore_missing_records] {
        family.get_or_create(&streamscore_worker::metrics::PartitionLabel { topic: "in".into(), partition: 0 }).set(0);
    }
    let operator = streamscore_operator::metrics::OperatorMetrics::new();
    let tm: streamscore_crds::tenantmodel::TenantModel = serde_json::from_value(serde_json::json!({
        "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
        "metadata": {"name": "fraud", "namespace": "t1"},
        "spec": {"parallelism": 1,
                 "source": {"bootstrapServers": "k:9092", "topics": ["in"], "keyField": "u", "eventTime": {"field": "ts"}},
                 "model": {"uri": "file:///m", "sha256": "00", "version": "v", "features": [], "outputs": [{"name": "s"}]},
                 "sink": {"topic": "out", "deadLetterTopic": "dlq"}},
        "status": {"conditions": streamscore_operator::metrics::CONDITIONS.map(|c| serde_json::json!({
            "type": c, "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}))}
    }))
    .unwrap();
    operator.observe([&tm]);
    let exported: std::collections::BTreeSet<String> = [worker.encode(), operator.encode()]
        .iter()
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split_whitespace().next())
                .flat_map(|n| ["", "_total", "_bucket", "_sum", "_count"].map(|s| format!("{n}{s}")))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut exprs: Vec<String> = rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    let mut checked = 0;
    for e in &exprs {
        for name in metric_names(e) {
            assert!(exported.contains(&name), "{name} (in `{e}`) is not a metric streamscore exports");
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked} metric references");

    // promtool: the rules as Prometheus loads them, and their unit tests.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    std::fs::copy(repo_root().join("tests/promtool/rules-test.yaml"), dir.path().join("rules-test.yaml")).unwrap();
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool on PATH (scripts/build-k8s.sh promtool; scripts/env.sh puts it there)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    let checked = promtool(&["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "rules-test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The chart (default, cluster-wide and demo values) and the objects the operator creates for
/// `examples/` pass a Kubernetes security scanner (checkov, offline) with no findings beyond the
/// documented exceptions (`scripts/scan.sh`; it exits non-zero on any other finding: checked
/// once with workers rendered without resources, 12 findings).
#[test]
fn chart_and_worker_objects_pass_the_security_scan() {
    let out = run("bash", &["scripts/scan.sh"]);
    assert!(out.contains("Failed checks: 0"), "{out}");
}

#[tokio::test]
async fn chart_installs_upgrades_and_uninstalls() {
    let client = kube_client().await;
    let ns = namespace(&client, "helm").await;
    let release = unique("ss");
    // The server accepts every rendered object (CRD left out: the operator test owns it).
    let rendered = run("helm", &["template", &release, "charts/streamscore", "-n", &ns, "--set", "crds.install=false"]);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rendered).unwrap();
    let dry = run("kubectl", &["apply", "--dry-run=server", "-f", file.path().to_str().unwrap()]);
    // Namespaced by default: a Role in the release's namespace; the only ClusterRoles are the
    // ones aggregated into edit/admin/view for namespace users (nothing for the operator).
    assert!(dry.contains("deployment.apps/") && dry.contains("role.rbac.authorization.k8s.io/"), "{dry}");
    let cluster_roles: Vec<&str> = dry.lines().filter(|l| l.starts_with("clusterrole")).collect();
    assert_eq!(
        cluster_roles,
        [
            format!(
                "clusterrole.rbac.authorization.k8s.io/{release}-streamscore-operator-edit created (server dry run)"
            ),
            format!(
                "clusterrole.rbac.authorization.k8s.io/{release}-streamscore-operator-view created (server dry run)"
            ),
        ],
        "{dry}"
    );
    assert!(!dry.contains("clusterrolebinding"), "no cluster-wide RBAC for the operator by default: {dry}");
    assert!(rendered.contains(&format!("--namespaces={ns}")), "the operator watches its own namespace");
    run("helm", &["install", &release, "charts/streamscore", "-n", &ns, "--set", "crds.install=false"]);
    let dep = format!("{release}-streamscore-operator");
    run("kubectl", &["get", "deployment", &dep, "-n", &ns]);
    assert!(
        run("kubectl", &["get", "deployment", &dep, "-n", &ns, "-o", "yaml"])
            .contains(&format!("--lease-name={release}-streamscore-operator")),
        "the leader Lease is named after the release"
    );
    // A namespace user with the built-in edit role manages TenantModels; one with view reads
    // them only (the controller-manager aggregates the chart's ClusterRoles into both).
    for (role, user) in [("edit", "alice"), ("view", "bob")] {
        run(
            "kubectl",
            &["create", "rolebinding", &format!("{user}-{role}"), "-n", &ns, "--clusterrole", role, "--user", user],
        );
    }
    let can = |user: &str, verb: &str, resource: &str| {
        let out = Command::new("kubectl")
            .args(["auth", "can-i", verb, resource, "-n", &ns, "--as", user])
            .current_dir(repo_root())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    streamscore_tests::eventually(std::time::Duration::from_secs(30), "edit aggregated", || async {
        can("alice", "create", "tenantmodels.streamscore.io").then_some(())
    })
    .await;
    assert!(can("alice", "patch", "tenantmodels.streamscore.io/scale"), "edit scales (kubectl scale tm)");
    assert!(can("alice", "delete", "tenantmodels.streamscore.io"));
    streamscore_tests::eventually(std::time::Duration::from_secs(30), "view aggregated", || async {
        can("bob", "list", "tenantmodels.streamscore.io").then_some(())
    })
    .await;
    assert!(!can("bob", "create", "tenantmodels.streamscore.io"), "view cannot create");
    assert!(!can("bob", "patch", "tenantmodels.streamscore.io/status"), "nobody but the operator writes status");
    run(
        "helm",
        &[
            "upgrade",
            &release,
            "charts/streamscore",
            "-n",
            &ns,
            "--set",
            "crds.install=false",
            "--set",
            "replicaCount=2",
        ],
    );
    let replicas = run("kubectl", &["get", "deployment", &dep, "-n", &ns, "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas.trim(), "2");
    run("helm", &["uninstall", &release, "-n", &ns]);
    let gone = Command::new("kubectl").args(["get", "deployment", &dep, "-n", &ns]).output().unwrap();
    assert!(!gone.status.success(), "Deployment left after uninstall");
    let gone = Command::new("kubectl").args(["get", "clusterrole", &format!("{dep}-edit")]).output().unwrap();
    assert!(!gone.status.success(), "aggregated ClusterRole left after uninstall");
    let _ = Command::new("kubectl").args(["delete", "ns", &ns, "--wait=false"]).output();
}

/// The tenant policy at admission: installed with an image allowlist, a Kafka prefix and a CPU
/// maximum, the chart's ValidatingAdmissionPolicy makes the real API server refuse a
/// TenantModel that breaks any of them at `kubectl apply`, with the reason, and admit one that
/// keeps them.
#[tokio::test]
async fn the_tenant_policy_refuses_a_tenantmodel_at_kubectl_apply() {
    let client = kube_client().await;
    streamscore_tests::install_crd(&client).await;
    let ns = namespace(&client, "vap").await;
    let release = unique("vap");
    let values = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        values.path(),
        "crds: {install: false}\ntenantPolicy:\n  kafkaPrefix: \"{namespace}.\"\n  maxWorkerResources: {cpu: \"2\"}\n  \
         allowedImages: [registry.example.com/ss/*]\n",
    )
    .unwrap();
    run("helm", &["install", &release, "charts/streamscore", "-n", &ns, "-f", values.path().to_str().unwrap()]);
    let tm = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = streamscore_tests::minimal_tenant_model("fraud", &"0".repeat(64));
        v["metadata"]["namespace"] = ns.clone().into();
        v["spec"]["source"]["topics"] = serde_json::json!([format!("{ns}.payments")]);
        v["spec"]["sink"]["topic"] = format!("{ns}.scores").into();
        v["spec"]["sink"]["deadLetterTopic"] = format!("{ns}.dlq").into();
        f(&mut v);
        v
    };
    let apply = |v: serde_json::Value| {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), v.to_string()).unwrap();
        let out = Command::new("kubectl")
            .args(["apply", "--dry-run=server", "-f", file.path().to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    // The policy takes effect within seconds of its creation.
    let refused = streamscore_tests::eventually(std::time::Duration::from_secs(30), "the policy in effect", || async {
        let (ok, out) = apply(tm(&|v| v["spec"]["image"] = "evil.example.com/miner:1".into()));
        (!ok).then_some(out)
    })
    .await;
    assert!(
        refused.contains("spec.image: evil.example.com/miner:1 is not in the platform's image allowlist"),
        "{refused}"
    );
    let (ok, out) = apply(tm(&|v| v["spec"]["image"] = "registry.example.com/ss/worker:2".into()));
    assert!(ok, "an allowed image: {out}");
    let (ok, out) = apply(tm(&|v| v["spec"]["image"] = "registry.example.com/ss/nested/worker:2".into()));
    assert!(ok, "`/*` allows nested paths: {out}");
    let (ok, out) = apply(tm(&|v| v["spec"]["sink"]["deadLetterTopic"] = "shared.dlq".into()));
    assert!(!ok && out.contains(&format!("must start with {ns}.")) && out.contains("shared.dlq"), "{out}");
    let lookup = |topic: String| {
        move |v: &mut serde_json::Value| {
            v["spec"]["features"]["lookups"] =
                serde_json::json!([{"name": "merchants", "topic": topic, "key": "merchant", "fields": ["tier"]}])
        }
    };
    let (ok, out) = apply(tm(&lookup("shared.merchants".into())));
    assert!(!ok && out.contains("shared.merchants"), "a lookup table's topic: {out}");
    let (ok, out) = apply(tm(&lookup(format!("{ns}.merchants"))));
    assert!(ok, "a lookup table under the prefix: {out}");
    let (ok, out) = apply(tm(&|v| v["spec"]["resources"] = serde_json::json!({"limits": {"cpu": 4}})));
    assert!(
        !ok && out.contains("spec.resources.limits.cpu: 4 is above the platform's maximum per worker (2)"),
        "{out}"
    );
    let (ok, out) = apply(tm(&|v| v["spec"]["resources"] = serde_json::json!({"requests": {"cpu": "1500m"}})));
    assert!(ok, "within the maximum: {out}");
    let (ok, out) = apply(tm(&|_| {}));
    assert!(ok, "a TenantModel that keeps the policy: {out}");
    run("helm", &["uninstall", &release, "-n", &ns]);
    let _ = Command::new("kubectl").args(["delete", "ns", &ns, "--wait=false"]).output();
}
