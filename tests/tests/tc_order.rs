//! Our tc program must run first on the pod's veth: a program put ahead of it (a CNI attaching
//! later, at the head of the tcx chain or at our clsact priority) could pass or redirect the
//! pod's frames before they are judged. The agent finds it on its next pass, moves ours back to
//! the head and says so. The pass-all program is first shown to let a forbidden frame through,
//! so the test fails if the agent does not restore the order.

use std::{fs, net::IpAddr, time::Duration};

use egress_tests::{
    agent::Agent,
    frames,
    lab::{EXTERNAL4, Lab, POD4},
    preempt::Preemptor,
    sniff::Sniffer,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

/// Sends `frame` from the pod and checks that ours, first again, dropped it (naming the filters
/// on the veth if not).
fn assert_dropped(lab: &Lab, sniff: &Sniffer, frame: &[u8]) {
    frames::send(&lab.pod, &lab.pod_cgroup, frame);
    let filters = lab.node.run(None, "tc", &["filter", "show", "dev", "v-pod", "ingress"]);
    assert_eq!(
        sniff.seen(),
        vec![],
        "ours runs first again; filters:\n{}",
        egress_tests::lab::text(&filters)
    );
}

#[test]
fn a_program_put_ahead_of_ours_is_found_and_ours_runs_first_again() {
    let lab = Lab::new();
    fs::write(lab.policy_path(), lab.policy_text_with_veth("enforce")).expect("policy");
    let mut agent = Agent::start_on_node(&lab);
    agent.wait_for("tc layer applied", 1);
    let frame = frames::udp(
        frames::mac(&lab.pod, "eth0"),
        frames::mac(&lab.external, "eth0"),
        ip(POD4),
        ip(EXTERNAL4),
        9999,
        b"x",
    );
    let sniff = Sniffer::start(&lab.external, &[ip(POD4)]);
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(sniff.seen(), vec![], "with ours first the frame is dropped");

    // While no agent runs, a pass-all program goes ahead of ours: the frame gets through.
    agent.kill9();
    let first = Preemptor::attach(Some(&lab.node), "v-pod", 0x51);
    frames::send(&lab.pod, &lab.pod_cgroup, &frame);
    assert_eq!(sniff.seen().len(), 1, "the program ahead of ours passes the frame unjudged");
    sniff.clear();

    // A new agent's first pass finds it and puts ours back at the head.
    let agent = Agent::start_on_node(&lab);
    let moved = agent.wait_until("tc program moved back to the head", |l| l["direction"] == "ingress");
    assert_eq!(moved["interface"], "v-pod", "{moved}");
    assert_dropped(&lab, &sniff, &frame);

    // The same while the agent runs: found within one periodic pass.
    let moved_before = agent.lines("tc program moved back to the head").len();
    let _second = Preemptor::attach(Some(&lab.node), "v-pod", 0x52);
    let deadline = std::time::Instant::now() + egress_tests::patience(Duration::from_secs(10));
    while agent.lines("tc program moved back to the head").len() <= moved_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not move ours back again; its log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_dropped(&lab, &sniff, &frame);
    // Nothing else moved: no spurious moves on the egress side, one per program put ahead.
    let moved = agent.lines("tc program moved back to the head");
    assert!(moved.iter().all(|l| l["direction"] == "ingress"), "{moved:#?}");
    assert_eq!(moved.len(), moved_before + 1, "{moved:#?}");
    drop(first);
}
