//! The fake API server against the real kube client: lists, watchers and reflectors, and the
//! failure modes (compaction, dropped watches, outages) the agent has to survive. No root needed.

use std::{collections::BTreeMap, future::Future, time::Duration};

use egress_tests::fake_api::{FakeApi, Options, fixtures};
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, ObjectReference, Pod},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource as _,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{EventType, Recorder},
        reflector::{self, ObjectRef, Store, reflector},
        watcher,
    },
};

/// Upper bound for anything a test waits for; generous for a loaded 2-core CI machine.
const PATIENCE: Duration = Duration::from_secs(15);

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(async { tokio::time::timeout(PATIENCE * 2, f).await.expect("test timed out") })
}

/// A client configured the way the agent is: from the kubeconfig the fake writes.
async fn client(api: &FakeApi) -> Client {
    let path = std::env::temp_dir().join(format!(
        "egress-fake-api-{}-{}.kubeconfig",
        std::process::id(),
        api.url().rsplit(':').next().unwrap_or_default()
    ));
    api.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig back");
    std::fs::remove_file(&path).expect("remove kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), api.url());
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).expect("client")
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reflector over all pods, driven by a task, as the agent runs one.
fn reflect_pods(client: Client, config: watcher::Config) -> (Store<Pod>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(Api::<Pod>::all(client), config)).default_backoff();
    let task = tokio::spawn(stream.for_each(|_| std::future::ready(())));
    (reader, task)
}

async fn ready(store: &Store<Pod>) {
    tokio::time::timeout(PATIENCE, store.wait_until_ready())
        .await
        .expect("reflector ready in time")
        .expect("reflector writer alive");
}

fn pod(name: &str, node: &str, ip: &str) -> Pod {
    fixtures::pod("default", name, &format!("uid-{name}"), node, "Burstable", Some(ip))
}

fn labelled(name: &str, app: &str) -> Pod {
    let mut p = pod(name, "node-a", "10.0.0.9");
    p.metadata.labels = Some(BTreeMap::from([("app".to_owned(), app.to_owned())]));
    p
}

fn ip_of(store: &Store<Pod>, name: &str) -> Option<String> {
    store.get(&ObjectRef::new(name).within("default")).and_then(|p| p.status.as_ref()?.pod_ip.clone())
}

fn names_in(store: &Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = store.state().iter().filter_map(|p| p.metadata.name.clone()).collect();
    names.sort();
    names
}

fn names<K: kube::Resource>(items: &[K]) -> Vec<String> {
    items.iter().map(|o| o.meta().name.clone().unwrap_or_default()).collect()
}

