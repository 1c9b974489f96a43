//! Desired children of a TenantModel (pure: no API calls).
//!
//! ```text
//!  TenantModel ──render──► PipelineConfig ──► ConfigMap <name>-pipeline (blue) or
//!                                              <name>-pipeline-green (+ its hash)
//!              ──────────► Deployment <name>-<colour> (hardened pod, config hash in the template);
//!                          during a blue/green upgrade one per colour (see `crate::upgrade`)
//!              ──────────► ServiceAccount, Service <name>, Service <name>-pods (headless),
//!                          PodDisruptionBudget, NetworkPolicy
//! ```
//! Every child carries the TenantModel's labels and a controller owner reference, so
//! deleting the TenantModel garbage-collects it.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, EphemeralVolumeSource, HTTPGetAction, KeyToPath, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration,
    TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use streamscore_crds::pipeline::{ModelConfig, PipelineConfig, RuntimeConfig, StateConfig};
use streamscore_crds::tenantmodel::{child_labels, TenantModel};

/// Worker HTTP port (health, metrics, query API).
pub const WORKER_PORT: i32 = 8080;
/// Worker admin port (drain, resume, status: the operator's rescale); the NetworkPolicy admits
/// only the operator to it.
pub const ADMIN_PORT: i32 = 8090;
/// Worker metrics port (`/metrics` only); the NetworkPolicy opens it to the scrapers of
/// [`BuildContext::metrics_from`].
pub const METRICS_PORT: i32 = 9090;
/// Where the pipeline ConfigMap is mounted.
pub const PIPELINE_DIR: &str = "/etc/streamscore/pipeline";
/// Where a model from a ConfigMap is mounted.
pub const MODEL_DIR: &str = "/etc/streamscore/model";
/// Size limit of the worker's `/tmp` (an emptyDir: nothing large is written there).
pub const TMP_SIZE_LIMIT: &str = "1Gi";
/// Size of the state volume when `spec.state.size` is not set.
pub const DEFAULT_STATE_SIZE: &str = "10Gi";
/// Where state lives.
pub const STATE_DIR: &str = "/var/lib/streamscore/state";
/// Where Kafka Secrets are mounted (one directory per Secret).
pub const SECRETS_DIR: &str = "/var/run/secrets/streamscore/kafka";
/// Where the checkpoint store's credentials Secret is mounted (`state.credentialsDir`).
pub const CHECKPOINT_SECRET_DIR: &str = "/var/run/secrets/streamscore/checkpoint";

/// Settings of the operator that shape children.
#[derive(Clone, Debug)]
pub struct BuildContext {
    /// Worker image when the spec names none.
    pub default_image: String,
    /// Namespace the operator runs in (NetworkPolicy admits it to the admin port).
    pub operator_namespace: String,
    /// Kafka prefix of the TenantModel's namespace (`TenantPolicy::kafka_prefix_for`): the
    /// default consumer group starts with it.
    pub kafka_prefix: Option<String>,
    /// Requests and limits of a worker container when the TenantModel sets none (Helm
    /// `workerResources`).
    pub default_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Egress the workers' NetworkPolicy allows (Helm `workerNetworkPolicy.egress`); `None`: the
    /// policy restricts ingress only.
    pub worker_egress: Option<WorkerEgress>,
    /// Who may scrape the workers' metrics port (Helm `workerNetworkPolicy.metricsFrom`, as
    /// NetworkPolicyPeers); `None`: any pod in any namespace.
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,
    /// Scheduling and identity the platform gives every worker pod (Helm `workerPodTemplate`).
    pub worker_pod_template: WorkerPodTemplate,
}

