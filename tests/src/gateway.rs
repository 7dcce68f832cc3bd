//! The egress gateway on the simulated node: the real `egress-agent gateway` runs in the lab's
//! gateway namespace, real clients (curl, openssl, raw sockets) run in the pod namespace, and
//! real servers (python's http.server, `openssl s_server`) run in the external namespace on
//! addresses outside every non-public range, so the gateway treats them as internet hosts:
//!
//! ```text
//!   pod       10.231.0.2 (team-a)  10.231.0.12 (team-b)  10.231.0.13 (nobody)  fd00:231::2 (team-a)
//!   gateway   10.231.0.3           the gateway's listeners (ports below)
//!   external  11.231.0.5  2001:db9:231::5   HTTP :80 and :7000, HTTPS :443 (test CA)
//!             11.231.0.6                    HTTPS :443 with a self-signed certificate
//! ```
//!
//! Names resolve through `/etc/netns/<gateway ns>/hosts`, which `ip netns exec` mounts over
//! /etc/hosts for the gateway only; it and every server are removed on drop.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{GATEWAY4, Lab};

pub const UPSTREAM4: &str = "11.231.0.5";
pub const UPSTREAM6: &str = "2001:db9:231::5";
pub const BAD_TLS4: &str = "11.231.0.6";
pub const TEAM_B4: &str = "10.231.0.12";
pub const STRANGER4: &str = "10.231.0.13";

pub const PROXY_PORT: u16 = 3128;
pub const TLS_PORT: u16 = 8443;
pub const TRANSPARENT_PORT: u16 = 8080;
pub const ORIGINATE_PORT: u16 = 8081;
pub const FORWARD_PORT: u16 = 5432;
pub const FORWARD_BLOCKED_PORT: u16 = 5433;
pub const ADMIN_PORT: u16 = 9809;
/// The external HTTP server's body, so a test can tell it got the real upstream.
pub const UPSTREAM_BODY: &str = "hello from the upstream\n";

const HOSTS: &str = "\
127.0.0.1 localhost
11.231.0.5 api.example.test www.example.test forbidden.example.test
2001:db9:231::5 v6.example.test
11.231.0.6 bad.example.test
10.231.0.5 internal.example.test
11.231.0.8 switch.example.test
169.254.169.254 meta.example.test
127.0.0.1 loop.example.test
::ffff:127.0.0.1 mapped.example.test
64:ff9b:1::a9fe:a9fe nat64.example.test
";

/// The configuration most tests use; `{ca}`, `{max_connections}` are filled in.
pub fn base_config(ca: &Path, max_connections: usize) -> String {
    format!(
        r#"
listeners:
  httpProxy: {{listen: "0.0.0.0:{PROXY_PORT}"}}
  tlsPassthrough: {{listen: "[::]:{TLS_PORT}", upstreamPort: 443}}
  httpTransparent: {{listen: "0.0.0.0:{TRANSPARENT_PORT}", upstreamPort: 80}}
  tcpForwards:
    - {{listen: "0.0.0.0:{FORWARD_PORT}", upstream: "api.example.test:7000"}}
    - {{listen: "0.0.0.0:{FORWARD_BLOCKED_PORT}", upstream: "internal.example.test:80"}}
  tlsOrigination: {{listen: "0.0.0.0:{ORIGINATE_PORT}", hosts: [api.example.test, bad.example.test], caFile: "{ca}"}}
admin: "0.0.0.0:{ADMIN_PORT}"
sources:
  static:
    - {{cidr: 10.231.0.2/32, namespace: team-a}}
    - {{cidr: "fd00:231::2/128", namespace: team-a}}
    - {{cidr: 10.231.0.12/32, namespace: team-b}}
rules:
  - namespaces: [team-a]
    hosts: [api.example.test, www.example.test, v6.example.test, bad.example.test, nowhere.example.test,
            internal.example.test, meta.example.test, loop.example.test, mapped.example.test,
            nat64.example.test]
    ports: [80, 443, 7000]
  - namespaces: [team-b]
    hosts: [www.example.test]
    ports: [80]
limits:
  maxConnections: {max_connections}
  headerTimeout: 1s
  idleTimeout: 2s
  connectTimeout: 2s
drainTimeout: 3s
"#,
        ca = ca.display()
    )
}

