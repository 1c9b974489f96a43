//! What a TenantModel may reference beyond its own spec, as the platform team configured it
//! (Helm values `tenantPolicy.*` → operator flags). Pure checks; the reconcile fetches what
//! they need (the Secrets' metadata) and reports a refusal as `Degraded` with the reason.
//!
//! ```text
//!  spec.image ──────────► check_image (allowlist, optional digest pin)  ─► ImageNotAllowed
//!  spec.kafkaSecrets[] ─► Secret metadata ─► check_secret (opt-in label) ─► KafkaSecretNotPermitted
//!  spec.checkpointSecret ─► the same ─► CheckpointSecretNotFound / CheckpointSecretNotPermitted
//!  topics, groupId ─────► check_kafka_names (per-namespace prefix)     ─► KafkaNameNotAllowed
//!  spec.resources ──────► check_resources (platform maximum per worker)  ─► ResourcesNotAllowed
//! ```
//! A TenantModel author can create TenantModels but not necessarily read Secrets or run pods:
//! without these checks a TenantModel would mount any Secret of its namespace into a pod
//! running any image, i.e. read every Secret of the namespace.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Label a Secret must carry (with value `"true"`) before a TenantModel may mount it.
/// Set by the platform team, who may read and label the namespace's Secrets.
pub const SECRET_OPT_IN_LABEL: &str = "streamscore.io/tenant-access";

/// One entry of the image allowlist: an exact image reference, or a prefix followed by `*`
/// right after `/` (any image under that path), `:` (any tag of that repository) or `@` (any
/// digest of that repository). Images are compared as written, without normalisation
/// (`streamscore-worker:1` does not match `docker.io/library/streamscore-worker:*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagePattern {
    text: String,
}

impl FromStr for ImagePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("image pattern {s:?}: must be a non-empty image reference without spaces"));
        }
        if let Some(pos) = s.find('*') {
            let prefix = &s[..pos];
            if pos != s.len() - 1 || !(prefix.ends_with('/') || prefix.ends_with(':') || prefix.ends_with('@')) {
                return Err(format!(
                    "image pattern {s:?}: `*` may only end the pattern, right after `/`, `:` or `@` \
                     (e.g. `registry.example.com/streamscore/*`)"
                ));
            }
            if prefix.len() == 1 {
                return Err(format!("image pattern {s:?}: needs a registry or repository before the `*`"));
            }
        }
        Ok(Self { text: s.to_owned() })
    }
}

impl fmt::Display for ImagePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ImagePattern {
    /// Whether `image` matches. A tag or digest wildcard (`…:*`, `…@*`) never matches a `/`:
    /// `worker:5000/evil/image` names the registry `worker:5000`, not a tag of `worker`.
    pub fn matches(&self, image: &str) -> bool {
        match self.text.strip_suffix('*') {
            None => self.text == image,
            Some(prefix) => image.strip_prefix(prefix).is_some_and(|rest| {
                !rest.is_empty()
                    && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
                    && (prefix.ends_with('/') || !rest.contains('/'))
            }),
        }
    }
}

/// The platform team's rules for TenantModels.
#[derive(Clone, Debug, Default)]
pub struct TenantPolicy {
    /// Images a TenantModel may name in `spec.image` (besides the operator's default worker
    /// image). Empty: only the default.
    pub allowed_images: Vec<ImagePattern>,
    /// `spec.image` must be pinned by digest (`…@sha256:<64 hex>`).
    pub require_image_digest: bool,
    /// Prefix every Kafka topic and consumer group of a TenantModel must start with; `{namespace}`
    /// stands for the TenantModel's namespace (e.g. `{namespace}.`). None: no restriction. On a
    /// shared cluster without ACLs this keeps one tenant from joining another's group or writing
    /// to its topics.
    pub kafka_prefix: Option<String>,
    /// The most a worker container may request or be limited to, per resource (`cpu`,
    /// `memory`, `ephemeral-storage`). Empty: no maximum.
    pub max_resources: BTreeMap<String, String>,
}