/// What the platform team sets on every worker pod (Helm `workerPodTemplate`, operator flag
/// `--worker-pod-template` as JSON): where workers run, how they spread, their priority, the
/// registry credentials, and annotations of the worker ServiceAccount (workload identity). In
/// `serviceAccountAnnotations` and `podAnnotations` values, `{namespace}` and `{name}` stand for
/// the TenantModel's namespace and name (one cloud role per tenant). Labels and annotations
/// never replace the operator's own.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerPodTemplate {
    /// Node labels a worker pod's node must have.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints worker pods tolerate (dedicated nodes).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// How a TenantModel's workers spread over zones or nodes; a constraint without a
    /// `labelSelector` selects the TenantModel's own workers of one colour.
    #[serde(default)]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of worker pods.
    #[serde(default)]
    pub priority_class_name: Option<String>,
    /// Secrets of the TenantModel's namespace for pulling the worker image (they must exist in
    /// every tenant namespace).
    #[serde(default)]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Annotations of each TenantModel's worker ServiceAccount, e.g.
    /// `eks.amazonaws.com/role-arn: arn:aws:iam::123:role/streamscore-{namespace}-{name}` or
    /// `iam.gke.io/gcp-service-account`.
    #[serde(default)]
    pub service_account_annotations: BTreeMap<String, String>,
    /// Extra annotations of worker pods.
    #[serde(default)]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra labels of worker pods (e.g. for the platform's own NetworkPolicies or cost reports).
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
}

impl WorkerPodTemplate {
    /// `{namespace}` and `{name}` replaced by `tm`'s.
    fn expand(tm: &TenantModel, values: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let ns = tm.namespace().unwrap_or_default();
        let name = tm.name_any();
        values.iter().map(|(k, v)| (k.clone(), v.replace("{namespace}", &ns).replace("{name}", &name))).collect()
    }
}

/// `extra` added to `base`, never replacing a key `base` has.
fn add_missing(base: &mut BTreeMap<String, String>, extra: BTreeMap<String, String>) {
    for (k, v) in extra {
        base.entry(k).or_insert(v);
    }
}

/// Where worker pods may connect to (Helm `workerNetworkPolicy.egress`, operator flag
/// `--worker-egress` as JSON): DNS, the ports of the TenantModel's Kafka bootstrap servers,
/// the object store's ports when it uses one (`checkpointStore`, an `s3://`, `gs://` or `az://`
/// `model.uri`), and `extraRules`. Nothing else: not the API server, not other tenants'
/// services, not the internet.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerEgress {
    /// Destinations (CIDRs) of the Kafka ports; empty: any address on those ports.
    #[serde(default, rename = "kafkaCIDRs")]
    pub kafka_cidrs: Vec<String>,
    /// Ports of the Kafka brokers besides those named in the bootstrap servers (brokers may
    /// advertise other ports than the bootstrap address).
    #[serde(default)]
    pub kafka_ports: Vec<i32>,
    /// Ports of the object store (default 443).
    #[serde(default = "https_port")]
    pub object_store_ports: Vec<i32>,
    /// Destinations (CIDRs) of the object-store ports; empty: any address on those ports.
    #[serde(default, rename = "objectStoreCIDRs")]
    pub object_store_cidrs: Vec<String>,
    /// Further egress rules, as Kubernetes `NetworkPolicyEgressRule`s.
    #[serde(default)]
    pub extra_rules: Vec<NetworkPolicyEgressRule>,
}

fn https_port() -> Vec<i32> {
    vec![443]
}

impl Default for WorkerEgress {
    fn default() -> Self {
        Self {
            kafka_cidrs: Vec::new(),
            kafka_ports: Vec::new(),
            object_store_ports: https_port(),
            object_store_cidrs: Vec::new(),
            extra_rules: Vec::new(),
        }
    }
}

/// The TCP ports named in a `host:port,host:port` bootstrap list.
fn bootstrap_ports(servers: &str) -> BTreeSet<i32> {
    servers
        .split(',')
        .filter_map(|s| s.trim().rsplit_once(':')?.1.parse::<i32>().ok())
        .filter(|p| (1..=65_535).contains(p))
        .collect()
}

