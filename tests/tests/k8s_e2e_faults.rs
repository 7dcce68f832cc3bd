//! End to end on a real node (tests/src/cluster): the agent's faults. Enforcement lives in pinned
//! links and maps, not in the agent's process, so deleting the agent's pod, SIGKILLing it or
//! rolling the DaemonSet to another build must not let one packet of an enforced pod out, and
//! a pod created while no agent runs must be held back until one is.

use std::time::Duration;

use egress_tests::{
    cluster::{
        e2e::{ALLOWED, Cluster, Flood, SYSTEM, ok},
        node::NodeShape,
    },
    lab::text,
    sniff::Sniffer,
};

/// Checks, at the end of each phase, that nothing of the enforced racer arrived outside and that
/// the control racer (a namespace that did not opt in, same script) is still getting through:
/// without the control, a silent sniffer or a dead racer would pass.
struct Racers {
    sniffer: Sniffer,
    enforced: Flood,
    control: Flood,
}

impl Racers {
    fn start(cluster: &Cluster) -> Self {
        let enforced = Flood { dgram_port: 9999, frame_port: 9998, seconds: 3600 };
        let control = Flood { dgram_port: 9997, frame_port: 9996, seconds: 3600 };
        let sniffer = Flood::sniffer(cluster);
        ok(&cluster.kubectl(&["create", "namespace", "free"]), "creating a namespace");
        for (flood, namespace) in [(enforced, "team-a"), (control, "free")] {
            cluster.apply(
                &flood.pod("racer", namespace, &cluster.test_files(), false, "Always"),
                "creating a racer",
            );
        }
        for namespace in ["team-a", "free"] {
            cluster.wait_ready("racer", namespace);
        }
        Self { sniffer, enforced, control }
    }

    fn check(&self, cluster: &Cluster, phase: &str) {
        let before = self.control.arrived(&self.sniffer).len();
        let grew = egress_tests::poll_until(Duration::from_secs(15), || {
            self.control.arrived(&self.sniffer).len() > before + 10
        });
        let said = |namespace: &str| text(&cluster.kubectl(&["logs", "racer", "-n", namespace, "--tail=5"]));
        assert!(
            grew,
            "{phase}: the control racer's packets stopped arriving (the check could not fail); it said:\n{}\n{}\n{}",
            said("free"),
            text(&cluster.kubectl(&["get", "pods", "-A", "-o", "wide"])),
            cluster.agent_state()
        );
        let got = self.enforced.arrived(&self.sniffer);
        let per_port = |port: u16| got.iter().filter(|&&p| p == port).count();
        assert!(
            got.is_empty(),
            "{phase}: packets of the enforced racer arrived outside: {} datagrams, {} frames; it said:\n{}",
            per_port(self.enforced.dgram_port),
            per_port(self.enforced.frame_port),
            said("team-a")
        );
    }
}

