//! The kernel integration suite, built on the host: the agent and the egress-tests binaries.
//! The VM sees the host's files at the same paths, so it runs exactly these executables.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    run::{build_agent, build_other_agent, cargo, describe},
    toolchain,
};

pub struct TestBinary {
    /// "enforcement", "prog_test_run", or "egress_tests-unit" for the library's unit tests.
    pub name: String,
    pub path: PathBuf,
    /// The package directory; cargo test runs binaries there.
    pub manifest_dir: PathBuf,
}

/// The built agent and test binaries, snapshotted (see [`snapshot`]).
pub struct Suite {
    pub agent: PathBuf,
    /// The agent with another build stamp (the upgrade test's other build).
    pub other_agent: PathBuf,
    pub binaries: Vec<TestBinary>,
}

/// Test binaries a full VM run leaves out (they need the real cluster; they can still be named
/// with `--test`).
const NOT_IN_VM: [&str; 7] = crate::e2e::SUITES;

/// Builds the agent and the egress-tests binaries, then snapshots them (all, or the ones named
/// in `only`) under `dir`.
pub fn build(dir: &Path, only: &[String]) -> Result<Suite> {
    let tc = toolchain::setup_build()?;
    // The manifest tests find it in the cache, which the guest sees through the shared host root.
    crate::kustomize::ensure()?;
    let agent = build_agent(&tc, false)?;
    let other_agent = build_other_agent(&tc)?;
    let mut cmd = cargo(&tc)?;
    // Human-readable diagnostics on stderr, one JSON message per line on stdout.
    cmd.args(["test", "--package", "egress-tests", "--no-run", "--message-format=json-render-diagnostics"]);
    let line = describe(&cmd);
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("starting `{line}`"))?;
    let mut binaries = Vec::new();
    for l in BufReader::new(child.stdout.take().expect("piped")).lines() {
        binaries.extend(test_binary(&l.context("reading cargo's messages")?));
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{line}` failed with {status}");
    }
    if binaries.is_empty() {
        bail!("`{line}` built no test executables");
    }
    // cargo reports them in build order; by name, runs and reports read the same every time.
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    if only.is_empty() {
        // They test no kernel feature, and under emulation their control plane alone would take
        // most of the run; `cargo xtask test` runs them on the host.
        binaries.retain(|b| {
            let keep = !NOT_IN_VM.contains(&b.name.as_str());
            if !keep {
                eprintln!(
                    "    {} runs on the host only (`cargo xtask test`); name it with --test to run it here",
                    b.name
                );
            }
            keep
        });
    } else {
        let names: Vec<String> = binaries.iter().map(|b| b.name.clone()).collect();
        binaries.retain(|b| only.contains(&b.name));
        if let Some(unknown) = only.iter().find(|o| !names.contains(o)) {
            bail!("--test {unknown}: no such test binary; there are {}", names.join(", "));
        }
    }
    snapshot(Suite { agent, other_agent, binaries }, dir)
}

/// The test executable a `compiler-artifact` message announces, if any.
fn test_binary(message: &str) -> Option<TestBinary> {
    let v: serde_json::Value = serde_json::from_str(message).ok()?;
    if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
        return None;
    }
    let path = PathBuf::from(v["executable"].as_str()?);
    let target = &v["target"];
    let mut name = target["name"].as_str()?.to_owned();
    if !target["kind"].as_array()?.iter().any(|k| k == "test") {
        name.push_str("-unit");
    }
    let manifest_dir = Path::new(v["manifest_path"].as_str()?).parent()?.to_path_buf();
    Some(TestBinary { name, path, manifest_dir })
}

/// Hard links (or copies) the executables into `dir`: the tree is shared with other work, and a
/// cargo build there while a VM runs must not swap the binaries under it. Cargo and the linker
/// replace outputs with new files, so a hard link keeps the old contents.
fn snapshot(suite: Suite, dir: &Path) -> Result<Suite> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let keep_as = |from: &Path, name: &std::ffi::OsStr| -> Result<PathBuf> {
        let to = dir.join(name);
        if fs::hard_link(from, &to).is_err() {
            fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
        Ok(to)
    };
    let keep = |from: &Path| keep_as(from, from.file_name().context("an executable has a file name")?);
    let agent = keep(&suite.agent)?;
    let other_agent = keep_as(&suite.other_agent, "egress-agent-other".as_ref())?;
    let binaries = suite
        .binaries
        .into_iter()
        .map(|b| Ok(TestBinary { path: keep(&b.path)?, ..b }))
        .collect::<Result<_>>()?;
    Ok(Suite { agent, other_agent, binaries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_test_executables_are_kept() {
        let integration = r#"{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"enforcement"},"profile":{"test":true},"executable":"/w/target/debug/deps/enforcement-0a1b"}"#;
        let b = test_binary(integration).unwrap();
        assert_eq!(b.name, "enforcement");
        assert_eq!(b.path, Path::new("/w/target/debug/deps/enforcement-0a1b"));
        assert_eq!(b.manifest_dir, Path::new("/w/tests"));
        let unit =
            integration.replace(r#"["test"],"name":"enforcement""#, r#"["lib"],"name":"egress_tests""#);
        assert_eq!(test_binary(&unit).unwrap().name, "egress_tests-unit");
        let dependency = integration.replace(r#""test":true"#, r#""test":false"#);
        assert!(test_binary(&dependency).is_none());
        assert!(test_binary(r#"{"reason":"build-finished","success":true}"#).is_none());
    }
}