/// The egress rules of a TenantModel's workers under `e` (see [`WorkerEgress`]).
fn egress_rules(tm: &TenantModel, e: &WorkerEgress) -> Vec<NetworkPolicyEgressRule> {
    let port = |p: i32, protocol: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some(protocol.into()),
        ..NetworkPolicyPort::default()
    };
    let to = |cidrs: &[String]| {
        (!cidrs.is_empty()).then(|| {
            cidrs
                .iter()
                .map(|c| NetworkPolicyPeer {
                    ip_block: Some(IPBlock { cidr: c.clone(), except: None }),
                    ..NetworkPolicyPeer::default()
                })
                .collect()
        })
    };
    let s = &tm.spec;
    let mut rules = vec![NetworkPolicyEgressRule { to: None, ports: Some(vec![port(53, "UDP"), port(53, "TCP")]) }];
    let mut kafka = bootstrap_ports(&s.source.bootstrap_servers);
    kafka.extend(bootstrap_ports(&s.sink.bootstrap_servers));
    kafka.extend(e.kafka_ports.iter().copied());
    if !kafka.is_empty() {
        rules.push(NetworkPolicyEgressRule {
            to: to(&e.kafka_cidrs),
            ports: Some(kafka.into_iter().map(|p| port(p, "TCP")).collect()),
        });
    }
    let remote_model =
        s.model.uri.as_deref().is_some_and(|u| ["s3://", "gs://", "az://"].iter().any(|p| u.starts_with(p)));
    if (s.checkpoint_store.as_deref().is_some_and(|c| !c.starts_with("file://")) || remote_model)
        && !e.object_store_ports.is_empty()
    {
        rules.push(NetworkPolicyEgressRule {
            to: to(&e.object_store_cidrs),
            ports: Some(e.object_store_ports.iter().map(|p| port(*p, "TCP")).collect()),
        });
    }
    // The query port of the TenantModel's own workers: a query for a key another worker owns
    // is forwarded to it.
    rules.push(NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer { pod_selector: Some(all_workers(tm)), ..NetworkPolicyPeer::default() }]),
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(WORKER_PORT)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }]),
    });
    rules.extend(e.extra_rules.iter().cloned());
    rules
}

/// Everything the operator applies for one TenantModel.
#[derive(Clone, Debug)]
pub struct Children {
    /// Rendered pipeline configuration.
    pub pipeline: PipelineConfig,
    /// SHA-256 of the pipeline text and the model digest (in the pod template).
    pub config_hash: String,
    /// The live colour's pipeline ConfigMap ([`config_map_name`]).
    pub config_map: ConfigMap,
    /// `<name>-<colour>`.
    pub deployment: Deployment,
    /// `<name>-worker`.
    pub service_account: ServiceAccount,
    /// `<name>` (query API).
    pub service: Service,
    /// `<name>-pods` (headless).
    pub headless: Service,
    /// `<name>`.
    pub pdb: PodDisruptionBudget,
    /// `<name>`.
    pub network_policy: NetworkPolicy,
}

/// The colour of a TenantModel's first workers; upgrades alternate blue and green.
pub const FIRST_COLOR: &str = "blue";

/// Name of a colour's pipeline ConfigMap: `<name>-pipeline` (blue), `<name>-pipeline-green`.
pub fn config_map_name(name: &str, color: &str) -> String {
    if color == "blue" {
        format!("{name}-pipeline")
    } else {
        format!("{name}-pipeline-{color}")
    }
}

/// A colour's pipeline ConfigMap and worker Deployment.
#[derive(Clone, Debug)]
pub struct Colour {
    /// SHA-256 of the pipeline text (without the cut-over barrier) and the model digest.
    pub config_hash: String,
    /// The pipeline ConfigMap.
    pub config_map: ConfigMap,
    /// The worker Deployment.
    pub deployment: Deployment,
}