/// The agent container's process, as containerd knows it.
fn agent_pid(cluster: &Cluster, pod: &str) -> u32 {
    let id =
        cluster.get(&["pod", pod], SYSTEM, r#"{.status.containerStatuses[?(@.name=="agent")].containerID}"#);
    let id = id.trim().trim_start_matches("containerd://");
    let tasks = cluster.node.ctr(&["tasks", "ls"]).unwrap_or_else(|e| panic!("{e:#}"));
    let tasks = ok(&tasks, "ctr tasks ls");
    tasks
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(id)).then(|| words.next()?.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no task {id} in:\n{tasks}"))
}

/// Waits for an agent pod other than the one with `old_uid` to be Ready; returns its name.
fn wait_for_new_agent(cluster: &Cluster, old_uid: &str) -> String {
    egress_tests::wait_until("a new agent pod", Duration::from_secs(60), || {
        cluster.agent_pod().is_some_and(|(_, uid)| uid != old_uid)
    });
    let (name, _) = cluster.agent_pod().unwrap();
    cluster.wait_ready(&name, SYSTEM);
    name
}

fn restarts(cluster: &Cluster, pod: &str) -> u32 {
    let count =
        cluster.get(&["pod", pod], SYSTEM, r#"{.status.containerStatuses[?(@.name=="agent")].restartCount}"#);
    count.trim().parse().unwrap_or(0)
}

#[test]
fn enforcement_never_lapses_through_agent_faults_and_pods_made_meanwhile_wait_for_the_agent() {
    let cluster = Cluster::enforcing("e2e-faults", NodeShape::default());
    let racers = Racers::start(&cluster);
    racers.check(&cluster, "before any fault");

    // The agent's pod deleted: the DaemonSet makes another.
    let (pod, uid) = cluster.agent_pod().expect("the agent's pod");
    ok(&cluster.kubectl(&["delete", "pod", &pod, "-n", SYSTEM]), "deleting the agent's pod");
    let pod = wait_for_new_agent(&cluster, &uid);
    racers.check(&cluster, "the agent's pod deleted and replaced");

    // SIGKILL: no shutdown path at all; the kubelet restarts the container.
    let pid = agent_pid(&cluster, &pod);
    let before = restarts(&cluster, &pod);
    // SAFETY: kill(2) with a pid containerd reported for the agent's container.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill -9 {pid}");
    egress_tests::wait_until("the kubelet to restart the agent", Duration::from_secs(60), || {
        restarts(&cluster, &pod) > before
    });
    cluster.wait_ready(&pod, SYSTEM);
    racers.check(&cluster, "the agent SIGKILLed and restarted");

    // Another build (other build stamp in every program): the rolling update replaces the pod
    // and the new agent takes over the pinned state.
    cluster.import_agent_image(&egress_tests::other_agent_bin(), "other-build");
    let image = "docker.io/library/egress-agent:other-build";
    ok(
        &cluster.kubectl(&[
            "set",
            "image",
            "daemonset/egress-agent",
            "-n",
            SYSTEM,
            &format!("install-cni-plugin={image}"),
            &format!("agent={image}"),
        ]),
        "rolling the agent to another build",
    );
    cluster.rollout("daemonset/egress-agent");
    let (pod, uid) = cluster.agent_pod().expect("the agent's pod");
    let running = cluster.get(&["pod", &pod], SYSTEM, "{.spec.containers[0].image}");
    assert_eq!(running, image, "the rolled agent runs another image");
    racers.check(&cluster, "the agent rolled to another build");

    // No agent on the node (its DaemonSet selects no node): a pod of the enforced namespace
    // created now starts (the plugin gates its veth from the pins), but nothing it sends goes
    // anywhere until an agent is back and binds it.
    let nowhere = r#"{"spec":{"template":{"spec":{"nodeSelector":{"egressfw.test/no-such-node":"true"}}}}}"#;
    ok(
        &cluster.kubectl(&[
            "patch",
            "daemonset/egress-agent",
            "-n",
            SYSTEM,
            "--type",
            "merge",
            "-p",
            nowhere,
        ]),
        "taking the agent off the node",
    );
    egress_tests::wait_until("the agent's pod to go", Duration::from_secs(60), || {
        cluster.agent_pod().is_none()
    });
    cluster.run_pod("late", "team-a");
    let steered = cluster.curl("late", "team-a", &["--max-time", "5", &format!("https://{ALLOWED}/")]);
    assert!(
        !steered.status.success(),
        "a pod made while no agent runs reached {ALLOWED} before the agent was back: {}",
        text(&steered)
    );
    racers.check(&cluster, "no agent on the node");
    let back = r#"{"spec":{"template":{"spec":{"nodeSelector":{"egressfw.test/no-such-node":null}}}}}"#;
    ok(
        &cluster.kubectl(&["patch", "daemonset/egress-agent", "-n", SYSTEM, "--type", "merge", "-p", back]),
        "putting the agent back",
    );
    wait_for_new_agent(&cluster, &uid);
    // The agent back binds the held pod: it reaches the allowed name through the gateway.
    cluster.wait_until_reaches_allowed("late", "team-a", Duration::from_secs(30), "the agent back");
    racers.check(&cluster, "the agent back");
}

/// The ID of `pod`'s (first) container and whether it is ready.
fn container(cluster: &Cluster, pod: &str, namespace: &str) -> (String, bool) {
    let out = cluster.get(
        &["pod", pod],
        namespace,
        "{.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}",
    );
    let (id, ready) = out.split_once(' ').unwrap_or((&out, ""));
    (id.to_owned(), ready == "true")
}

#[test]
fn after_a_node_reboot_no_pod_of_an_enforced_namespace_runs_unenforced() {
    let mut cluster = Cluster::enforcing("e2e-boot", NodeShape::default());
    cluster.run_pod("client", "team-a");
    let racers = Racers::start(&cluster);
    racers.check(&cluster, "before the reboot");

    // The reboot: bpffs and /run empty, the conflist still names the plugin. The kubelet starts
    // every pod again at once, the racers among them, while the agent's own pod is only one of
    // the pods it starts.
    let pods = [("racer", "team-a"), ("racer", "free"), ("client", "team-a")];
    let before = pods.map(|(pod, namespace)| container(&cluster, pod, namespace).0);
    let Cluster { node, plane, .. } = &mut cluster;
    node.reboot(plane).unwrap_or_else(|e| panic!("rebooting the node: {e:#}"));
    cluster.rollout("daemonset/egress-agent");
    // The API still says Ready for the containers that died with the node until the kubelet
    // has reported again: wait for new, ready ones.
    for ((pod, namespace), old) in pods.iter().zip(&before) {
        egress_tests::wait_until(
            &format!("{namespace}/{pod} to run a new container after the reboot"),
            Duration::from_secs(120),
            || {
                let (id, ready) = container(&cluster, pod, namespace);
                id != *old && !id.is_empty() && ready
            },
        );
    }
    racers.check(&cluster, "after the reboot");
    // Enforced, not just cut off: the enforced pod is steered to the gateway again, and its
    // UDP to the outside is refused at the socket.
    cluster.wait_until_reaches_allowed("client", "team-a", Duration::from_secs(60), "after the reboot");
    assert_eq!(cluster.udp_to_443("client", "team-a"), "EPERM", "UDP to 443 after the reboot");
}