pub struct GatewayLab {
    pub lab: Lab,
    pub ca: PathBuf,
    etc_netns: PathBuf,
    servers: Vec<Child>,
}

impl GatewayLab {
    #[expect(clippy::new_without_default, reason = "building a lab has side effects")]
    pub fn new() -> Self {
        let lab = Lab::new();
        let etc_netns = Path::new("/etc/netns").join(&lab.gateway.name);
        let mut g = Self { lab, ca: PathBuf::new(), etc_netns, servers: Vec::new() };
        g.build().unwrap_or_else(|e| panic!("building the gateway lab: {e:#}"));
        g
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let (pod, gw, ext) = (&self.lab.pod, &self.lab.gateway, &self.lab.external);
        for a in [TEAM_B4, STRANGER4] {
            pod.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
        }
        ext.ip(&["addr", "add", &format!("{UPSTREAM4}/24"), "dev", "eth0"])?;
        ext.ip(&["addr", "add", &format!("{BAD_TLS4}/24"), "dev", "eth0"])?;
        ext.ip(&["addr", "add", &format!("{UPSTREAM6}/64"), "dev", "eth0", "nodad"])?;
        // The "internet" is on the same bridge: on-link routes from the gateway only.
        gw.ip(&["route", "add", "11.231.0.0/24", "dev", "eth0"])?;
        gw.ip(&["-6", "route", "add", "2001:db9:231::/64", "dev", "eth0"])?;
        fs::create_dir_all(&self.etc_netns)?;
        fs::write(self.etc_netns.join("hosts"), HOSTS)?;
        // Names not in the hosts file fail fast (nothing listens on 53 in the namespace).
        fs::write(
            self.etc_netns.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )?;
        self.ca = self.make_certs()?;
        self.start_servers()?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.lab.dir
    }