#[test]
fn lists_honour_namespaces_and_selectors() {
    let api = FakeApi::start().unwrap();
    api.apply(&fixtures::namespace("team-a", &[("team", "a")]));
    api.apply(&fixtures::namespace("team-b", &[("team", "b")]));
    api.apply(&fixtures::pod("team-a", "a1", "u-a1", "node-a", "Guaranteed", Some("10.0.0.1")));
    api.apply(&fixtures::pod("team-a", "a2", "u-a2", "node-b", "BestEffort", None));
    api.apply(&fixtures::pod("team-b", "b1", "u-b1", "node-a", "Burstable", Some("fd00::1")));
    block_on(async {
        let c = client(&api).await;
        let namespaces: Api<Namespace> = Api::all(c.clone());
        let by = |selector: &str| {
            let namespaces = namespaces.clone();
            let lp = ListParams::default().labels(selector);
            async move { names(&namespaces.list(&lp).await.unwrap().items) }
        };
        assert_eq!(by("").await, ["team-a", "team-b"]);
        assert_eq!(by("team=b").await, ["team-b"]);
        assert_eq!(by("team in (a,c)").await, ["team-a"]);
        assert_eq!(by("team notin (a),kubernetes.io/metadata.name").await, ["team-b"]);
        assert!(by("!team").await.is_empty());
        let one = namespaces.get("team-a").await.unwrap();
        assert_eq!(one.metadata.labels.unwrap()["team"], "a");

        let all_pods: Api<Pod> = Api::all(c.clone());
        let on_a = all_pods.list(&ListParams::default().fields("spec.nodeName=node-a")).await.unwrap();
        assert_eq!(names(&on_a.items), ["a1", "b1"]);
        let rv: u64 = on_a.metadata.resource_version.unwrap().parse().unwrap();
        assert!(rv >= 5, "one resourceVersion per write, got {rv}");
        let team_a: Api<Pod> = Api::namespaced(c.clone(), "team-a");
        let on_a = team_a.list(&ListParams::default().fields("spec.nodeName==node-a")).await.unwrap();
        assert_eq!(names(&on_a.items), ["a1"]);
        let elsewhere = team_a.list(&ListParams::default().fields("spec.nodeName!=node-a")).await.unwrap();
        assert_eq!(names(&elsewhere.items), ["a2"]);
        let by_name = all_pods
            .list(&ListParams::default().fields("metadata.name=b1,metadata.namespace=team-b"))
            .await
            .unwrap();
        assert_eq!(names(&by_name.items), ["b1"]);

        let a1 = team_a.get("a1").await.unwrap();
        assert_eq!(a1.metadata.uid.as_deref(), Some("u-a1"));
        assert!(a1.metadata.creation_timestamp.is_some());
        let status = a1.status.unwrap();
        assert_eq!(status.qos_class.as_deref(), Some("Guaranteed"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        match team_a.get("nope").await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
            other => panic!("expected 404, got {other:?}"),
        }
        assert!(team_a.list(&ListParams::default().labels("a in (b")).await.is_err());
        assert_eq!(c.apiserver_version().await.unwrap().minor, "33");
    });
    assert_eq!(api.get::<Pod>(Some("team-b"), "b1").unwrap().metadata.uid.as_deref(), Some("u-b1"));
    assert!(api.get::<Pod>(Some("team-a"), "b1").is_none());
    assert_eq!(api.stats().lists, 9);
}

#[test]
fn reflector_follows_apply_modify_delete() {
    let api = FakeApi::start().unwrap();
    api.apply(&pod("p1", "node-a", "10.0.0.1"));
    block_on(async {
        let (store, task) = reflect_pods(client(&api).await, watcher::Config::default());
        ready(&store).await;
        assert_eq!(names_in(&store), ["p1"]);

        api.apply(&pod("p2", "node-a", "10.0.0.2"));
        eventually("p2 is added", || ip_of(&store, "p2").as_deref() == Some("10.0.0.2")).await;
        let rv = api.apply(&pod("p1", "node-a", "10.0.0.11"));
        eventually("p1 is modified", || ip_of(&store, "p1").as_deref() == Some("10.0.0.11")).await;
        let p1 = store.get(&ObjectRef::new("p1").within("default")).unwrap();
        assert_eq!(p1.metadata.resource_version.as_deref(), Some(rv.as_str()));
        assert!(api.delete::<Pod>(Some("default"), "p2"));
        assert!(!api.delete::<Pod>(Some("default"), "p2"));
        eventually("p2 is deleted", || names_in(&store) == ["p1"]).await;
        task.abort();
    });
    let stats = api.stats();
    assert_eq!((stats.lists, stats.watches, stats.gone), (1, 1, 0), "{stats:?}");
}

#[test]
fn watcher_relists_after_compaction() {
    let api = FakeApi::start().unwrap();
    api.apply(&pod("p1", "node-a", "10.0.0.1"));
    api.apply(&pod("p2", "node-a", "10.0.0.2"));
    block_on(async {
        let c = client(&api).await;
        // The raw protocol first: an expired resourceVersion is one ERROR event, then the end.
        let pods: Api<Pod> = Api::all(c.clone());
        let old = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
        api.compact();
        let events: Vec<_> =
            pods.watch(&WatchParams::default(), &old).await.unwrap().try_collect().await.unwrap();
        match events.as_slice() {
            [WatchEvent::Error(e)] => {
                assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
                assert!(
                    e.message.starts_with(&format!("too old resource version: {old} (")),
                    "{}",
                    e.message
                );
            }
            other => panic!("expected one 410 ERROR event, got {other:?}"),
        }
        assert_eq!(api.stats().gone, 1);

        let (store, task) = reflect_pods(c, watcher::Config::default());
        ready(&store).await;
        api.apply(&pod("p1", "node-a", "10.0.0.11"));
        eventually("p1 is modified", || ip_of(&store, "p1").as_deref() == Some("10.0.0.11")).await;
        let before = api.stats();

        // Even the latest resourceVersion the watcher saw is now too old; the changes below
        // are made after its stream was cut, so only a relist can show them.
        api.compact();
        api.drop_watches();
        assert!(api.delete::<Pod>(Some("default"), "p2"));
        api.apply(&pod("p3", "node-b", "10.0.0.3"));
        eventually("the watcher hits 410 and relists", || {
            let s = api.stats();
            s.gone > before.gone && s.lists > before.lists
        })
        .await;
        eventually("the store shows the changes", || names_in(&store) == ["p1", "p3"]).await;
        assert_eq!(ip_of(&store, "p1").as_deref(), Some("10.0.0.11"));
        assert_eq!(ip_of(&store, "p3").as_deref(), Some("10.0.0.3"));
        task.abort();
    });
}

#[test]
fn bookmarks_when_asked_and_only_then() {
    let api =
        FakeApi::start_with(Options { bookmark_interval: Duration::from_millis(100), ..Options::default() })
            .unwrap();
    api.apply(&pod("p1", "node-a", "10.0.0.1"));
    block_on(async {
        let c = client(&api).await;
        let pods: Api<Pod> = Api::all(c.clone());
        let rv = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();

        // Without bookmarks, the first event after a quiet spell is the change itself.
        let mut quiet = pods.watch(&WatchParams::default().disable_bookmarks(), &rv).await.unwrap().boxed();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let changed = api.apply(&pod("p2", "node-a", "10.0.0.2"));
        match quiet.try_next().await.unwrap() {
            Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("p2")),
            other => panic!("expected ADDED p2, got {other:?}"),
        }
        assert_eq!(api.stats().bookmarks, 0);

        // With them, they come and carry the position the stream has reached.
        let mut marked = pods.watch(&WatchParams::default(), &changed).await.unwrap().boxed();
        match tokio::time::timeout(PATIENCE, marked.try_next()).await.unwrap().unwrap() {
            Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, changed),
            other => panic!("expected a BOOKMARK, got {other:?}"),
        }
        drop((quiet, marked));

        let (store, task) = reflect_pods(c, watcher::Config::default());
        ready(&store).await;
        let at_start = api.stats().bookmarks;
        eventually("the watcher gets bookmarks", || api.stats().bookmarks >= at_start + 3).await;
        task.abort();
    });
}

