//! `streamscore-render`: prints the objects the operator would create for TenantModel files
//! (multi-document YAML), without an API server: what a platform team reviews or scans
//! (`scripts/scan.sh` runs a Kubernetes security scanner on them). The first (blue) colour, as
//! for a new TenantModel; a TenantModel without a namespace is rendered in `--namespace`.

use clap::Parser;
use kube::ResourceExt;
use streamscore_crds::tenantmodel::TenantModel;
use streamscore_operator::build::{build, BuildContext};

#[derive(Parser)]
struct Args {
    /// TenantModel YAML files (several documents each allowed).
    files: Vec<std::path::PathBuf>,
    /// Namespace of TenantModels that name none.
    #[arg(long, default_value = "tenant")]
    namespace: String,
    /// As the operator's flag: default worker requests and limits (JSON).
    #[arg(long, default_value = "")]
    worker_resources: String,
    /// As the operator's flag: the workers' egress rules (JSON, or `off`).
    #[arg(long, default_value = "{}")]
    worker_egress: String,
    /// As the operator's flag: the worker image when a TenantModel names none.
    #[arg(long, default_value = "streamscore-worker:0.1.0")]
    worker_image: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ctx = BuildContext {
        default_image: args.worker_image.clone(),
        operator_namespace: "streamscore-system".into(),
        kafka_prefix: None,
        default_resources: match args.worker_resources.trim() {
            "" => None,
            json => Some(serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--worker-resources: {e}"))?),
        },
        worker_egress: match args.worker_egress.trim() {
            "off" => None,
            "" => Some(Default::default()),
            json => Some(serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--worker-egress: {e}"))?),
        },
        metrics_from: None,
        worker_pod_template: Default::default(),
    };
    let mut out = String::new();
    for file in &args.files {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)?;
            if value.get("kind").and_then(|k| k.as_str()) != Some("TenantModel") {
                continue;
            }
            let mut tm: TenantModel =
                serde_yaml::from_value(value).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            if tm.namespace().is_none() {
                tm.metadata.namespace = Some(args.namespace.clone());
            }
            // The owner references need one; the API server would assign it.
            tm.metadata.uid.get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
            let c = build(&tm, &ctx);
            for obj in [
                serde_yaml::to_value(&c.config_map)?,
                serde_yaml::to_value(&c.deployment)?,
                serde_yaml::to_value(&c.service_account)?,
                serde_yaml::to_value(&c.service)?,
                serde_yaml::to_value(&c.headless)?,
                serde_yaml::to_value(&c.pdb)?,
                serde_yaml::to_value(&c.network_policy)?,
            ] {
                out.push_str("---\n");
                out.push_str(&serde_yaml::to_string(&obj)?);
            }
        }
    }
    print!("{out}");
    Ok(())
}

use serde::Deserialize as _;