    /// A test CA, a certificate for api/www.example.test signed by it, and a self-signed one
    /// for bad.example.test, made with the openssl CLI.
    fn make_certs(&self) -> anyhow::Result<PathBuf> {
        let d = self.dir();
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            d,
            &[&["req", "-x509"], &key[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]].concat(),
            "/CN=egressfw test CA",
        )?;
        openssl(
            d,
            &[&["req"], &key[..], &["-keyout", "leaf.key", "-out", "leaf.csr"]].concat(),
            "/CN=api.example.test",
        )?;
        fs::write(d.join("leaf.ext"), "subjectAltName=DNS:api.example.test,DNS:www.example.test\n")?;
        run_ok(Command::new("openssl").current_dir(d).args([
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]))?;
        openssl(
            d,
            &[
                &["req", "-x509"],
                &key[..],
                &[
                    "-keyout",
                    "bad.key",
                    "-out",
                    "bad.pem",
                    "-days",
                    "2",
                    "-addext",
                    "subjectAltName=DNS:bad.example.test",
                ],
            ]
            .concat(),
            "/CN=bad.example.test",
        )?;
        Ok(d.join("ca.pem"))
    }

    fn start_servers(&mut self) -> anyhow::Result<()> {
        let www = self.dir().join("www");
        fs::create_dir_all(&www)?;
        fs::write(www.join("index.html"), UPSTREAM_BODY)?;
        let ext = &self.lab.external;
        let d = self.dir().to_path_buf();
        let mut spawn = |mut cmd: Command| -> anyhow::Result<()> {
            let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
            self.servers.push(child);
            Ok(())
        };
        for port in ["80", "7000"] {
            let mut c = ext.command("python3", None);
            c.args(["-m", "http.server", port, "--bind", "::", "--directory"]).arg(&www);
            spawn(c)?;
        }
        for (addr, cert, key) in [(UPSTREAM4, "leaf.pem", "leaf.key"), (BAD_TLS4, "bad.pem", "bad.key")] {
            let mut c = ext.command("openssl", None);
            c.current_dir(&d).args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &format!("{addr}:443"),
                "-cert",
                cert,
                "-key",
                key,
            ]);
            spawn(c)?;
        }
        for (addr, port) in
            [(UPSTREAM4, 80), (UPSTREAM4, 7000), (UPSTREAM6, 80), (UPSTREAM4, 443), (BAD_TLS4, 443)]
        {
            let sa: SocketAddr = crate::sock(addr, port);
            ext.within(|| wait_listening(sa)).map_err(|e| anyhow::anyhow!("upstream {sa}: {e}"))?;
        }
        Ok(())
    }

    /// Starts the gateway with `config` (YAML) and waits until it logs that it is ready.
    pub fn start(&self, config: &str) -> Gateway {
        self.try_start(config).unwrap_or_else(|log| panic!("gateway did not start; its log:\n{log}"))
    }

    /// The gateway's resolv.conf (mounted by `ip netns exec` when the gateway starts).
    pub fn resolv_conf(&self) -> PathBuf {
        self.etc_netns.join("resolv.conf")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("gateway.yaml")
    }

    pub fn try_start(&self, config: &str) -> Result<Gateway, String> {
        self.try_start_with_env(config, &[])
    }

    /// Like [`Self::try_start`], with extra environment (KUBECONFIG for the pod watch).
    pub fn try_start_with_env(&self, config: &str, env: &[(&str, &Path)]) -> Result<Gateway, String> {
        self.try_start_logging_to(config, env, None)
    }

    /// Starts the gateway with its access log (stdout) going into a pipe nobody reads: once the
    /// pipe is full, stdout blocks, as with a stalled log shipper.
    pub fn start_with_stuck_stdout(&self, config: &str, env: &[(&str, &Path)]) -> Gateway {
        self.try_start_logging_to(config, env, Some(Stdio::piped()))
            .unwrap_or_else(|log| panic!("gateway did not start; its log:\n{log}"))
    }

    fn try_start_logging_to(
        &self,
        config: &str,
        env: &[(&str, &Path)],
        stdout: Option<Stdio>,
    ) -> Result<Gateway, String> {
        fs::write(self.config_path(), config).expect("writing the gateway config");
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let access = self.dir().join(format!("gateway-{n}.access.log"));
        let stdout = stdout.unwrap_or_else(|| fs::File::create(&access).expect("access log file").into());
        let log = self.dir().join(format!("gateway-{n}.log"));
        // `ip netns exec` (not setns) so the namespace's hosts file is mounted for the gateway.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.lab.gateway.name])
            .arg(crate::agent_bin())
            .args(["--log-format", "json", "gateway", "--threads", "2", "--config"])
            .arg(self.config_path())
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(fs::File::create(&log).expect("gateway log file"))
            .spawn()
            .expect("spawning egress-agent gateway");
        let mut g = Gateway { child: Some(child), access, log };
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        loop {
            if g.log_text().contains("\"message\":\"gateway ready\"") {
                return Ok(g);
            }
            if g.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).is_some()
                || Instant::now() > deadline
            {
                let text = g.log_text();
                g.kill();
                return Err(text);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts the gateway on the base configuration with client identities from a fake API
    /// server (in the gateway's namespace, where the gateway reaches it) and a rule that lets
    /// namespace team-c reach `team_c_host`; waits until the pod list is synced (ready).
    pub fn start_with_pod_watch(&self, team_c_host: &str) -> (crate::fake_api::FakeApi, Gateway) {
        let api = self
            .lab
            .gateway
            .within(|| crate::fake_api::FakeApi::start_with(crate::fake_api::Options::default()))
            .expect("starting the fake API server");
        let kubeconfig = self.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let config = base_config(&self.ca, 100)
            // The fake API server serves pods only: no policy resources to wait for.
            .replace("sources:\n  static:", "policyResources: false\nsources:\n  kubernetes: true\n  static:")
            .replace("limits:", &format!("  - namespaces: [team-c]\n    hosts: [{team_c_host}]\nlimits:"));
        let gw = self
            .try_start_with_env(&config, &[("KUBECONFIG", &kubeconfig)])
            .unwrap_or_else(|log| panic!("gateway did not start:\n{log}"));
        wait_until("the gateway ready (pod list synced)", Duration::from_secs(10), || {
            self.admin_get("/readyz").0 == 200
        });
        (api, gw)
    }

    /// curl in the pod namespace from `source` (one of the pod's addresses).
    pub fn curl(&self, source: &str, args: &[&str]) -> Output {
        let mut all =
            vec!["-sS", "--max-time", "5", "--interface", source, "-o", "-", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        self.lab.pod.run(None, "curl", &all)
    }

    /// Runs `f` (raw socket clients) in the pod namespace.
    pub fn in_pod<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.lab.pod.within(f)
    }

    /// `host:port` of a gateway listener, as a socket address.
    pub fn gateway_addr(port: u16) -> SocketAddr {
        crate::sock(GATEWAY4, port)
    }

    /// GET on the admin endpoint, from the pod namespace (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.in_pod(|| http_get(Self::gateway_addr(ADMIN_PORT), path))
    }
}

