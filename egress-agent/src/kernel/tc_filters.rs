//! The clsact filters on one hook of an interface, in the order the kernel runs them, from an
//! rtnetlink dump (RTM_GETTFILTER). Filters run by priority, and within one priority cls_bpf
//! runs the newest first: a filter another tool adds at our priority later runs before ours.

use std::io;

use aya::programs::TcAttachType;
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};

use super::rtnetlink::{self, invalid};

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
    let mut request = TcMessage::default();
    request.header.index = i32::try_from(ifindex).map_err(|_| invalid("ifindex out of range"))?;
    let minor = match direction {
        TcAttachType::Ingress => TcHandle::MIN_INGRESS,
        TcAttachType::Egress => TcHandle::MIN_EGRESS,
        TcAttachType::Custom(_) => return Err(invalid("only clsact ingress and egress are checked")),
    };
    request.header.parent = TcHandle { major: TcHandle::CLSACT.major, minor };
    let answers = match rtnetlink::request(RouteNetlinkMessage::GetTrafficFilter(request), true) {
        Ok(a) => a,
        // No clsact qdisc: no filters.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(answers
        .iter()
        .filter_map(|m| match m {
            // Handle 0: the header of a priority's classifier (what `tc` prints as a line of
            // its own), not a filter.
            RouteNetlinkMessage::NewTrafficFilter(m) if u32::from(m.header.handle) != 0 => Some(describe(m)),
            _ => None,
        })
        .collect())
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
