//! The Helm chart: lint, render, server-side dry run, and a real install/upgrade/uninstall
//! against the local API server (no `--wait`: there is no kubelet), plus manifests/ in sync.

use std::process::Command;

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
    // Namespaced by default: a Role in the release's namespace, no ClusterRole.
    assert!(dry.contains("deployment.apps/") && dry.contains("role.rbac.authorization.k8s.io/"), "{dry}");
    assert!(!dry.contains("clusterrole"), "no cluster-wide RBAC by default: {dry}");
    assert!(rendered.contains(&format!("--namespaces={ns}")), "the operator watches its own namespace");
    run("helm", &["install", &release, "charts/streamscore", "-n", &ns, "--set", "crds.install=false"]);
    let dep = format!("{release}-streamscore-operator");
    run("kubectl", &["get", "deployment", &dep, "-n", &ns]);
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
    let _ = Command::new("kubectl").args(["delete", "ns", &ns, "--wait=false"]).output();
}