/// Builds `color`'s ConfigMap and Deployment running `pipeline`.
pub fn colour(tm: &TenantModel, ctx: &BuildContext, color: &str, pipeline: &PipelineConfig) -> Colour {
    let pipeline_yaml = serde_yaml::to_string(pipeline).expect("pipeline serializes");
    // The cut-over barrier is told to running workers through their admin API: setting it in
    // the ConfigMap (for restarts) must not restart them.
    let mut hashed = pipeline.clone();
    if let Some(sh) = hashed.shadow.as_mut() {
        sh.live_from = None;
    }
    let config_hash = {
        let mut h = Sha256::new();
        h.update(serde_yaml::to_string(&hashed).expect("pipeline serializes").as_bytes());
        h.update(tm.spec.model.sha256.as_bytes());
        hex::encode(&h.finalize()[..16])
    };
    let config_map = ConfigMap {
        metadata: meta(tm, config_map_name(&tm.name_any(), color), &[("streamscore.io/color", color)]),
        data: Some(BTreeMap::from([("pipeline.yaml".to_owned(), pipeline_yaml)])),
        ..ConfigMap::default()
    };
    let deployment = deployment(tm, ctx, &config_hash, color, &pipeline.model.version);
    Colour { config_hash, config_map, deployment }
}

/// Name of the consumer group of a TenantModel when the spec leaves it empty:
/// `streamscore.<namespace>.<name>`, or `<prefix>streamscore.<name>` under a Kafka prefix.
pub fn default_group_id(tm: &TenantModel, kafka_prefix: Option<&str>) -> String {
    match kafka_prefix {
        Some(p) => format!("{p}streamscore.{}", tm.name_any()),
        None => format!("streamscore.{}.{}", tm.namespace().unwrap_or_default(), tm.name_any()),
    }
}

/// Path of the model file inside the worker.
pub fn model_path(tm: &TenantModel) -> String {
    match (&tm.spec.model.config_map, &tm.spec.model.uri) {
        (Some(cm), _) => format!("{MODEL_DIR}/{}", cm.key),
        (None, Some(uri)) => uri.strip_prefix("file://").unwrap_or(uri).to_owned(),
        (None, None) => String::new(),
    }
}

/// The worker pipeline configuration a TenantModel renders to.
pub fn render_pipeline(tm: &TenantModel, kafka_prefix: Option<&str>) -> PipelineConfig {
    let s = &tm.spec;
    let mut source = s.source.clone();
    if source.group_id.is_empty() {
        source.group_id = default_group_id(tm, kafka_prefix);
    }
    PipelineConfig {
        source,
        validation: s.validation.clone(),
        features: s.features.clone(),
        model: ModelConfig {
            path: model_path(tm),
            sha256: s.model.sha256.clone(),
            version: s.model.version.clone(),
            signature: s.model.signature.clone(),
        },
        postprocess: s.postprocess.clone(),
        sink: s.sink.clone(),
        runtime: RuntimeConfig {
            state_dir: STATE_DIR.into(),
            http_listen: format!("0.0.0.0:{WORKER_PORT}"),
            admin_listen: Some(format!("0.0.0.0:{ADMIN_PORT}")),
            metrics_listen: Some(format!("0.0.0.0:{METRICS_PORT}")),
            ..RuntimeConfig::default()
        },
        state: render_state(tm),
        shadow: None,
    }
}

/// The worker's state settings: checkpoints under `<checkpointStore>/<namespace>/<name>`, so
/// that two TenantModels given the same store never share checkpoints.
fn render_state(tm: &TenantModel) -> StateConfig {
    let st = &tm.spec.state;
    let d = StateConfig::default();
    StateConfig {
        checkpoint_store: tm
            .spec
            .checkpoint_store
            .as_ref()
            .map(|u| format!("{}/{}/{}", u.trim_end_matches('/'), tm.namespace().unwrap_or_default(), tm.name_any())),
        seed_store: None,
        credentials_dir: tm.spec.checkpoint_secret.as_ref().map(|_| CHECKPOINT_SECRET_DIR.to_owned()),
        checkpoint_interval: st.checkpoint_interval.unwrap_or(d.checkpoint_interval),
        retain_checkpoints: st.retain_checkpoints.unwrap_or(d.retain_checkpoints),
        missing_checkpoint: st.missing_checkpoint.unwrap_or(d.missing_checkpoint),
    }
}

