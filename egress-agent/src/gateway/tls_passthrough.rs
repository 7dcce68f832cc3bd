//! The transparent TLS listener: reads the ClientHello without terminating TLS, takes the server
//! name (SNI) as the target, and relays the untouched bytes, ClientHello first, to a checked
//! address of that name. Refusals end with a TLS alert the client can show.

use tokio::net::TcpStream;

use super::{
    connection::Connection,
    policy::Deny,
    refusal::Refusal,
    tls_hello::{self, read_client_hello, send_alert, sni_verdict},
};

pub const LISTENER: &str = "tls_passthrough";

pub async fn serve(mut conn: Connection, mut client: TcpStream, upstream_port: u16) {
    if let Err(deny) = conn.admit() {
        return refuse(conn, &mut client, deny.into()).await;
    }
    let _ = client.set_nodelay(true);
    let limits = conn.live.limits;
    let mut first = Vec::new();
    let hello = match read_client_hello(
        &mut client,
        &mut first,
        limits.client_hello_max_bytes,
        limits.header_timeout,
    )
    .await
    {
        Ok(h) => h,
        Err(failure) => {
            failure.alert(&mut client).await;
            conn.record.deny(failure.reason());
            return conn.finish();
        }
    };
    conn.record.sni.clone_from(&hello.server_name);
    let target = match sni_verdict(&hello, None) {
        Ok(Some(t)) => t,
        Ok(None) => return refuse(conn, &mut client, Deny::NoServerName.into()).await,
        Err(deny) => return refuse(conn, &mut client, deny.into()).await,
    };
    conn.record.authority = Some(format!("{target}:{upstream_port}"));
    match conn.dial(&target, upstream_port).await {
        Ok(up) => conn.relay(client, up.stream, first).await,
        Err(refusal) => refuse(conn, &mut client, refusal).await,
    }
}

/// An alert: `access_denied` or `unrecognized_name` for a denial, `internal_error` when the
/// upstream failed.
async fn refuse(conn: Connection, client: &mut TcpStream, refusal: Refusal) {
    let alert = match refusal {
        Refusal::Deny(deny) => tls_hello::deny_alert(deny),
        Refusal::ConnectFailed
        | Refusal::ConnectTimeout
        | Refusal::TlsFailed
        | Refusal::RequestBodyTimeout
        | Refusal::ResponseTimeout
        | Refusal::ParentUnreachable
        | Refusal::ParentRefused(_) => tls_hello::AlertDescription::InternalError,
    };
    send_alert(client, alert).await;
    conn.refuse(refusal);
}
