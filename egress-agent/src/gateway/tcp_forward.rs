//! Static TCP forwards: a listening port bound to one upstream `host:port`, for external
//! services with no name on the wire (databases, SSH). The policy still applies: the client's
//! namespace needs a rule for that host and port, and the name is resolved and checked per
//! connection like any other.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{access_log::Record, config::Upstream, policy::Target, shared::Shared, tunnel};

pub const LISTENER: &str = "tcp_forward";

pub async fn serve(shared: Arc<Shared>, client: TcpStream, source: SocketAddr, upstream: Upstream) {
    let live = shared.live();
    let mut record = Record::new(LISTENER, source);
    let namespace = shared.identify(source, &mut record);
    record.authority = Some(format!("{}:{}", upstream.host, upstream.port));
    let _slot = match shared.admit(&live.limits, source.ip()) {
        Ok(slot) => slot,
        Err(deny) => {
            record.deny(deny.name());
            shared.finish(&mut record);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let dialed = match Target::parse(&upstream.host) {
        Ok(target) => shared
            .dial(&live, namespace.as_deref(), &target, upstream.port, &mut record)
            .await
            .map(|(stream, _)| stream),
        Err(e) => Err(super::policy::Deny::from(e).into()),
    };
    match dialed {
        Ok(up) => tunnel::run(shared, client, up, Vec::new(), live.limits, record).await,
        Err(refusal) => {
            refusal.note(&mut record);
            shared.finish(&mut record);
        }
    }
}
