//! A real squid as the corporate proxy the gateway chains to (`upstreamProxy`): it runs in the
//! lab's external namespace on 10.231.0.5:3129, resolves the test names through a hosts file of
//! its own (to the external host's upstream servers), refuses `blocked.example.test`, and with
//! credentials asks for basic authentication (squid's own `basic_ncsa_auth` helper). Its access
//! log shows what reached it. Killed on drop.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    gateway::UPSTREAM4,
    lab::{EXTERNAL4, Lab},
};

pub const PARENT_PORT: u16 = 3129;
/// A name the gateway's rules allow and squid refuses.
pub const PARENT_BLOCKED: &str = "blocked.example.test";
/// A name only squid can resolve (the upstream server's address): reachable only through it.
pub const PARENT_ONLY: &str = "only-via-parent.example.test";
const BASIC_AUTH_HELPER: &str = "/usr/lib/squid/basic_ncsa_auth";

pub struct ParentProxy {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl ParentProxy {
    /// Starts squid; with `credentials` (user, password) every request must carry them.
    pub fn start(lab: &Lab, credentials: Option<(&str, &str)>) -> Self {
        Self::start_on(lab, PARENT_PORT, credentials)
    }

    /// Another squid next to the first, on `port` of the same address (state of its own).
    pub fn start_on(lab: &Lab, port: u16, credentials: Option<(&str, &str)>) -> Self {
        Self::try_start(lab, port, credentials)
            .unwrap_or_else(|e| panic!("starting squid as the parent proxy on port {port}: {e:#}"))
    }

    fn try_start(lab: &Lab, port: u16, credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new("/usr/sbin/squid").exists(),
            "squid is not installed (/usr/sbin/squid): `cargo xtask setup` installs it (Debian package squid)"
        );
        let dir = lab.dir.join(format!("parent-proxy-{port}"));
        fs::create_dir_all(&dir)?;
        // Squid drops root for its `proxy` user before it opens its logs.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
        let d = dir.display();
        fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{UPSTREAM4} api.example.test www.example.test {PARENT_BLOCKED} {PARENT_ONLY}\n"
            ),
        )?;
        let auth = match credentials {
            None => "http_access allow all\n".to_owned(),
            Some((user, password)) => {
                anyhow::ensure!(
                    Path::new(BASIC_AUTH_HELPER).exists(),
                    "{BASIC_AUTH_HELPER} is missing (Debian package squid)"
                );
                let out = Command::new("openssl").args(["passwd", "-apr1", password]).output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "openssl passwd: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let passwd = dir.join("passwd");
                fs::write(&passwd, format!("{user}:{}", String::from_utf8_lossy(&out.stdout)))?;
                fs::set_permissions(&passwd, fs::Permissions::from_mode(0o644))?;
                format!(
                    "auth_param basic program {BASIC_AUTH_HELPER} {d}/passwd\nauth_param basic realm egressfw-test\n\
                     auth_param basic children 1\nacl authenticated proxy_auth REQUIRED\n\
                     http_access allow authenticated\nhttp_access deny all\n"
                )
            }
        };
        let config = format!(
            "http_port {EXTERNAL4}:{port}\nacl blocked dstdomain {PARENT_BLOCKED}\nhttp_access deny blocked\n{auth}\
             cache deny all\nworkers 1\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log squid\ncache_store_log none\ncoredump_dir {d}\n\
             netdb_filename none\npinger_enable off\nvisible_hostname egressfw-parent\nhosts_file {d}/hosts\n\
             dns_nameservers 127.0.0.1\n"
        );
        fs::write(dir.join("squid.conf"), config)?;
        let child = lab
            .external
            .command("squid", None)
            .arg("-N")
            // Its own service name: two squids must not share shared-memory segments.
            .arg("-n")
            .arg(format!("egressfw{port}"))
            .arg("-f")
            .arg(dir.join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()?;
        let mut parent = Self { child: Some(child), dir, port };
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        let addr = crate::sock(EXTERNAL4, port);
        loop {
            if lab
                .gateway
                .within(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .is_ok()
            {
                return Ok(parent);
            }
            let exited = parent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = parent.logs();
                parent.stop();
                anyhow::bail!("squid did not listen on {addr} ({exited:?}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `address:port` of the first squid as the gateway's configuration names it.
    pub fn address() -> String {
        format!("{EXTERNAL4}:{PARENT_PORT}")
    }

    /// `address:port` of this squid.
    pub fn addr(&self) -> String {
        format!("{EXTERNAL4}:{}", self.port)
    }

    /// Squid's access log so far (native format: one line per request, the URL or CONNECT
    /// authority in the seventh field and the user in the eighth).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        ["stderr.log", "cache.log"]
            .iter()
            .map(|f| format!("--- {f}\n{}", fs::read_to_string(self.dir.join(f)).unwrap_or_default()))
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ParentProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
