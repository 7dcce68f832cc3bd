//! Container images for the test cluster, assembled here since nothing can be pulled: OCI
//! image layouts made with umoci (Debian package) from files of this machine, archived, and
//! imported into the node's containerd under the names the pods use ([`super::node::Node::import_image`]).
//!
//! - **pause**: the sandbox image, our own static `tests/images/pause.c`.
//! - **client**: a root with only the merged-/usr links (`bin`, `lib`, `lib64`, `sbin`) and the
//!   user database; client pods mount the host's `/usr` read-only and so run the machine's own
//!   curl, python3 and dnsmasq.
//! - **egress-agent**: the binary under test (debug information stripped) and the libraries it
//!   links, at `/usr/local/bin/egress-agent` as `deploy/Dockerfile` puts it, with the host's CA
//!   bundle where distroless has one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// An OCI archive and the name it is imported under (its tag is inside).
pub struct Image {
    pub archive: PathBuf,
    pub base_name: String,
}

pub const CLIENT_IMAGE: &str = "egfw.test/client:1";
/// The name the manifests give the agent's image (`egress-agent`, tag set by
/// deploy/base/kustomization.yaml), as containerd normalises it.
pub const AGENT_BASE_NAME: &str = "docker.io/library/egress-agent";

/// What goes into an image's root.
#[derive(Default)]
struct Contents<'a> {
    /// (file on this machine, path in the image)
    files: Vec<(PathBuf, String)>,
    /// (link in the image, target)
    symlinks: Vec<(&'a str, &'a str)>,
    entrypoint: Vec<&'a str>,
}

pub fn pause(work: &Path) -> Result<Image> {
    let source = work.join("pause.c");
    fs::create_dir_all(work)?;
    fs::write(&source, include_str!("../../images/pause.c"))?;
    let binary = work.join("pause");
    run(Command::new("gcc").args(["-Os", "-static", "-o"]).arg(&binary).arg(&source), "gcc")?;
    let contents =
        Contents { files: vec![(binary, "/pause".into())], entrypoint: vec!["/pause"], ..Default::default() };
    let archive = assemble(work, "pause", "3.10", &contents)?;
    Ok(Image { archive, base_name: "registry.k8s.io/pause".into() })
}

pub fn client(work: &Path) -> Result<Image> {
    // Users and groups by name (dnsmasq looks up the user it runs as).
    let etc = ["/etc/passwd", "/etc/group"].map(|f| (PathBuf::from(f), f.to_owned()));
    let contents = Contents {
        files: etc.to_vec(),
        symlinks: vec![("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")],
        entrypoint: vec!["/usr/bin/sleep", "infinity"],
    };
    let (name, tag) = CLIENT_IMAGE.rsplit_once(':').context("client image tag")?;
    let archive = assemble(work, "client", tag, &contents)?;
    Ok(Image { archive, base_name: name.into() })
}

/// The agent's image with `binary`, tagged `tag` (the manifests' tag).
pub fn agent(work: &Path, binary: &Path, tag: &str) -> Result<Image> {
    fs::create_dir_all(work)?;
    let stripped = work.join("egress-agent");
    run(Command::new("strip").arg("--strip-debug").arg("-o").arg(&stripped).arg(binary), "strip (binutils)")?;
    let mut files = vec![(stripped.clone(), "/usr/local/bin/egress-agent".to_owned())];
    for library in linked_libraries(&stripped)? {
        let inside = library.display().to_string();
        files.push((fs::canonicalize(&library)?, inside));
    }
    files.push(("/etc/ssl/certs/ca-certificates.crt".into(), "/etc/ssl/certs/ca-certificates.crt".into()));
    let contents = Contents { files, entrypoint: vec!["/usr/local/bin/egress-agent"], ..Default::default() };
    let archive = assemble(work, "egress-agent", tag, &contents)?;
    Ok(Image { archive, base_name: AGENT_BASE_NAME.into() })
}

/// The shared libraries `binary` loads, as `ldd` lists them (the loader included).
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// An OCI layout `<work>/<name>-layout` with one image `tag` of `contents`, archived as
/// `<work>/<name>.tar` (what `ctr images import` reads).
fn assemble(work: &Path, name: &str, tag: &str, contents: &Contents) -> Result<PathBuf> {
    let layout = work.join(format!("{name}-layout"));
    let bundle = work.join(format!("{name}-bundle"));
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&bundle);
    fs::create_dir_all(work)?;
    let image = format!("{}:{tag}", layout.display());
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    let root = bundle.join("rootfs");
    for (from, inside) in &contents.files {
        let to = root.join(inside.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("a file at the root")?)?;
        fs::copy(from, &to).with_context(|| format!("copying {} into the {name} image", from.display()))?;
    }
    for (link, target) in &contents.symlinks {
        std::os::unix::fs::symlink(target, root.join(link))?;
    }
    fs::create_dir_all(root.join("tmp"))?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    let mut config = vec!["config".to_owned(), "--image".into(), image];
    for word in &contents.entrypoint {
        config.push(format!("--config.entrypoint={word}"));
    }
    umoci(&config.iter().map(String::as_str).collect::<Vec<_>>())?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    let archive = work.join(format!("{name}.tar"));
    run(Command::new("tar").arg("-C").arg(&layout).arg("-cf").arg(&archive).arg("."), "tar")?;
    let _ = fs::remove_dir_all(&bundle);
    Ok(archive)
}

fn umoci(args: &[&str]) -> Result<()> {
    run(Command::new("umoci").args(args), "umoci (Debian package umoci)")
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} ({cmd:?}): {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
