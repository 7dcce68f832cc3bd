//! TLS origination: the client speaks plain HTTP to the gateway, the gateway speaks HTTPS to the
//! upstream and verifies its certificate (system roots, or a configured CA bundle) against the
//! name the client asked for. Only the configured hosts are originated.

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    config::Origination,
    host::{HostName, HostPattern},
};

pub struct Originator {
    hosts: Vec<HostPattern>,
    pub upstream_port: u16,
    connector: TlsConnector,
}

impl Originator {
    /// Builds the TLS client; fails (naming the file) when the CA bundle is unreadable or empty,
    /// so a reload with a bad bundle is rejected and the old one stays.
    pub fn new(config: &Origination) -> Result<Self> {
        Ok(Self {
            hosts: config.hosts.clone(),
            upstream_port: config.upstream_port,
            connector: tls_client(config.ca_file.as_deref(), &[b"http/1.1"])?,
        })
    }

    pub fn originates(&self, host: &HostName) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }

    /// The TLS handshake over an already checked connection; the certificate must be valid for
    /// `host`.
    pub async fn handshake(&self, tcp: TcpStream, host: &HostName) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.as_str().to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }
}

/// A TLS client that verifies servers against `ca_file` (or the system roots), offering `alpn`.
/// Fails, naming the file, when the bundle is unreadable or empty.
pub fn tls_client(ca_file: Option<&Path>, alpn: &[&[u8]]) -> Result<TlsConnector> {
    let roots = match ca_file {
        Some(path) => roots_from_file(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(tls)))
}

fn roots_from_file(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading CA bundle {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing CA bundle {}", path.display()))?;
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("CA bundle {} holds no usable certificate ({ignored} ignored)", path.display());
    }
    Ok(roots)
}

fn system_roots() -> Result<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        bail!(
            "no system root certificates found ({} errors); install ca-certificates or set tlsOrigination.caFile",
            found.errors.len()
        );
    }
    Ok(roots)
}
