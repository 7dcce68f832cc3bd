//! Static TCP forwards: a listening port bound to one upstream `host:port`, for external
//! services with no name on the wire (databases, SSH). The policy still applies: the client's
//! namespace needs a rule for that host and port, and the name is resolved and checked per
//! connection like any other. The target step is the configured upstream.

use tokio::net::TcpStream;

use super::{config::Upstream, connection::Connection, policy::Deny, policy::Target};

pub const LISTENER: &str = "tcp_forward";

pub async fn serve(mut conn: Connection, client: TcpStream, upstream: &Upstream) {
    conn.record.authority = Some(format!("{}:{}", upstream.host, upstream.port));
    if let Err(deny) = conn.admit() {
        return conn.refuse(deny.into());
    }
    let _ = client.set_nodelay(true);
    let target = match Target::parse(&upstream.host) {
        Ok(t) => t,
        Err(e) => return conn.refuse(Deny::from(e).into()),
    };
    match conn.dial(&target, upstream.port).await {
        Ok(up) => conn.relay(client, up.stream, Vec::new()).await,
        Err(refusal) => conn.refuse(refusal),
    }
}
