//! The clsact filters on one hook of an interface, in the order the kernel runs them, from an
//! rtnetlink dump (RTM_GETTFILTER). Filters run by priority, and within one priority cls_bpf
//! runs the newest first: a filter another tool adds at our priority later runs before ours.

use std::io;

use aya::programs::TcAttachType;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One filter, as far as the order check needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// Classifier kind: "bpf", "u32", "flower", ...
    pub kind: String,
    /// The program of a cls_bpf filter running an eBPF program (None for classic BPF).
    pub program_id: Option<u32>,
    pub program_name: Option<String>,
}

/// The filters on `direction` of interface `ifindex`, first to run first. Empty when the
/// interface has no clsact qdisc.
pub fn filters(ifindex: u32, direction: TcAttachType) -> io::Result<Vec<Filter>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    crate::netlink_wait::bound_receives(&socket)?;
    let mut request = TcMessage::default();
    request.header.index = i32::try_from(ifindex).map_err(|_| invalid("ifindex out of range"))?;
    let minor = match direction {
        TcAttachType::Ingress => TcHandle::MIN_INGRESS,
        TcAttachType::Egress => TcHandle::MIN_EGRESS,
        TcAttachType::Custom(_) => return Err(invalid("only clsact ingress and egress are checked")),
    };
    request.header.parent = TcHandle { major: TcHandle::CLSACT.major, minor };
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(request));
    message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                .map_err(|e| invalid(&format!("malformed filter dump: {e}")))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => match e.code {
                    // No clsact qdisc: no filters.
                    Some(code) if code.get() == -libc::EINVAL || code.get() == -libc::ENOENT => {
                        return Ok(Vec::new());
                    }
                    Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                    None => return Ok(out),
                },
                // Handle 0: the header of a priority's classifier (what `tc` prints as a line
                // of its own), not a filter.
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m))
                    if u32::from(m.header.handle) != 0 =>
                {
                    out.push(describe(&m))
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len.next_multiple_of(4);
        }
    }
}

fn describe(m: &TcMessage) -> Filter {
    let mut filter = Filter {
        // tcm_info: priority in the upper 16 bits, protocol in the lower.
        priority: (m.header.info >> 16) as u16,
        handle: u32::from(m.header.handle),
        kind: String::new(),
        program_id: None,
        program_name: None,
    };
    for attribute in &m.attributes {
        match attribute {
            TcAttribute::Kind(kind) => filter.kind.clone_from(kind),
            TcAttribute::Options(options) => {
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.program_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => {
                            filter.program_name = Some(name.clone());
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    filter
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}
