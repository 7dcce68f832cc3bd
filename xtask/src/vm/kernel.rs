//! A Debian kernel ready to boot: the newest image package of a series, downloaded once and
//! kept extracted (vmlinuz plus a module tree with the indexes `modprobe` needs).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{apt::Apt, candidates};
use crate::run::status;

pub struct Kernel {
    /// What was asked for: "6.1", "6.12".
    pub series: String,
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel, e.g. "6.1.0-56-amd64".
    pub release: String,
    /// Holds `boot/vmlinuz-<release>` and `lib/modules/<release>`.
    root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Where per-kernel files (the initramfs) can be kept next to the extracted kernel.
    pub fn dir(&self) -> &Path {
        self.root.parent().expect("the extracted root lives in a per-package directory")
    }

    /// "6.1 (6.1.0-56-amd64)"
    pub fn label(&self) -> String {
        format!("{} ({})", self.series, self.release)
    }
}

/// Marks a completely extracted and indexed kernel; holds its release.
const COMPLETE: &str = "release";

/// The newest kernel of `series`, from the cache when this exact package version is there.
pub fn fetch(apt: &Apt, cache: &Path, series: &str) -> Result<Kernel> {
    apt.update_if_stale()?;
    let names: Vec<String> = apt
        .package_names(&format!("linux-image-{series}"))?
        .into_iter()
        .filter(|n| candidates::image_of_series(series, n).is_some())
        .collect();
    let Some(chosen) = candidates::newest(series, &apt.madison(&names)?) else {
        bail!(
            "no Debian linux-image package of kernel {series} (amd64) in bookworm, bookworm-backports or trixie"
        );
    };
    let dir = cache.join("kernels").join(format!("{}_{}", chosen.package, chosen.version));
    let root = dir.join("root");
    let kernel = |release: String| Kernel {
        series: series.into(),
        package: chosen.package.clone(),
        version: chosen.version.clone(),
        release,
        root: root.clone(),
    };
    if let Ok(release) = fs::read_to_string(dir.join(COMPLETE)) {
        eprintln!("vm: kernel {series}: {} {} (cached)", chosen.package, chosen.version);
        return Ok(kernel(release.trim().to_owned()));
    }
    eprintln!("vm: kernel {series}: downloading {} {}", chosen.package, chosen.version);
    let deb = apt.download(&chosen.package, &chosen.version, &cache.join("debs"))?;
    let _ = fs::remove_dir_all(&dir);
    let release = extract(&deb, &root).with_context(|| format!("unpacking {}", deb.display()))?;
    fs::write(dir.join(COMPLETE), &release).with_context(|| format!("writing {}", dir.display()))?;
    // The extracted tree is what is kept; the package itself is 70-110 MB.
    let _ = fs::remove_file(&deb);
    Ok(kernel(release))
}

/// Unpacks the image package into `root`, moves the modules to `lib/modules` (trixie ships them
/// under `usr/lib/modules`) and builds modules.dep and friends, which Debian's postinst would
/// otherwise create on install. Returns the kernel release.
fn extract(deb: &Path, root: &Path) -> Result<String> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    let lib_modules = root.join("lib/modules");
    let usr_lib_modules = root.join("usr/lib/modules");
    if !lib_modules.exists() && usr_lib_modules.exists() {
        fs::create_dir_all(root.join("lib"))?;
        fs::rename(&usr_lib_modules, &lib_modules)
            .with_context(|| format!("moving {} to {}", usr_lib_modules.display(), lib_modules.display()))?;
    }
    let releases: Vec<String> = fs::read_dir(&lib_modules)
        .with_context(|| format!("the package has no module tree ({})", lib_modules.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let [release] = releases.as_slice() else {
        bail!("expected one kernel release in {}, found {releases:?}", lib_modules.display());
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("the package has no {}", vmlinuz.display());
    }
    status(Command::new("depmod").arg("-b").arg(root).arg(release))
        .with_context(|| format!("indexing the modules of {release}"))?;
    Ok(release.clone())
}