impl Drop for GatewayLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = fs::remove_dir_all(&self.etc_netns);
    }
}

/// The status code curl printed last (`-w %{http_code}`), and the body before it.
pub fn status_and_body(out: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn openssl(dir: &Path, args: &[&str], subject: &str) -> anyhow::Result<()> {
    run_ok(Command::new("openssl").current_dir(dir).args(args).args(["-subj", subject]))
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out =
        cmd.output().map_err(|e| anyhow::anyhow!("running {cmd:?}: {e} (cargo xtask setup installs it)"))?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let patience = crate::patience(Duration::from_secs(10));
    let deadline = Instant::now() + patience;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("not listening after {} s: {e}", patience.as_secs()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A minimal HTTP/1.1 GET (Connection: close), for the admin endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connecting to the admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A raw client (run it in the pod namespace): sends `request` to the gateway's `port` in one
/// write, exactly as given (curl would normalise targets such as `0x7f.1`), and reads until the
/// gateway closes or 3 s pass. Returns the reply and whether the gateway closed.
pub fn raw_request(port: u16, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect((GATEWAY4, port))
        .unwrap_or_else(|e| panic!("connect to the gateway's port {port}: {e}"));
    s.write_all(request).expect("write the request");
    let (got, closed) = read_reply(&mut s, Duration::from_secs(3));
    (String::from_utf8_lossy(&got).to_string(), closed)
}

/// Opens `CONNECT authority` on the proxy port (run it in the pod namespace) and returns the
/// socket once the gateway answered 200.
pub fn connect_tunnel(authority: &str) -> TcpStream {
    let mut s = TcpStream::connect((GATEWAY4, PROXY_PORT)).expect("connect to the proxy port");
    s.set_nodelay(true).expect("nodelay");
    write!(s, "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").expect("CONNECT");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).expect("CONNECT reply");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT {authority}: {head}");
    s
}

/// Reads until the peer closes or `limit` passes: the bytes, and whether the peer closed.
pub fn read_reply(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset after the reply counts as closed; a timeout as still open.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

pub use crate::wait_until;

/// The running gateway; killed on drop.
pub struct Gateway {
    child: Option<Child>,
    pub access: PathBuf,
    pub log: PathBuf,
}

impl Gateway {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every complete access-log line so far (one still being written, without its newline
    /// yet, is left for the next read).
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.access)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (up to 5 s) for an access-log line that satisfies `pred`.
    pub fn wait_access(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let mut found = None;
        crate::poll_until(Duration::from_secs(5), || {
            found = self.access_lines().into_iter().find(|v| pred(v));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no access-log line for {what}; lines:\n{}\ngateway log:\n{}",
                fs::read_to_string(&self.access).unwrap_or_default(),
                self.log_text()
            )
        })
    }

    /// Waits (up to 5 s) until the access log has at least `n` lines, and a moment more for any
    /// extra line to show; returns them all.
    pub fn wait_lines(&self, n: usize) -> Vec<serde_json::Value> {
        crate::poll_until(Duration::from_secs(5), || self.access_lines().len() >= n);
        std::thread::sleep(Duration::from_millis(100));
        self.access_lines()
    }

    /// Waits for the access-log line of a request to `authority` and returns it.
    pub fn line_for(&self, authority: &str) -> serde_json::Value {
        self.wait_access(authority, |v| v["authority"] == authority)
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("gateway is running");
        // `ip netns exec` execs the agent, so the pid is the gateway's.
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `limit` (times the VM's scale) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        crate::poll_until(limit, || {
            status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}
