//! Reading a ClientHello off a socket and judging its server name: the TLS listener takes the
//! name as its target, a CONNECT tunnel checks it against the tunnel's target.

use std::time::Duration;

use tokio::{io::AsyncReadExt as _, net::TcpStream};

pub use super::client_hello::AlertDescription;
use super::{
    client_hello::{self, ClientHello, HelloError, Progress},
    policy::{Deny, Target},
    relay,
};

/// The TLS alert for a refused ClientHello.
pub fn deny_alert(deny: Deny) -> AlertDescription {
    match deny {
        Deny::NoServerName | Deny::BadTarget => AlertDescription::UnrecognizedName,
        _ => AlertDescription::AccessDenied,
    }
}

/// Checks a ClientHello's server name: present unless `connect_target` is an IP tunnel, and
/// (for a tunnel to a name) the same name.
pub fn sni_verdict(hello: &ClientHello, connect_target: Option<&Target>) -> Result<Option<Target>, Deny> {
    // Encrypted Client Hello is judged by its outer (public) name, which a rule must allow
    // like any other: real ECH then reaches only providers whose public name is allowed, and
    // browsers that send GREASE ECH (no real inner hello) keep working.
    // Through the same IP-literal reading as every other target: an SNI of `10.0.0.1` is an
    // address and needs a CIDR rule, never a host pattern.
    let sni = hello.server_name.as_deref().map(Target::parse).transpose()?;
    match (connect_target, &sni) {
        // A CONNECT to a name: the SNI must be that name. Without one, a shared front picks the
        // site by other means (a default, or the inner name of real ECH): unknowable here.
        (Some(t @ Target::Name(_)), Some(s)) if s != t => Err(Deny::TargetMismatch),
        (Some(Target::Name(_)), None) => Err(Deny::NoServerName),
        (Some(_), _) => Ok(sni),
        (None, None) => Err(Deny::NoServerName),
        (None, Some(_)) => Ok(sni),
    }
}

/// Why no ClientHello could be read.
pub enum HelloFailure {
    Bad(HelloError),
    Timeout,
    Closed,
}

impl HelloFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bad(e) => e.reason(),
            Self::Timeout => Deny::HeaderTimeout.name(),
            Self::Closed => "closed_before_client_hello",
        }
    }

    /// Tells a TLS client why, when it can understand the answer.
    pub async fn alert(&self, client: &mut TcpStream) {
        if let Self::Bad(e) = self
            && let Some(desc) = e.alert()
        {
            send_alert(client, desc).await;
        }
    }
}

/// Reads until `buf` holds a whole ClientHello, within `max` bytes and `timeout` overall.
pub async fn read_client_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<ClientHello, HelloFailure> {
    let read = async {
        loop {
            match client_hello::parse(buf, max) {
                Ok(Progress::Done(hello)) => return Ok(hello),
                Err(e) => return Err(HelloFailure::Bad(e)),
                Ok(Progress::NeedMore) => {}
            }
            let room = max.saturating_sub(buf.len()).max(1);
            let start = buf.len();
            buf.resize(start + room.min(4096), 0);
            let n = client.read(&mut buf[start..]).await.map_err(|_| HelloFailure::Closed)?;
            buf.truncate(start + n);
            if n == 0 {
                return Err(HelloFailure::Closed);
            }
        }
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(HelloFailure::Timeout))
}

pub async fn send_alert(client: &mut TcpStream, desc: AlertDescription) {
    relay::reply_and_close(client, &client_hello::alert(desc)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: Option<&str>, ech: bool) -> ClientHello {
        ClientHello { server_name: name.map(str::to_owned), alpn: Vec::new(), legacy_version: 0x0303, ech }
    }

    #[test]
    fn sni_verdicts() {
        let api = Target::parse("api.example.com").unwrap();
        let ip = Target::parse("11.0.0.1").unwrap();
        // Encrypted Client Hello is judged by its outer name, like any SNI: GREASE ECH carries the
        // real name there, and real ECH reaches only a provider whose public name is allowed.
        assert_eq!(sni_verdict(&hello(Some("api.example.com"), true), None), Ok(Some(api.clone())));
        assert_eq!(sni_verdict(&hello(Some("api.example.com"), true), Some(&api)), Ok(Some(api.clone())));
        assert_eq!(sni_verdict(&hello(Some("cdn.example.net"), true), Some(&api)), Err(Deny::TargetMismatch));
        // No SNI: refused on the TLS port and in a tunnel to a name; fine in a tunnel to an address.
        assert_eq!(sni_verdict(&hello(None, false), None), Err(Deny::NoServerName));
        assert_eq!(sni_verdict(&hello(None, false), Some(&api)), Err(Deny::NoServerName));
        assert_eq!(sni_verdict(&hello(None, false), Some(&ip)), Ok(None));
    }
}