fn owner(tm: &TenantModel) -> OwnerReference {
    tm.controller_owner_ref(&()).expect("TenantModel from the API server has a uid")
}

fn meta(tm: &TenantModel, name: String, extra: &[(&str, &str)]) -> ObjectMeta {
    let mut labels = child_labels(&tm.name_any());
    for (k, v) in extra {
        labels.insert((*k).into(), (*v).into());
    }
    ObjectMeta {
        name: Some(name),
        namespace: tm.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner(tm)]),
        ..ObjectMeta::default()
    }
}

fn selector(tm: &TenantModel, color: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("streamscore.io/tenantmodel".to_owned(), tm.name_any()),
        ("streamscore.io/color".to_owned(), color.to_owned()),
    ])
}

/// Label selector (string form) of the live workers, for the scale subresource.
pub fn selector_string(tm: &TenantModel, color: &str) -> String {
    selector(tm, color).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Builds every child for a TenantModel whose live workers are `color` running `pipeline`
/// (the rendered spec for a new TenantModel). `tm` must come from the API server (it needs a uid).
pub fn build(tm: &TenantModel, ctx: &BuildContext) -> Children {
    build_live(tm, ctx, FIRST_COLOR, render_pipeline(tm, ctx.kafka_prefix.as_deref()))
}

/// [`build`] for the live colour `color` running `pipeline`.
pub fn build_live(tm: &TenantModel, ctx: &BuildContext, color: &str, pipeline: PipelineConfig) -> Children {
    let name = tm.name_any();
    let Colour { config_hash, config_map, deployment } = colour(tm, ctx, color, &pipeline);
    let mut sa_meta = meta(tm, format!("{name}-worker"), &[]);
    let sa_annotations = WorkerPodTemplate::expand(tm, &ctx.worker_pod_template.service_account_annotations);
    if !sa_annotations.is_empty() {
        sa_meta.annotations = Some(sa_annotations);
    }
    let service_account =
        ServiceAccount { metadata: sa_meta, automount_service_account_token: Some(false), ..ServiceAccount::default() };
    let (service, headless) = services(tm, color);
    Children {
        pipeline,
        config_hash,
        config_map,
        deployment,
        service_account,
        service,
        headless,
        pdb: pdb(tm),
        network_policy: network_policy(tm, ctx),
    }
}

/// All of a TenantModel's worker pods, whatever their colour.
fn all_workers(tm: &TenantModel) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([("streamscore.io/tenantmodel".to_owned(), tm.name_any())])),
        ..LabelSelector::default()
    }
}