#[test]
fn watch_ends_after_timeout_seconds() {
    let api = FakeApi::start().unwrap();
    block_on(async {
        let pods: Api<Pod> = Api::all(client(&api).await);
        let started = tokio::time::Instant::now();
        let stream = pods.watch(&WatchParams::default().timeout(1), "0").await.unwrap();
        let events: Vec<_> = tokio::time::timeout(PATIENCE, stream.try_collect()).await.unwrap().unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
        assert!(events.iter().all(|e| matches!(e, WatchEvent::Bookmark(_))), "{events:?}");
    });
}

#[test]
fn watcher_recovers_from_an_outage() {
    let api = FakeApi::start().unwrap();
    api.apply(&pod("p1", "node-a", "10.0.0.1"));
    block_on(async {
        let c = client(&api).await;
        let (store, task) = reflect_pods(c.clone(), watcher::Config::default());
        ready(&store).await;

        api.set_available(false);
        api.apply(&pod("p1", "node-a", "10.0.0.11"));
        api.apply(&pod("p2", "node-a", "10.0.0.2"));
        // kube retries 503s itself (honouring Retry-After), so a request made during the
        // outage just waits for its end.
        let pods = Api::<Pod>::all(c);
        let waiting = tokio::spawn(async move { pods.list(&ListParams::default()).await });
        let refused = api.stats().unavailable;
        eventually("clients retry and are refused", || api.stats().unavailable >= refused + 3).await;
        assert!(!waiting.is_finished());
        assert_eq!(ip_of(&store, "p1").as_deref(), Some("10.0.0.1"), "nothing can have been seen yet");

        api.set_available(true);
        eventually("the change made during the outage arrives", || {
            ip_of(&store, "p1").as_deref() == Some("10.0.0.11") && ip_of(&store, "p2").is_some()
        })
        .await;
        let listed = tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(names(&listed.items), ["p1", "p2"]);
        task.abort();
    });
}

#[test]
fn selective_watch_sees_objects_leave_and_enter() {
    let api = FakeApi::start().unwrap();
    api.apply(&labelled("w1", "web"));
    block_on(async {
        let c = client(&api).await;
        let pods: Api<Pod> = Api::namespaced(c.clone(), "default");
        let listed = pods.list(&ListParams::default().labels("app=web")).await.unwrap();
        assert_eq!(names(&listed.items), ["w1"]);
        let rv = listed.metadata.resource_version.unwrap();
        let wp = WatchParams::default().labels("app=web").disable_bookmarks();
        let mut raw = pods.watch(&wp, &rv).await.unwrap().boxed();
        let (store, task) = reflect_pods(c, watcher::Config::default().labels("app=web"));
        ready(&store).await;
        assert_eq!(names_in(&store), ["w1"]);

        api.apply(&labelled("d1", "db"));
        api.apply(&labelled("w2", "web"));
        let relabelled = api.apply(&labelled("w1", "db"));
        api.apply(&labelled("d1", "web"));
        api.delete::<Pod>(Some("default"), "d1");

        let mut seen = Vec::new();
        for _ in 0..4 {
            let event = tokio::time::timeout(PATIENCE, raw.try_next()).await.unwrap().unwrap().unwrap();
            let (kind, pod) = match event {
                WatchEvent::Added(p) => ("ADDED", p),
                WatchEvent::Deleted(p) => ("DELETED", p),
                other => panic!("unexpected {other:?}"),
            };
            if pod.metadata.name.as_deref() == Some("w1") {
                // It leaves with the content the watcher last matched and the new version.
                assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "web");
                assert_eq!(pod.metadata.resource_version.as_deref(), Some(relabelled.as_str()));
            }
            seen.push(format!("{kind} {}", pod.metadata.name.unwrap()));
        }
        assert_eq!(seen, ["ADDED w2", "DELETED w1", "ADDED d1", "DELETED d1"]);
        eventually("the selective reflector keeps only w2", || names_in(&store) == ["w2"]).await;
        task.abort();
    });
}

