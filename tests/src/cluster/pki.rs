//! Certificates and keys of a test cluster, made with the openssl command: one CA that signs the
//! API server's serving certificate and every client certificate, the service-account signing
//! key, and a kubeconfig per client. Client identities are what Kubernetes reads from a
//! certificate: the common name is the user, each organisation a group.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Days every certificate is valid: longer than any test, short enough to notice if reused.
const DAYS: &str = "30";

/// The files of one cluster's PKI, under one directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA, the API server's serving certificate (for `server_ips` and the in-cluster names),
    /// and the service-account key pair.
    pub fn create(dir: &Path, server_ips: &[Ipv4Addr]) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Self { dir: dir.to_path_buf() };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            DAYS,
            "-subj",
            "/CN=egressfw-test-ca",
            "-keyout",
            &pki.path("ca.key"),
            "-out",
            &pki.path("ca.crt"),
        ])?;
        let mut sans: Vec<String> =
            ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"]
                .iter()
                .map(|n| format!("DNS:{n}"))
                .collect();
        sans.push("DNS:kubernetes.default.svc.cluster.local".into());
        sans.push("IP:127.0.0.1".into());
        sans.extend(server_ips.iter().map(|ip| format!("IP:{ip}")));
        pki.sign("apiserver", "/CN=kube-apiserver", Some(&sans.join(",")), "serverAuth")?;
        openssl(&["genrsa", "-out", &pki.path("sa.key"), "2048"])?;
        openssl(&["rsa", "-in", &pki.path("sa.key"), "-pubout", "-out", &pki.path("sa.pub")])?;
        Ok(pki)
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A client certificate and key (`<name>.crt`, `<name>.key`) for `user` in `groups`.
    pub fn client(&self, name: &str, user: &str, groups: &[&str]) -> Result<()> {
        let mut subject: String = groups.iter().map(|g| format!("/O={g}")).collect();
        subject.push_str(&format!("/CN={user}"));
        self.sign(name, &subject, None, "clientAuth")
    }

    /// A serving certificate and key (`<name>.crt`, `<name>.key`) for the DNS names `names`.
    pub fn server(&self, name: &str, names: &[&str]) -> Result<()> {
        let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        self.sign(name, &format!("/CN={}", names[0]), Some(&sans.join(",")), "serverAuth")
    }

    fn sign(&self, name: &str, subject: &str, sans: Option<&str>, usage: &str) -> Result<()> {
        let (key, csr, crt) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.crt")),
        );
        openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr])?;
        let ext = self.dir.join(format!("{name}.ext"));
        let mut text = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        );
        if let Some(sans) = sans {
            text.push_str(&format!("subjectAltName={sans}\n"));
        }
        fs::write(&ext, text)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path("ca.crt"),
            "-CAkey",
            &self.path("ca.key"),
            "-CAcreateserial",
            "-days",
            DAYS,
            "-out",
            &crt,
            "-extfile",
            &ext.display().to_string(),
        ])
    }

    /// A kubeconfig for client `name` (made with [`Self::client`]) talking to `server`.
    pub fn kubeconfig(&self, name: &str, server: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: egressfw-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: {name}\n  context:\n    cluster: egressfw-test\n    user: {name}\ncurrent-context: {name}\n",
            ca = self.path("ca.crt"),
            crt = self.path(&format!("{name}.crt")),
            key = self.path(&format!("{name}.key")),
        );
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out =
        Command::new("openssl").args(args).output().context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
