//! The real kustomize for the manifest tests: built from its Go module
//! (`sigs.k8s.io/kustomize/kustomize/v5`, its documented install) at a pinned version, once, into
//! `~/.cache/egressfw/kustomize-<version>/`, which survives `cargo clean` like the bpf-linker
//! build. The tests find it there or through `EGRESSFW_KUSTOMIZE`.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::run::{go, status};

/// The release the tests render with (the engine of `kubectl kustomize` 1.35). Also named in
/// tests/tests/deploy_manifests/render.rs, which looks for this build.
pub const VERSION: &str = "v5.8.1";
const MODULE: &str = "sigs.k8s.io/kustomize/kustomize/v5";
/// What the manifest tests read.
pub const ENV: &str = "EGRESSFW_KUSTOMIZE";

/// The kustomize binary, built first if the cache has none.
pub fn ensure() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    let dir = Path::new(&home).join(format!(".cache/egressfw/kustomize-{VERSION}"));
    let binary = dir.join("kustomize");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!("    building kustomize {VERSION} from its Go module (once; about a minute)");
    // Into a directory of its own first, so an interrupted build never leaves a binary behind.
    let building = dir.with_file_name(format!("kustomize-{VERSION}.partial"));
    let _ = fs::remove_dir_all(&building);
    fs::create_dir_all(&building).with_context(|| format!("creating {}", building.display()))?;
    status(
        go()?
            .args(["install", &format!("{MODULE}@{VERSION}")])
            .env("GOBIN", &building)
            .env("CGO_ENABLED", "0"),
    )?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&building, &dir).with_context(|| format!("moving the build to {}", dir.display()))?;
    Ok(binary)
}