/// A Kubernetes quantity (`500m`, `2`, `1.5`, `512Mi`, `1G`, `1e3`) in base units.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, factor) = suffixes.iter().find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f))).unwrap_or((q, 1.0));
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v * factor)
}

/// Whether `image` ends in `@sha256:<64 lowercase hex>`.
pub fn is_digest_pinned(image: &str) -> bool {
    image.rsplit_once("@sha256:").is_some_and(|(repo, hex)| {
        !repo.is_empty() && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The Kafka names of a TenantModel: (field, name), the consumer group only when set.
fn kafka_names(tm: &streamscore_crds::tenantmodel::TenantModel) -> Vec<(String, &str)> {
    let s = &tm.spec;
    let mut names: Vec<(String, &str)> =
        s.source.topics.iter().enumerate().map(|(i, t)| (format!("spec.source.topics[{i}]"), t.as_str())).collect();
    if !s.source.group_id.is_empty() {
        names.push(("spec.source.groupId".into(), &s.source.group_id));
    }
    names.push(("spec.sink.topic".into(), &s.sink.topic));
    names.push(("spec.sink.deadLetterTopic".into(), &s.sink.dead_letter_topic));
    if let Some(t) = &s.sink.feature_topic {
        names.push(("spec.sink.featureTopic".into(), t));
    }
    for (i, l) in s.features.lookups.iter().enumerate() {
        names.push((format!("spec.features.lookups[{i}].topic"), &l.topic));
    }
    names
}

impl TenantPolicy {
    /// The Kafka prefix for namespace `ns`, if one is configured.
    pub fn kafka_prefix_for(&self, ns: &str) -> Option<String> {
        self.kafka_prefix.as_ref().filter(|p| !p.is_empty()).map(|p| p.replace("{namespace}", ns))
    }

    /// Checks the worker's requests and limits (`spec.resources`, when set) against the
    /// platform's maximum.
    pub fn check_resources(&self, tm: &streamscore_crds::tenantmodel::TenantModel) -> Vec<String> {
        let Some(r) = &tm.spec.resources else { return Vec::new() };
        let mut errs = Vec::new();
        for (kind, values) in [("requests", &r.requests), ("limits", &r.limits)] {
            for (name, q) in values.iter().flatten() {
                let Some(max) = self.max_resources.get(name) else { continue };
                match (parse_quantity(&q.0), parse_quantity(max)) {
                    (Some(v), Some(m)) if v > m => errs.push(format!(
                        "spec.resources.{kind}.{name}: {} is above the platform's maximum per worker ({max})",
                        q.0
                    )),
                    (None, _) => errs.push(format!("spec.resources.{kind}.{name}: {:?} is not a quantity", q.0)),
                    _ => {}
                }
            }
        }
        errs
    }

    /// Checks that every topic and the consumer group of `tm` (in namespace `ns`) start with
    /// the namespace's prefix. The default group (`<prefix>streamscore.<name>`) always does.
    pub fn check_kafka_names(&self, tm: &streamscore_crds::tenantmodel::TenantModel, ns: &str) -> Vec<String> {
        let Some(prefix) = self.kafka_prefix_for(ns) else { return Vec::new() };
        kafka_names(tm)
            .into_iter()
            .filter(|(_, name)| !name.starts_with(&prefix))
            .map(|(field, name)| {
                format!(
                    "{field}: {name:?} must start with {prefix:?}: the platform team gives each namespace its own Kafka \
                     topics and consumer groups"
                )
            })
            .collect()
    }
    /// Checks `spec.image`. No image, or the operator's own default image, is always allowed.
    pub fn check_image(&self, image: Option<&str>, default_image: &str) -> Result<(), String> {
        let Some(image) = image else { return Ok(()) };
        if image == default_image {
            return Ok(());
        }
        if self.require_image_digest && !is_digest_pinned(image) {
            return Err(format!(
                "spec.image: {image:?} must be pinned by digest (`<repository>@sha256:<64 hex digits>`): the operator \
                 requires digests"
            ));
        }
        if self.allowed_images.iter().any(|p| p.matches(image)) {
            return Ok(());
        }
        let allowed = if self.allowed_images.is_empty() {
            format!("only the default worker image {default_image:?} is allowed")
        } else {
            let list: Vec<String> = self.allowed_images.iter().map(ToString::to_string).collect();
            format!("allowed: {default_image:?} and {}", list.join(", "))
        };
        Err(format!("spec.image: {image:?} is not in the operator's image allowlist ({allowed})"))
    }
}

/// Checks the labels of a Secret named in `spec.kafkaSecrets[index]`.
pub fn check_secret(field: &str, name: &str, labels: Option<&BTreeMap<String, String>>) -> Result<(), String> {
    if labels.and_then(|l| l.get(SECRET_OPT_IN_LABEL)).map(String::as_str) == Some("true") {
        Ok(())
    } else {
        Err(format!(
            "{field}: Secret {name:?} is not open to TenantModels: the platform team must label it \
             {SECRET_OPT_IN_LABEL}=true"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(patterns: &[&str], digest: bool) -> TenantPolicy {
        TenantPolicy {
            allowed_images: patterns.iter().map(|p| p.parse().unwrap()).collect(),
            require_image_digest: digest,
            kafka_prefix: None,
            max_resources: BTreeMap::new(),
        }
    }

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn patterns_must_end_in_a_wildcard_after_a_separator() {
        for ok in ["reg.example.com/team/*", "reg.example.com/worker:*", "reg.example.com/worker@*", "worker:1.2"] {
            assert!(ok.parse::<ImagePattern>().is_ok(), "{ok}");
        }
        for bad in ["*", "/*", "reg.example.com/team*", "reg/*/worker", "reg/a b:1", ""] {
            assert!(bad.parse::<ImagePattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_match_only_what_they_name() {
        let p: ImagePattern = "reg.example.com/team/*".parse().unwrap();
        assert!(p.matches("reg.example.com/team/worker:1"));
        assert!(p.matches("reg.example.com/team/sub/worker@sha256:abc"));
        assert!(!p.matches("reg.example.com/team-evil/worker:1"));
        assert!(!p.matches("reg.example.com/team/"));
        assert!(!p.matches("reg.example.com:5000/team/worker:1"));
        let tag: ImagePattern = "worker:*".parse().unwrap();
        assert!(tag.matches("worker:1.0"));
        assert!(!tag.matches("worker:5000/evil/image:1"), "a registry host, not a tag");
        assert!(!tag.matches("worker-evil:1"));
        let exact: ImagePattern = "reg/worker:1".parse().unwrap();
        assert!(exact.matches("reg/worker:1") && !exact.matches("reg/worker:10"));
    }

    #[test]
    fn image_check() {
        let p = policy(&["reg.example.com/team/*"], false);
        assert_eq!(p.check_image(None, "streamscore-worker:0.1.0"), Ok(()));
        assert_eq!(p.check_image(Some("streamscore-worker:0.1.0"), "streamscore-worker:0.1.0"), Ok(()));
        assert_eq!(p.check_image(Some("reg.example.com/team/w:2"), "d"), Ok(()));
        let err = p.check_image(Some("evil.example.com/miner:1"), "d").unwrap_err();
        assert!(
            err.contains("not in the operator's image allowlist") && err.contains("reg.example.com/team/*"),
            "{err}"
        );
        let err = policy(&[], false).check_image(Some("x:1"), "d").unwrap_err();
        assert!(err.contains("only the default worker image"), "{err}");
        let pinned = policy(&["reg.example.com/team/*"], true);
        let err = pinned.check_image(Some("reg.example.com/team/w:2"), "d").unwrap_err();
        assert!(err.contains("pinned by digest"), "{err}");
        assert_eq!(pinned.check_image(Some(&format!("reg.example.com/team/w@sha256:{DIGEST}")), "d"), Ok(()));
        assert!(pinned.check_image(Some("reg.example.com/team/w@sha256:abc"), "d").is_err());
    }

    #[test]
    fn secrets_need_the_opt_in_label() {
        let yes = BTreeMap::from([(SECRET_OPT_IN_LABEL.to_owned(), "true".to_owned())]);
        let no = BTreeMap::from([(SECRET_OPT_IN_LABEL.to_owned(), "yes".to_owned())]);
        assert_eq!(check_secret("spec.kafkaSecrets[0]", "kafka", Some(&yes)), Ok(()));
        let err = check_secret("spec.kafkaSecrets[1]", "db", Some(&no)).unwrap_err();
        assert!(err.starts_with("spec.kafkaSecrets[1]: Secret \"db\"") && err.contains(SECRET_OPT_IN_LABEL), "{err}");
        assert!(check_secret("spec.checkpointSecret", "db", None).is_err());
    }

    #[test]
    fn kafka_names_must_carry_the_namespace_prefix() {
        let tm: streamscore_crds::tenantmodel::TenantModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": "fraud", "namespace": "payments"},
            "spec": {
                "source": {"bootstrapServers": "k:9092", "topics": ["payments.in", "billing.in"], "keyField": "u",
                           "eventTime": {"field": "ts"}},
                "model": {"uri": "file:///m", "sha256": "00", "version": "v", "features": [], "outputs": [{"name": "s"}]},
                "sink": {"topic": "payments.out", "deadLetterTopic": "dlq"}
            }
        }))
        .unwrap();
        assert!(policy(&[], false).check_kafka_names(&tm, "payments").is_empty(), "no prefix: no restriction");
        let p = TenantPolicy { kafka_prefix: Some("{namespace}.".into()), ..policy(&[], false) };
        assert_eq!(p.kafka_prefix_for("payments").as_deref(), Some("payments."));
        let errs = p.check_kafka_names(&tm, "payments");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("spec.source.topics[1]: \"billing.in\" must start with \"payments.\""), "{errs:?}");
        assert!(errs[1].starts_with("spec.sink.deadLetterTopic: \"dlq\""), "{errs:?}");
        // An explicit group of another namespace is refused; the default one is the prefix's.
        let mut other = tm.clone();
        other.spec.source.topics = vec!["payments.in".into()];
        other.spec.sink.dead_letter_topic = "payments.dlq".into();
        assert!(p.check_kafka_names(&other, "payments").is_empty());
        other.spec.source.group_id = "billing.streamscore.invoices".into();
        assert!(p.check_kafka_names(&other, "payments")[0].starts_with("spec.source.groupId"));
        // A lookup table's topic too.
        other.spec.source.group_id = String::new();
        other.spec.features.lookups.push(streamscore_crds::pipeline::LookupTable {
            name: "merchants".into(),
            topic: "billing.merchants".into(),
            key: "m".into(),
            fields: vec!["tier".into()],
        });
        assert!(p.check_kafka_names(&other, "payments")[0].starts_with("spec.features.lookups[0].topic"));
        assert_eq!(crate::build::default_group_id(&tm, Some("payments.")), "payments.streamscore.fraud");
        assert_eq!(crate::build::default_group_id(&tm, None), "streamscore.payments.fraud");
    }

    #[test]
    fn quantities_and_the_resource_maximum() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("lots"), None);
        let mut tm: streamscore_crds::tenantmodel::TenantModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": "fraud", "namespace": "payments"},
            "spec": {
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "64Gi"}},
                "source": {"bootstrapServers": "k:9092", "topics": ["in"], "keyField": "u", "eventTime": {"field": "ts"}},
                "model": {"uri": "file:///m", "sha256": "00", "version": "v", "features": [], "outputs": [{"name": "s"}]},
                "sink": {"topic": "out", "deadLetterTopic": "dlq"}
            }
        }))
        .unwrap();
        let p = TenantPolicy {
            max_resources: BTreeMap::from([("cpu".into(), "4".into()), ("memory".into(), "16Gi".into())]),
            ..policy(&[], false)
        };
        let errs = p.check_resources(&tm);
        assert_eq!(errs, ["spec.resources.limits.memory: 64Gi is above the platform's maximum per worker (16Gi)"]);
        tm.spec.resources = None;
        assert!(p.check_resources(&tm).is_empty(), "the platform's defaults apply");
    }
}
