//! Stage 2, written by the host into the results share for each run: the VM's PID 1 once the
//! host's root is mounted. It sets the machine up the way the tests expect a node to be, runs
//! every test binary with its output going to the share, and powers the VM off.
//!
//! It runs under the host's /bin/sh (dash), so it is plain POSIX sh.

use std::{fmt::Write as _, path::Path};

use super::suite::TestBinary;

/// Console lines the host follows for progress; everything else on the console is the kernel.
pub const MARK: &str = "egressfw-vm:";

/// What the script runs and how.
pub struct Plan<'a> {
    pub binaries: &'a [TestBinary],
    pub agent: &'a Path,
    pub other_agent: &'a Path,
    pub filter: Option<&'a str>,
    pub keep_going: bool,
    /// Limit for each test binary, in seconds.
    pub timeout: u64,
    /// The host's PATH: tools the tests call (python3, curl, ...) are found where they are there.
    pub path: &'a str,
    /// How much slower than the host the guest runs; the tests stretch their waits for
    /// expected events by it (`EGRESS_TEST_TIME_SCALE`).
    pub time_scale: u64,
}

/// Mounts a node has and the tests rely on. /proc and /sys are fresh; cgroup v2 alone at
/// /sys/fs/cgroup is the layout of a current Kubernetes node; bpffs at /sys/fs/bpf as systemd
/// mounts it. The module tree of the booted kernel is its own 9p share, so the host's kmod
/// can load veth, bridge, sch_ingress, cls_bpf and the rest on demand.
const SETUP: &str = r#"set -u
R=/run/egressfw-vm
say() { echo "egressfw-vm: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -sf /proc/self/fd /dev/fd
mount -t tmpfs -o mode=1777 tmp /tmp
mkdir -p "/lib/modules/$(uname -r)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro modules "/lib/modules/$(uname -r)" \
    || say "warning: no module tree for $(uname -r)"
hostname egressfw-vm
ip link set lo up
finish() {
    dmesg > "$R/dmesg.log" 2>&1
    cat /proc/modules > "$R/modules.log"
    say "done"
    sync
    # Power off at once: PID 1 has nothing to shut down cleanly. The 9p root goes away while
    # the kernel powers off, so PID 1 then waits on a FIFO rather than running `sleep`, which
    # could fail to load and make PID 1 exit (a panic).
    mkfifo /run/egressfw-vm.wait
    echo o > /proc/sysrq-trigger
    read -r _ < /run/egressfw-vm.wait
}
# run NAME DIR PROGRAM ARGS...: one test binary, output to $R/NAME.log, exit status to NAME.rc.
run() {
    name=$1 dir=$2
    shift 2
    say "begin $name"
    (cd "$dir" && exec "$@") > "$R/$name.log" 2>&1
    rc=$?
    echo "$rc" > "$R/$name.rc"
    say "end $name rc=$rc"
    return "$rc"
}
"#;

/// The whole script.
pub fn script(plan: &Plan<'_>) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by `cargo xtask vm` (xtask/src/vm/stage2.rs).\n");
    s.push_str(SETUP);
    let _ = writeln!(s, "export PATH={} HOME=/root RUST_BACKTRACE=1", quote(plan.path));
    let _ = writeln!(s, "export EGRESS_AGENT_BIN={}", quote(&plan.agent.display().to_string()));
    let _ = writeln!(s, "export EGRESS_AGENT_OTHER_BIN={}", quote(&plan.other_agent.display().to_string()));
    let _ = writeln!(s, "export EGRESS_TEST_TIME_SCALE={}", plan.time_scale);
    s.push_str("say \"ready $(uname -r)\"\n");
    for b in plan.binaries {
        // `timeout` from the host's coreutils: a hung binary is reported and the next one runs.
        // Like cargo test: in the package directory, with CARGO_MANIFEST_DIR set. Ignored tests
        // run too: a test is ignored on the host only when it needs a kernel feature the host
        // lacks (SCTP, GRE, IPIP), which these kernels have.
        let dir = quote(&b.manifest_dir.display().to_string());
        let mut line = format!(
            "run {} {dir} env CARGO_MANIFEST_DIR={dir} timeout -k 10 {} {} --test-threads=1 --include-ignored",
            quote(&b.name),
            plan.timeout,
            quote(&b.path.display().to_string()),
        );
        if let Some(f) = plan.filter {
            line.push(' ');
            line.push_str(&quote(f));
        }
        if !plan.keep_going {
            line.push_str(" || { say \"stopping after the first failing binary\"; finish; }");
        }
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("finish\n");
    s
}

/// Single-quotes a word for sh.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn binary(name: &str) -> TestBinary {
        TestBinary {
            name: name.into(),
            path: PathBuf::from(format!("/t/deps/{name}-0123")),
            manifest_dir: PathBuf::from("/w/tests"),
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("a b$c"), "'a b$c'");
    }

    #[test]
    fn each_binary_runs_one_test_at_a_time_with_the_filter() {
        let binaries = [binary("enforcement"), binary("lifecycle")];
        let plan = Plan {
            binaries: &binaries,
            agent: Path::new("/t/egress-agent"),
            other_agent: Path::new("/t/egress-agent-other"),
            filter: Some("ipv6"),
            keep_going: false,
            timeout: 600,
            path: "/usr/bin:/bin",
            time_scale: 10,
        };
        let s = script(&plan);
        assert!(s.contains("export EGRESS_TEST_TIME_SCALE=10\n"), "{s}");
        assert!(s.contains(
            "run 'enforcement' '/w/tests' env CARGO_MANIFEST_DIR='/w/tests' timeout -k 10 600 '/t/deps/enforcement-0123' --test-threads=1 --include-ignored 'ipv6' || {"
        ), "{s}");
        assert!(s.contains("export EGRESS_AGENT_BIN='/t/egress-agent'"));
        assert!(s.trim_end().ends_with("finish"));
    }

    #[test]
    fn keep_going_runs_every_binary() {
        let binaries = [binary("enforcement")];
        let plan = Plan {
            binaries: &binaries,
            agent: Path::new("/a"),
            other_agent: Path::new("/b"),
            filter: None,
            keep_going: true,
            timeout: 1,
            path: "/bin",
            time_scale: 1,
        };
        let s = script(&plan);
        assert!(s.contains("--test-threads=1 --include-ignored\n"), "{s}");
        assert!(!s.contains("stopping after"));
    }
}
