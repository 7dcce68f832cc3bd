//! Small helpers for running commands with errors that name what failed.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::toolchain::{self, EbpfToolchain};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits inside the workspace").to_path_buf()
}

/// Human-readable form of a command line, for error messages and progress output.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio and fails if it exits non-zero.
pub fn status(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd.status().with_context(|| format!("could not start `{line}` (is it installed?)"))?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; stderr is included in the error on failure.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = describe(cmd);
    let out = cmd.output().with_context(|| format!("could not start `{line}` (is it installed?)"))?;
    if !out.status.success() {
        bail!("`{line}` failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// `cargo <args>` in the workspace, with what the eBPF build needs: the project's bpf-linker
/// first on PATH and the eBPF toolchain choice.
pub fn cargo(toolchain: &EbpfToolchain) -> Result<Command> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root());
    let linker_dir = toolchain::bpf_linker_bin_dir(toolchain)?;
    let path = env::var_os("PATH").unwrap_or_default();
    let joined = env::join_paths(std::iter::once(linker_dir).chain(env::split_paths(&path)))?;
    cmd.env("PATH", joined);
    toolchain.apply(&mut cmd);
    Ok(cmd)
}

/// Builds the agent binary and returns its path.
pub fn build_agent(toolchain: &EbpfToolchain, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo(toolchain)?;
    cmd.args(["build", "--package", "egress-agent"]);
    if release {
        cmd.arg("--release");
    }
    // The eBPF programs build inside the agent's build script, which shows no progress of its
    // own: say what is happening before a first build goes quiet for minutes.
    eprintln!("    building the agent and its eBPF programs (a few minutes the first time)");
    status(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("egress-agent"))
}

/// The agent built again with another build stamp (egress-ebpf/src/stamp.rs), in a target
/// directory of its own so neither build undoes the other: "a different build" for the upgrade
/// test. Returns its path.
pub fn build_other_agent(toolchain: &EbpfToolchain) -> Result<PathBuf> {
    let dir = workspace_root().join("target").join("other-build");
    let mut cmd = cargo(toolchain)?;
    cmd.args(["build", "--package", "egress-agent"])
        .env("CARGO_TARGET_DIR", &dir)
        .env("EGRESSFW_BUILD_STAMP", "1");
    status(&mut cmd)?;
    Ok(dir.join("debug").join("egress-agent"))
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, cgroups, BPF): run it as root");
    }
    Ok(())
}

/// The machine's Go: `go` on PATH, or where the official tarball installs it (a shell that did
/// not read the profile may lack that PATH entry). Never a toolchain download (`GOTOOLCHAIN=local`).
pub fn go() -> Result<Command> {
    let found = ["go", "/usr/local/go/bin/go"]
        .into_iter()
        .find(|go| Command::new(go).arg("version").output().is_ok_and(|o| o.status.success()));
    let Some(go) = found else {
        bail!(
            "Go is needed to build kustomize, Kubernetes and etcd for the tests: no `go` on PATH nor /usr/local/go/bin/go"
        );
    };
    let mut cmd = Command::new(go);
    cmd.env("GOTOOLCHAIN", "local");
    Ok(cmd)
}
