//! No bpffs where the pins go. The node agent refuses to start rather than mount one itself:
//! inside its container a bpffs it mounted would vanish with the pod, taking every pin (and so
//! all enforcement) with it. The standalone agent, which runs on the machine itself, mounts one
//! and enforces as usual.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use egress_tests::{
    agent::{self, Agent},
    client::{refused, tcp},
    kube_node::KubeNode,
    lab::{EXTERNAL4, Lab, text},
};

fn filesystem_type(path: &Path) -> String {
    let out = Command::new("stat").args(["-f", "-c", "%T"]).arg(path).output().expect("running stat");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Unmounts (lazily) whatever the test mounted at `0` when dropped, even on panic.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn the_node_agent_refuses_a_pin_directory_outside_bpffs() {
    let node = KubeNode::new();
    let parent = node.lab.dir.join("not-bpffs");
    fs::create_dir_all(&parent).unwrap();
    let pins = parent.join("egressfw");
    let mut child = node
        .agent_command_with_pins(&pins)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the node agent");
    let deadline = Instant::now() + egress_tests::patience(Duration::from_secs(20));
    while child.try_wait().expect("polling the agent").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node agent kept running with its pin directory outside bpffs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("the agent's output");
    assert!(!out.status.success(), "it must not start:\n{}", text(&out));
    assert!(
        text(&out).contains("is not a bpffs: mount the host's bpffs there"),
        "the error names the problem and the fix:\n{}",
        text(&out)
    );
    assert_ne!(filesystem_type(&parent), "bpf_fs", "it mounted nothing there");
    assert!(!pins.exists(), "and pinned nothing");
}

#[test]
fn the_standalone_agent_mounts_bpffs_and_enforces() {
    let lab = Lab::new();
    lab.write_policy("enforce");
    let parent = lab.dir.join("bpf");
    fs::create_dir_all(&parent).unwrap();
    let _unmount = Unmount(parent.clone());
    let pins = parent.join("egressfw");
    let mut cmd = agent::command_for(&lab, &egress_tests::agent_bin(), &pins);
    cmd.arg("standalone").arg("--config").arg(lab.policy_path());
    let mut agent = Agent::spawn(&lab, cmd, |a| a.log_text().contains("\"message\":\"ready\""))
        .unwrap_or_else(|log| panic!("the standalone agent did not start:\n{log}"));
    agent.wait_for("mounted bpffs", 1);
    assert_eq!(filesystem_type(&parent), "bpf_fs", "a bpffs is mounted at the pin directory's parent");
    assert!(pins.join("maps").is_dir(), "the maps are pinned there");
    let out = lab.in_pod(tcp(EXTERNAL4, 80));
    assert!(refused(&out), "enforced as usual:\n{}", text(&out));

    agent.kill9();
    let down = agent::command_for(&lab, &egress_tests::agent_bin(), &pins).arg("teardown").output().unwrap();
    assert!(down.status.success(), "teardown:\n{}", text(&down));
}
