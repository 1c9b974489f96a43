//! The local control plane is real: the controller-manager turns a Deployment into a
//! ReplicaSet and Pods, and garbage-collects them when the owner is deleted.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use streamscore_tests::{eventually, kube_client, namespace};

#[tokio::test]
async fn deployment_gets_replicaset_and_pods_and_is_garbage_collected() {
    let client = kube_client().await;
    let ns = namespace(&client, "env-kube").await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "c", "image": "probe:1"}]}
            }
        }
    }))
    .unwrap();
    deps.create(&PostParams::default(), &d).await.expect("create Deployment");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("app=probe");
    let rs = eventually(Duration::from_secs(60), "a ReplicaSet", || async {
        rss.list(&lp).await.ok()?.items.into_iter().next()
    })
    .await;
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Deployment", "probe"));
    let n = eventually(Duration::from_secs(60), "2 Pods", || async {
        let n = pods.list(&lp).await.ok()?.items.len();
        (n == 2).then_some(n)
    })
    .await;
    assert_eq!(n, 2);
    deps.delete("probe", &DeleteParams::background()).await.unwrap();
    eventually(Duration::from_secs(60), "garbage collection of ReplicaSet and Pods", || async {
        let r = rss.list(&lp).await.ok()?.items.len();
        let p = pods.list(&lp).await.ok()?.items.len();
        (r == 0 && p == 0).then_some(())
    })
    .await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}
