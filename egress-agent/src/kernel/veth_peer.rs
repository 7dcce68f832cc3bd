//! Finds the host side of a pod's veth from the pod's side: the CNI plugin knows the pod's
//! network namespace and interface name, the tc layer needs the host-side peer. Asked of the
//! kernel (rtnetlink), never guessed from names or from what the previous plugin reported.

use std::{fs::File, io, os::fd::AsRawFd as _, path::Path};

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
};

use super::rtnetlink::{self, invalid};

/// One end of a link as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// "veth", "bridge", ... (empty when the kernel reports no kind).
    pub kind: String,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub link: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace, as this namespace numbers it, when the peer is
    /// in another one.
    pub link_netnsid: Option<i32>,
    /// The bridge (or other controller) this link is a port of.
    pub controller: Option<u32>,
}

/// What `host_peer` found: the pod's end and the host's end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VethPair {
    pub pod_side: LinkFacts,
    pub host_side: LinkFacts,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("opening network namespace {netns}: {error}")]
    Netns { netns: String, error: io::Error },
    #[error("interface {ifname} in network namespace {netns}: {error}")]
    PodSide { ifname: String, netns: String, error: io::Error },
    #[error("interface {ifname} in the pod's network namespace is a {kind:?} device, not a veth")]
    NotVeth { ifname: String, kind: String },
    #[error(
        "the peer of {ifname} (index {index} in this network namespace) {problem}: the plugin must run in the namespace that holds the pods' host-side veths"
    )]
    HostSide { ifname: String, index: u32, problem: String },
}

/// The host-side peer, in the calling thread's network namespace, of veth `ifname` inside the
/// network namespace at `netns` (a bind mount such as /var/run/netns/x, or /proc/<pid>/ns/net).
pub fn host_peer(netns: &Path, ifname: &str) -> Result<VethPair, PeerError> {
    let ns =
        File::open(netns).map_err(|error| PeerError::Netns { netns: netns.display().to_string(), error })?;
    let pod_ns =
        ns.try_clone().map_err(|error| PeerError::Netns { netns: netns.display().to_string(), error })?;
    let name = ifname.to_string();
    // setns changes only the calling thread's namespace: a thread of its own, which ends there.
    let pod_side = std::thread::spawn(move || -> io::Result<LinkFacts> {
        // SAFETY: setns on an fd we own; the thread never returns to the caller's namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        link_by_name(&name)
    })
    .join()
    .unwrap_or_else(|_| Err(invalid("the namespace thread panicked")))
    .map_err(|error| PeerError::PodSide {
        ifname: ifname.into(),
        netns: netns.display().to_string(),
        error,
    })?;
    if pod_side.kind != "veth" {
        return Err(PeerError::NotVeth { ifname: ifname.into(), kind: pod_side.kind });
    }
    let index = pod_side.link.unwrap_or(0);
    let host_problem = |problem: String| PeerError::HostSide { ifname: ifname.into(), index, problem };
    let host_side = link_by_index(index).map_err(|e| host_problem(format!("cannot be read: {e}")))?;
    // The peer's index names a link in this namespace; it is the pod's peer only if it is a veth
    // whose own peer is the pod's end (indexes are per namespace, so a stranger could match).
    if host_side.kind != "veth" || host_side.link != Some(pod_side.index) {
        return Err(host_problem(format!(
            "is {} (a {:?} device whose peer is {:?}), not the other end of the pod's veth",
            host_side.name, host_side.kind, host_side.link
        )));
    }
    // Every pod's eth0 has about the same small index, so the index alone matches a stranger's
    // host veth whose peer is another pod's eth0. A veth's peer is (namespace, index): the
    // namespace must be the pod's. (Reading the host side above made the kernel number the
    // namespace of its peer, so the pod's has an id here if it is that one.)
    let pod_nsid = nsid_of(&pod_ns).map_err(|e| host_problem(format!("cannot be placed: {e}")))?;
    if pod_nsid < 0 || host_side.link_netnsid != Some(pod_nsid) {
        return Err(host_problem(format!(
            "is {}, whose peer is in another network namespace (id {:?}; the pod's is {pod_nsid}), not the other end of the pod's veth",
            host_side.name, host_side.link_netnsid
        )));
    }
    Ok(VethPair { pod_side, host_side })
}

/// The id the calling thread's network namespace gives the namespace `ns` (-1: none yet).
fn nsid_of(ns: &File) -> io::Result<i32> {
    let mut request = NsidMessage::default();
    request.attributes.push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
    let answers = rtnetlink::request(RouteNetlinkMessage::GetNsId(request), false)?;
    answers
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(m) => m.attributes.into_iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(id),
                _ => None,
            }),
            _ => None,
        })
        .ok_or_else(|| invalid("no namespace id in the answer"))
}

/// A link of the calling thread's network namespace, by index.
pub fn link_by_index(index: u32) -> io::Result<LinkFacts> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    one_link(request)
}

fn link_by_name(name: &str) -> io::Result<LinkFacts> {
    let mut request = LinkMessage::default();
    request.attributes.push(LinkAttribute::IfName(name.to_string()));
    one_link(request)
}

fn one_link(request: LinkMessage) -> io::Result<LinkFacts> {
    let answers = rtnetlink::request(RouteNetlinkMessage::GetLink(request), false)?;
    let Some(RouteNetlinkMessage::NewLink(m)) = answers.into_iter().next() else {
        return Err(invalid("no link in the answer"));
    };
    let mut facts = LinkFacts {
        index: m.header.index,
        name: String::new(),
        kind: String::new(),
        link: None,
        link_netnsid: None,
        controller: None,
    };
    for attribute in m.attributes {
        match attribute {
            LinkAttribute::IfName(n) => facts.name = n,
            LinkAttribute::Link(l) => facts.link = Some(l),
            LinkAttribute::LinkNetNsId(id) => facts.link_netnsid = Some(id),
            LinkAttribute::Controller(c) => facts.controller = Some(c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        facts.kind = kind.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}