/// The query API's Service (the live colour's pods) and the headless Service of every worker
/// pod (`<name>-pods`, not-ready ones included: the operator asks them why).
fn services(tm: &TenantModel, color: &str) -> (Service, Service) {
    let name = tm.name_any();
    let port = ServicePort {
        name: Some("http".into()),
        port: WORKER_PORT,
        target_port: Some(IntOrString::String("http".into())),
        ..ServicePort::default()
    };
    let service = Service {
        metadata: meta(tm, name.clone(), &[]),
        spec: Some(ServiceSpec {
            selector: Some(selector(tm, color)),
            ports: Some(vec![port.clone()]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let headless = Service {
        metadata: meta(tm, format!("{name}-pods"), &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: all_workers(tm).match_labels,
            ports: Some(vec![port]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    (service, headless)
}

/// At most one worker down at a time by voluntary disruptions (node drains).
fn pdb(tm: &TenantModel) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(tm, tm.name_any(), &[]),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(all_workers(tm)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The workers' isolation: the query API from their own namespace; the query and admin APIs
/// from the operator; metrics from the scrapers (`metrics_from`, default any namespace);
/// egress (when the platform enables it) to DNS, the brokers and the object store only.
fn network_policy(tm: &TenantModel, ctx: &BuildContext) -> NetworkPolicy {
    let ns_peer = |ns: &str, pod_labels: Option<BTreeMap<String, String>>| NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())])),
            ..LabelSelector::default()
        }),
        pod_selector: pod_labels.map(|l| LabelSelector { match_labels: Some(l), ..LabelSelector::default() }),
        ..NetworkPolicyPeer::default()
    };
    let http_port = NetworkPolicyPort {
        port: Some(IntOrString::Int(WORKER_PORT)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    let admin_port = NetworkPolicyPort { port: Some(IntOrString::Int(ADMIN_PORT)), ..http_port.clone() };
    let metrics_port = NetworkPolicyPort { port: Some(IntOrString::Int(METRICS_PORT)), ..http_port.clone() };
    let any_namespace =
        NetworkPolicyPeer { namespace_selector: Some(LabelSelector::default()), ..NetworkPolicyPeer::default() };
    let operator_pods =
        Some(BTreeMap::from([("app.kubernetes.io/name".to_owned(), "streamscore-operator".to_owned())]));
    NetworkPolicy {
        metadata: meta(tm, tm.name_any(), &[]),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(all_workers(tm)),
            policy_types: Some(if ctx.worker_egress.is_some() {
                vec!["Ingress".into(), "Egress".into()]
            } else {
                vec!["Ingress".into()]
            }),
            egress: ctx.worker_egress.as_ref().map(|e| egress_rules(tm, e)),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![ns_peer(&tm.namespace().unwrap_or_default(), None)]),
                    ports: Some(vec![http_port.clone()]),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![ns_peer(&ctx.operator_namespace, operator_pods)]),
                    ports: Some(vec![http_port, admin_port]),
                },
                NetworkPolicyIngressRule {
                    from: Some(ctx.metrics_from.clone().unwrap_or_else(|| vec![any_namespace])),
                    ports: Some(vec![metrics_port]),
                },
            ]),
        }),
    }
}

