//! The transparent TLS listener: reads the ClientHello without terminating TLS, takes the server
//! name (SNI), decides, connects to a checked address of that name, and relays the untouched
//! bytes, ClientHello first. Refusals end with a TLS alert the client can show.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    access_log::Record,
    client_hello::AlertDescription,
    policy::Deny,
    shared::{Refusal, Shared},
    tunnel::{self, read_client_hello, send_alert, sni_verdict},
};

pub const LISTENER: &str = "tls_passthrough";

pub async fn serve(shared: Arc<Shared>, mut client: TcpStream, source: SocketAddr, upstream_port: u16) {
    let live = shared.live();
    let mut record = Record::new(LISTENER, source);
    let namespace = shared.identify(source, &mut record);
    let _slot = match shared.admit(&live.limits, source.ip()) {
        Ok(slot) => slot,
        Err(deny) => return refuse(&shared, &mut client, record, deny.into()).await,
    };
    let _ = client.set_nodelay(true);
    let mut first = Vec::new();
    let limits = live.limits;
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
            record.deny(failure.reason());
            shared.finish(&mut record);
            return;
        }
    };
    record.sni.clone_from(&hello.server_name);
    let target = match sni_verdict(&hello, None) {
        Ok(Some(t)) => t,
        Ok(None) => return refuse(&shared, &mut client, record, Deny::NoServerName.into()).await,
        Err(deny) => return refuse(&shared, &mut client, record, deny.into()).await,
    };
    record.authority = Some(format!("{target}:{upstream_port}"));
    match shared.dial(&live, namespace.as_deref(), &target, upstream_port, &mut record).await {
        Ok((upstream, _)) => tunnel::run(shared, client, upstream, first, limits, record).await,
        Err(refusal) => refuse(&shared, &mut client, record, refusal).await,
    }
}

async fn refuse(shared: &Shared, client: &mut TcpStream, mut record: Record, refusal: Refusal) {
    let alert = match refusal {
        Refusal::Deny(deny) => tunnel::deny_alert(deny),
        Refusal::ConnectFailed
        | Refusal::ConnectTimeout
        | Refusal::TlsFailed
        | Refusal::RequestBodyTimeout
        | Refusal::ResponseTimeout => AlertDescription::InternalError,
    };
    send_alert(client, alert).await;
    refusal.note(&mut record);
    shared.finish(&mut record);
}
