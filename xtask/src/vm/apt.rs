//! A private apt configuration for kernel packages: its own sources list, index and cache
//! directories under the VM cache, so the host's /etc/apt and package lists are never touched
//! and suites the host does not use (bookworm-backports, trixie) are available.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::run::{output, status};

/// Every suite a Debian kernel series may come from; the security suites carry the newest
/// point releases of each stable kernel.
const SOURCES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian", "trixie-updates"),
    ("http://deb.debian.org/debian-security", "trixie-security"),
];

/// The archive keyring of a Debian host knows the bookworm and trixie signing keys.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Indexes younger than this are reused: a second run within a day downloads nothing.
const REFRESH_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Writes the sources list and creates the state and cache directories under `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "state"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let list: String = SOURCES
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        let path = dir.join("sources.list");
        fs::write(&path, list).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// `apt-get`/`apt-cache` pointed at the private configuration only.
    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", d("sources.list")),
            // Without this the host's sources.list.d would be read as well.
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::State", d("state")),
            ("Dir::State::Lists", d("lists")),
            ("Dir::Cache", d("cache")),
            // The host's installed packages, read-only: apt needs a status file to plan anything.
            ("Dir::State::status", "/var/lib/dpkg/status".into()),
            ("Acquire::Languages", "none".into()),
            // The cache lives under $HOME, which apt's unprivileged `_apt` user cannot write.
            ("APT::Sandbox::User", "root".into()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd
    }

    /// Downloads the package indexes unless they are fresh; with stale indexes and no network,
    /// carries on with what it has (the kernels it names are likely cached already).
    pub fn update_if_stale(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        let age = fs::metadata(&stamp).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a < REFRESH_AFTER) {
            return Ok(());
        }
        let suites: Vec<&str> = SOURCES.iter().map(|(_, s)| *s).collect();
        eprintln!("vm: refreshing package indexes for {}", suites.join(", "));
        let result = status(self.command("apt-get").args(["update", "-qq"]));
        match (result, age) {
            (Ok(()), _) => {
                fs::write(&stamp, format!("{:?}\n", SystemTime::now()))
                    .with_context(|| format!("writing {}", stamp.display()))?;
                Ok(())
            }
            (Err(e), Some(_)) => {
                eprintln!("vm: warning: could not refresh the package indexes ({e:#}); using the old ones");
                Ok(())
            }
            (Err(e), None) => {
                Err(e).context("downloading the Debian package indexes (is deb.debian.org reachable?)")
            }
        }
    }

    /// Names of all packages starting with `prefix`.
    pub fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let out = output(self.command("apt-cache").args(["pkgnames", prefix]))?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// `apt-cache madison` for these packages: one `package | version | source` line each.
    pub fn madison(&self, packages: &[String]) -> Result<String> {
        if packages.is_empty() {
            return Ok(String::new());
        }
        output(self.command("apt-cache").arg("madison").args(packages))
    }

    /// Downloads `package` at `version` into `into` (emptied first) and returns the .deb path.
    pub fn download(&self, package: &str, version: &str, into: &Path) -> Result<PathBuf> {
        let _ = fs::remove_dir_all(into);
        fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
        status(
            self.command("apt-get")
                .current_dir(into)
                .args(["download", "-q"])
                .arg(format!("{package}={version}")),
        )
        .with_context(|| format!("downloading {package} {version}"))?;
        let deb = fs::read_dir(into)
            .with_context(|| format!("reading {}", into.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"));
        match deb {
            Some(deb) => Ok(deb),
            None => bail!("apt-get download {package}={version} left no .deb in {}", into.display()),
        }
    }
}