/// The worker pod's volumes and the container's mounts: its pipeline ConfigMap, a small /tmp,
/// the state volume, the model ConfigMap, and the Secrets the spec names (read-only).
fn volumes(tm: &TenantModel, color: &str) -> (Vec<Volume>, Vec<VolumeMount>) {
    let name = tm.name_any();
    let s = &tm.spec;
    let mut volumes = vec![
        Volume {
            name: "pipeline".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(&name, color),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(TMP_SIZE_LIMIT.into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        state_volume(tm),
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "pipeline".into(),
            mount_path: PIPELINE_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
        VolumeMount { name: "state".into(), mount_path: STATE_DIR.into(), ..VolumeMount::default() },
    ];
    if let Some(cm) = &s.model.config_map {
        volumes.push(Volume {
            name: "model".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.name.clone(),
                items: Some(vec![KeyToPath { key: cm.key.clone(), path: cm.key.clone(), mode: None }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: MODEL_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    for (i, sec) in s.kafka_secrets.iter().enumerate() {
        let vname = format!("kafka-secret-{i}");
        volumes.push(Volume {
            name: vname.clone(),
            secret: Some(SecretVolumeSource { secret_name: Some(sec.name.clone()), ..SecretVolumeSource::default() }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: vname,
            mount_path: format!("{SECRETS_DIR}/{}", sec.name),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(sec) = &s.checkpoint_secret {
        volumes.push(Volume {
            name: "checkpoint-secret".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(sec.name.clone()), ..SecretVolumeSource::default() }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "checkpoint-secret".into(),
            mount_path: CHECKPOINT_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// The worker container: image, arguments, the pod name for the exactly-once producer's
/// identity, ports, probes, resources, and a locked-down security context.
fn worker_container(tm: &TenantModel, ctx: &BuildContext, mounts: Vec<VolumeMount>) -> Container {
    let s = &tm.spec;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    Container {
        name: "worker".into(),
        image: Some(s.image.clone().unwrap_or_else(|| ctx.default_image.clone())),
        args: Some(vec!["--pipeline".into(), format!("{PIPELINE_DIR}/pipeline.yaml")]),
        env: Some(vec![
            EnvVar { name: "STREAMSCORE_LOG_FORMAT".into(), value: Some("json".into()), ..EnvVar::default() },
            EnvVar { name: "RUST_LOG".into(), value: Some("info".into()), ..EnvVar::default() },
            // The query address each worker advertises in the consumer group (its client.id):
            // any worker forwards a query to the key's owner.
            EnvVar {
                name: "STREAMSCORE_POD_IP".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "status.podIP".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            // The exactly-once producer's identity: a restarted container keeps its pod's name
            // and so fences (aborts) the transaction its predecessor left open.
            EnvVar {
                name: "STREAMSCORE_POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: WORKER_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 6)),
        resources: s.resources.clone().or_else(|| ctx.default_resources.clone()),
        volume_mounts: Some(mounts),
        // The worker writes `Reason: message` to /dev/termination-log when it stops (the
        // operator's `pods::WORKER_REASONS`); a panic leaves the file empty and its log's tail
        // becomes the message.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn deployment(tm: &TenantModel, ctx: &BuildContext, config_hash: &str, color: &str, version: &str) -> Deployment {
    let name = tm.name_any();
    let s = &tm.spec;
    let pt = &ctx.worker_pod_template;
    let mut pod_labels = child_labels(&name);
    pod_labels.extend(selector(tm, color));
    add_missing(&mut pod_labels, pt.pod_labels.clone());
    let mut pod_annotations = BTreeMap::from([
        ("streamscore.io/config-hash".to_owned(), config_hash.to_owned()),
        ("streamscore.io/model-version".to_owned(), version.to_owned()),
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    add_missing(&mut pod_annotations, WorkerPodTemplate::expand(tm, &pt.pod_annotations));
    // A spread constraint without a selector spreads this TenantModel's workers of this colour.
    let spread: Vec<TopologySpreadConstraint> = pt
        .topology_spread_constraints
        .iter()
        .cloned()
        .map(|mut c| {
            if c.label_selector.is_none() {
                c.label_selector =
                    Some(LabelSelector { match_labels: Some(selector(tm, color)), ..LabelSelector::default() });
            }
            c
        })
        .collect();
    let (volumes, mounts) = volumes(tm, color);
    let container = worker_container(tm, ctx, mounts);
    Deployment {
        metadata: meta(tm, format!("{name}-{color}"), &[("streamscore.io/color", color)]),
        spec: Some(DeploymentSpec {
            replicas: Some(s.parallelism),
            selector: LabelSelector { match_labels: Some(selector(tm, color)), ..LabelSelector::default() },
            // Workers own partitions: never run old and new pods of one colour side by side.
            strategy: Some(DeploymentStrategy { type_: Some("Recreate".into()), ..DeploymentStrategy::default() }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(format!("{name}-worker")),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(60),
                    node_selector: Some(pt.node_selector.clone()).filter(|m| !m.is_empty()),
                    tolerations: Some(pt.tolerations.clone()).filter(|t| !t.is_empty()),
                    affinity: pt.affinity.clone(),
                    topology_spread_constraints: Some(spread).filter(|t| !t.is_empty()),
                    priority_class_name: pt.priority_class_name.clone(),
                    image_pull_secrets: Some(pt.image_pull_secrets.clone()).filter(|t| !t.is_empty()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn state_volume(tm: &TenantModel) -> Volume {
    let st = &tm.spec.state;
    match &st.storage_class {
        Some(class) => Volume {
            name: "state".into(),
            ephemeral: Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: None,
                    spec: PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        storage_class_name: Some(class.clone()),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([(
                                "storage".to_owned(),
                                Quantity(st.size.clone().unwrap_or_else(|| DEFAULT_STATE_SIZE.into())),
                            )])),
                            ..VolumeResourceRequirements::default()
                        }),
                        ..PersistentVolumeClaimSpec::default()
                    },
                }),
            }),
            ..Volume::default()
        },
        None => Volume {
            name: "state".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(st.size.clone().unwrap_or_else(|| DEFAULT_STATE_SIZE.into()))),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> TenantModel {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fraud-detection.yaml");
        let mut tm: TenantModel = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tm.metadata.namespace = Some("payments".into());
        tm.metadata.uid = Some("0c5b7a1e-0000-4000-8000-000000000000".into());
        tm
    }

    fn ports(r: &NetworkPolicyEgressRule) -> Vec<(i32, String)> {
        r.ports
            .iter()
            .flatten()
            .map(|p| {
                let n = match p.port {
                    Some(IntOrString::Int(n)) => n,
                    _ => 0,
                };
                (n, p.protocol.clone().unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn workers_may_reach_dns_their_kafka_ports_their_object_store_and_their_peers_only() {
        let mut tm = example();
        tm.spec.sink.bootstrap_servers = "out-a:9093, out-b:9093".into();
        let ctx = BuildContext {
            default_image: "streamscore-worker:0.1.0".into(),
            operator_namespace: "streamscore-system".into(),
            kafka_prefix: None,
            default_resources: None,
            worker_egress: Some(WorkerEgress { kafka_cidrs: vec!["10.1.0.0/16".into()], ..WorkerEgress::default() }),
            metrics_from: None,
            worker_pod_template: Default::default(),
        };
        let spec = build(&tm, &ctx).network_policy.spec.unwrap();
        assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 3, "query API, operator, metrics scrapers");
        let egress = spec.egress.unwrap();
        let tcp = |n: i32| (n, "TCP".to_owned());
        assert_eq!(ports(&egress[0]), [(53, "UDP".to_owned()), tcp(53)]);
        assert_eq!(egress[0].to, None);
        assert_eq!(ports(&egress[1]), [tcp(9092), tcp(9093)], "source and sink bootstrap ports");
        assert_eq!(egress[1].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "10.1.0.0/16");
        assert_eq!(ports(&egress[2]), [tcp(443)], "the checkpoint store");
        assert_eq!(ports(&egress[3]), [tcp(WORKER_PORT)], "the query port of the TenantModel's own workers");
        let peers = egress[3].to.as_ref().unwrap();
        assert_eq!(peers[0].pod_selector, Some(all_workers(&tm)));
        assert_eq!(peers[0].namespace_selector, None, "in the TenantModel's namespace only");
        assert_eq!(egress.len(), 4);
        // No object store: no rule for it.
        tm.spec.checkpoint_store = None;
        assert_eq!(build(&tm, &ctx).network_policy.spec.unwrap().egress.unwrap().len(), 3);
        // Egress rules off: ingress only.
        let off = BuildContext { worker_egress: None, ..ctx };
        let spec = build(&tm, &off).network_policy.spec.unwrap();
        assert_eq!((spec.policy_types.unwrap(), spec.egress), (vec!["Ingress".to_owned()], None));
        // The chart's flag value parses; unknown keys are refused.
        let e: WorkerEgress = serde_json::from_str(r#"{"kafkaCIDRs":["10.0.0.0/8"],"kafkaPorts":[9094]}"#).unwrap();
        assert_eq!((e.kafka_ports, e.object_store_ports), (vec![9094], vec![443]));
        assert!(serde_json::from_str::<WorkerEgress>(r#"{"kafkaCidr":[]}"#).is_err());
    }
}