#[test]
fn streaming_list_watcher_syncs() {
    let api = FakeApi::start().unwrap();
    api.apply(&pod("p1", "node-a", "10.0.0.1"));
    api.apply(&pod("p2", "node-b", "10.0.0.2"));
    block_on(async {
        let config = watcher::Config::default().streaming_lists().fields("spec.nodeName=node-a");
        let (store, task) = reflect_pods(client(&api).await, config);
        ready(&store).await;
        assert_eq!(names_in(&store), ["p1"]);
        api.apply(&pod("p3", "node-a", "10.0.0.3"));
        eventually("p3 arrives", || names_in(&store) == ["p1", "p3"]).await;
        task.abort();
    });
    assert_eq!(api.stats().lists, 0, "a streaming list is a watch");
}

#[test]
fn events_are_recorded() {
    let api = FakeApi::start().unwrap();
    let target = pod("p1", "node-a", "10.0.0.1");
    api.apply(&target);
    block_on(async {
        let c = client(&api).await;
        let events: Api<Event> = Api::namespaced(c.clone(), "default");
        let regarding = target.object_ref(&());
        let event = Event {
            metadata: ObjectMeta { generate_name: Some("p1.".into()), ..ObjectMeta::default() },
            event_time: Some(MicroTime(Timestamp::from_second(1_750_000_000).unwrap())),
            reason: Some("PolicyApplied".into()),
            note: Some("3 rules".into()),
            action: Some("Apply".into()),
            type_: Some("Normal".into()),
            reporting_controller: Some("egress-agent".into()),
            reporting_instance: Some("node-a".into()),
            regarding: Some(regarding.clone()),
            ..Event::default()
        };
        let created = events.create(&PostParams::default(), &event).await.unwrap();
        assert!(created.metadata.name.unwrap().starts_with("p1."));
        assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
        let taken = events.create(&PostParams::default(), &event).await.unwrap();
        match events.create(&PostParams::default(), &taken).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 409),
            other => panic!("expected 409 for a duplicate name, got {other:?}"),
        }

        let legacy: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(c.clone(), "default");
        let core_event = k8s_openapi::api::core::v1::Event {
            metadata: ObjectMeta { name: Some("p1.legacy".into()), ..ObjectMeta::default() },
            involved_object: ObjectReference { name: Some("p1".into()), ..regarding.clone() },
            reason: Some("Blocked".into()),
            message: Some("egress to 192.0.2.1:443 denied".into()),
            ..Default::default()
        };
        legacy.create(&PostParams::default(), &core_event).await.unwrap();

        // The recorder POSTs the first occurrence and PATCHes the series of a repeat.
        let recorder = Recorder::new(c, "egress-agent".into());
        let denied = kube::runtime::events::Event {
            type_: EventType::Warning,
            reason: "EgressDenied".into(),
            note: Some("192.0.2.1:443".into()),
            action: "Drop".into(),
            secondary: None,
        };
        recorder.publish(&denied, &regarding).await.unwrap();
        recorder.publish(&denied, &regarding).await.unwrap();
    });
    let recorded = api.events();
    let reasons: Vec<&str> = recorded.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons, ["PolicyApplied", "PolicyApplied", "Blocked", "EgressDenied"]);
    assert_eq!(recorded[2]["apiVersion"], "v1");
    let from_recorder = &recorded[3];
    assert_eq!(from_recorder["apiVersion"], "events.k8s.io/v1");
    assert_eq!(from_recorder["regarding"]["name"], "p1");
    assert_eq!(from_recorder["series"]["count"], 2);
    let stats = api.stats();
    assert_eq!(stats.events_posted, 4);
    assert_eq!(
        stats
            .requests
            .iter()
            .filter(|(k, _)| k.starts_with("PATCH /apis/events.k8s.io/v1/namespaces/default/events/"))
            .map(|(_, n)| n)
            .sum::<u64>(),
        1
    );
}
