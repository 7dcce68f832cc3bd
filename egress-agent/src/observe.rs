//! `egress-agent observe`: per pod, the kernel's verdicts (refused, audited, would steer) and
//! the gateway's decisions (host, rule, status, bytes) in one stream ordered by time. It reads
//! every node agent's and gateway replica's `/events` (through the API server's pod proxy, or
//! the endpoints named with `--from`), keeps its place in each by number, and with `--follow`
//! asks again every `--interval`.
//!
//! What a process no longer keeps (it holds its last few thousand verdicts) is reported as
//! missed; a process that restarted (its `since` changed) is read again from its start.

use std::{collections::BTreeMap, io::Write as _, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    feed::{FeedEvent, Page, Source},
    gateway::observed::{self, Endpoints, PodEndpoint},
    printable::printable,
};

#[derive(clap::Args)]
pub struct Options {
    /// Only this namespace's pods.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only this pod (by name).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only these verdicts (kernel: deny, audit, would_steer; gateway: allow, deny, error,
    /// audit); repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub verdict: Vec<String>,
    /// Only the kernel's, or only the gateway's.
    #[arg(long, value_enum)]
    pub source: Option<SourceFilter>,
    /// Keep reading, and print verdicts as they come.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How often to ask again with --follow.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
    #[command(flatten)]
    pub endpoints: Endpoints,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SourceFilter {
    Kernel,
    Gateway,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    /// One JSON object per line.
    Json,
}

/// Where one process's stream stands.
#[derive(Default)]
struct Place {
    /// The process read last (see `Page::instance`).
    instance: String,
    after: u64,
}

/// With --follow, the pods are listed again every this many rounds (pods come and go).
const RELIST_EVERY: u32 = 10;

pub fn run(options: &Options) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(follow(options))
}

async fn follow(options: &Options) -> Result<()> {
    let client = if options.endpoints.from.is_empty() {
        Some(kube::Client::try_default().await.context(
            "no Kubernetes API to read the agents and gateways from (kubeconfig or in-cluster); name their endpoints with --from",
        )?)
    } else {
        None
    };
    let mut places: BTreeMap<String, Place> = BTreeMap::new();
    let mut header = options.output == Output::Text;
    let mut endpoints: Vec<Endpoint> = options.endpoints.from.iter().cloned().map(Endpoint::Url).collect();
    for round in 0u32.. {
        if let Some(client) = &client
            && round % RELIST_EVERY == 0
        {
            match options.endpoints.pods(client, false).await {
                Ok(pods) => endpoints = pods.into_iter().map(Endpoint::Pod).collect(),
                // Once: nothing to read. Following: the pods read last, until the API answers.
                Err(e) if round == 0 || !options.follow => return Err(e),
                Err(e) => eprintln!("observe: listing the agents and gateways: {e:#}"),
            }
        }
        let mut events = Vec::new();
        for endpoint in &endpoints {
            let place = places.entry(endpoint.describe()).or_default();
            match read_new(client.as_ref(), endpoint, place).await {
                Ok(new) => events.extend(new),
                // One process out of reach does not stop the others' stream.
                Err(e) => eprintln!("observe: {}: {e:#}", endpoint.describe()),
            }
        }
        events.retain(|e| keeps(options, e));
        events.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.reporter.cmp(&b.reporter)));
        let mut out = std::io::stdout().lock();
        if header {
            writeln!(
                out,
                "{:<24} {:<7} {:<40} {:<11} {:<32} DETAIL",
                "TIME", "SOURCE", "POD", "VERDICT", "DESTINATION"
            )?;
            header = false;
        }
        match options.output {
            Output::Json => {
                for e in &events {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
            }
            Output::Text => {
                for (e, hooks, count) in collapse(&events) {
                    // A rule's name is the tenant's text: no line of its own, no escapes.
                    writeln!(out, "{}", printable(&text_line(e, &hooks, count)))?;
                }
            }
        }
        out.flush()?;
        drop(out);
        if !options.follow {
            return Ok(());
        }
        tokio::time::sleep(options.interval).await;
    }
    Ok(())
}

enum Endpoint {
    Pod(PodEndpoint),
    Url(String),
}

impl Endpoint {
    fn describe(&self) -> String {
        match self {
            Endpoint::Pod(p) => p.describe(),
            Endpoint::Url(u) => u.clone(),
        }
    }

    /// Who said it, as the stream names it: the node, the gateway pod, or the URL.
    fn reporter(&self) -> String {
        match self {
            Endpoint::Pod(PodEndpoint { node: Some(node), .. }) => format!("node/{node}"),
            Endpoint::Pod(p) => format!("pod/{}", p.name),
            Endpoint::Url(u) => u.clone(),
        }
    }

    async fn page(&self, client: Option<&kube::Client>, after: u64) -> Result<Page> {
        let path = format!("events?after={after}");
        let text = match (self, client) {
            (Endpoint::Pod(pod), Some(client)) => pod.get(client, &path).await?,
            (Endpoint::Url(url), _) => observed::get(url, &format!("/{path}")).await?,
            (Endpoint::Pod(_), None) => unreachable!("pods are read only with a client"),
        };
        serde_json::from_str(&text).with_context(|| format!("{}: not an /events answer", self.describe()))
    }
}

/// Everything `endpoint` has after `place`, page by page; `place` moves on.
async fn read_new(
    client: Option<&kube::Client>,
    endpoint: &Endpoint,
    place: &mut Place,
) -> Result<Vec<FeedEvent>> {
    let mut events = Vec::new();
    loop {
        let mut page = endpoint.page(client, place.after).await?;
        if !place.instance.is_empty() && page.instance != place.instance {
            eprintln!(
                "observe: {} is another process now (counting since {}): reading it from its start",
                endpoint.describe(),
                page.since
            );
            place.after = 0;
            place.instance = page.instance;
            continue;
        }
        place.instance.clone_from(&page.instance);
        if page.missed > 0 {
            eprintln!(
                "observe: {} no longer holds {} verdict{} (it keeps its latest few thousand)",
                endpoint.describe(),
                page.missed,
                if page.missed == 1 { "" } else { "s" }
            );
        }
        // A short page had everything there was (a busy process never runs dry).
        let done = page.events.len() < crate::feed::PAGE;
        place.after = page.next;
        let reporter = endpoint.reporter();
        for e in &mut page.events {
            e.reporter.clone_from(&reporter);
        }
        events.append(&mut page.events);
        if done {
            return Ok(events);
        }
    }
}

fn keeps(options: &Options, e: &FeedEvent) -> bool {
    options.namespace.as_ref().is_none_or(|n| *n == e.namespace)
        && options.pod.as_ref().is_none_or(|p| *p == e.pod)
        && (options.verdict.is_empty() || options.verdict.contains(&e.verdict))
        && match options.source {
            None => true,
            Some(SourceFilter::Kernel) => e.source == Source::Kernel,
            Some(SourceFilter::Gateway) => e.source == Source::Gateway,
        }
}

/// Runs of the same verdict about the same flow within a second, as one line: the kernel
/// reports an audited connection at its connect and at each of its packets (cgroup and tc
/// hooks), which says nothing more than the connect. Each with the hooks that reported it and
/// how many times. JSON output keeps every event.
fn collapse(events: &[FeedEvent]) -> Vec<(&FeedEvent, Vec<&str>, usize)> {
    let same = |a: &FeedEvent, b: &FeedEvent| {
        (a.source, &a.namespace, &a.pod, &a.verdict, &a.reason, &a.destination, &a.protocol, &a.reporter)
            == (
                b.source,
                &b.namespace,
                &b.pod,
                &b.verdict,
                &b.reason,
                &b.destination,
                &b.protocol,
                &b.reporter,
            )
            && a.source == Source::Kernel
    };
    let within_a_second = |first: &FeedEvent, e: &FeedEvent| match (
        humantime::parse_rfc3339(&first.time),
        humantime::parse_rfc3339(&e.time),
    ) {
        (Ok(a), Ok(b)) => b.duration_since(a).is_ok_and(|d| d < Duration::from_secs(1)),
        _ => false,
    };
    let mut out: Vec<(&FeedEvent, Vec<&str>, usize)> = Vec::new();
    for e in events {
        let hook = e.hook.as_deref().unwrap_or("-");
        match out.last_mut() {
            Some((first, hooks, count)) if same(first, e) && within_a_second(first, e) => {
                if !hooks.contains(&hook) {
                    hooks.push(hook);
                }
                *count += 1;
            }
            _ => out.push((e, vec![hook], 1)),
        }
    }
    out
}

fn text_line(e: &FeedEvent, hooks: &[&str], count: usize) -> String {
    let (source, destination, detail) = match e.source {
        Source::Kernel => (
            "kernel",
            format!("{}/{}", e.destination, e.protocol),
            match count {
                1 => format!("{} at {} ({})", e.reason, hooks.join(", "), e.reporter),
                n => format!("{} at {} ({n} times; {})", e.reason, hooks.join(", "), e.reporter),
            },
        ),
        Source::Gateway => {
            // An audited connection's reason is what enforcing would have said; its rule is
            // the Admin Pass it went through, if any.
            let audited = e.verdict == "audit";
            let mut detail = if audited { format!("enforce: {}", e.reason) } else { e.reason.clone() };
            if let Some(rule) = &e.rule {
                detail.push_str(&format!(" {} {rule}", if audited { "passed by" } else { "by" }));
            }
            if let Some(status) = e.status {
                detail.push_str(&format!(", status {status}"));
            }
            detail.push_str(&format!(
                ", {} B up, {} B down, {} ({})",
                e.bytes_up.unwrap_or(0),
                e.bytes_down.unwrap_or(0),
                e.came.as_deref().unwrap_or("-"),
                e.reporter
            ));
            ("gateway", e.destination.clone(), detail)
        }
    };
    format!(
        "{:<24} {source:<7} {:<40} {:<11} {destination:<32} {detail}",
        e.time,
        format!("{}/{}", e.namespace, e.pod),
        e.verdict
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_who_what_where_and_why() {
        let mut e = FeedEvent {
            seq: 1,
            time: "2026-12-06T23:10:01.123Z".into(),
            source: Source::Kernel,
            namespace: "team-a".into(),
            pod: "web-1".into(),
            verdict: "deny".into(),
            reason: "deny_destination".into(),
            destination: "192.0.2.10:443".into(),
            protocol: "tcp".into(),
            reporter: "node/n1".into(),
            hook: Some("connect4".into()),
            rule: None,
            came: None,
            status: None,
            bytes_up: None,
            bytes_down: None,
        };
        let line = text_line(&e, &["connect4"], 1);
        assert!(line.starts_with("2026-12-06T23:10:01.123Z kernel  team-a/web-1"), "{line}");
        assert!(
            line.contains("192.0.2.10:443/tcp") && line.ends_with("deny_destination at connect4 (node/n1)"),
            "{line}"
        );
        e.source = Source::Gateway;
        e.verdict = "allow".into();
        e.reason = "allowed".into();
        e.destination = "api.github.com:443".into();
        e.rule = Some("EgressPolicy/team-a/p#github".into());
        e.status = Some(200);
        e.bytes_up = Some(10);
        e.bytes_down = Some(20);
        e.came = Some("proxy".into());
        e.reporter = "pod/gw-1".into();
        let line = text_line(&e, &[], 1);
        assert!(
            line.ends_with(
                "allowed by EgressPolicy/team-a/p#github, status 200, 10 B up, 20 B down, proxy (pod/gw-1)"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_connection_reported_at_every_packet_is_one_line() {
        let at = |ms: u64, hook: &str, destination: &str| FeedEvent {
            seq: 0,
            time: humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string(),
            source: Source::Kernel,
            namespace: "shop".into(),
            pod: "client".into(),
            verdict: "audit".into(),
            reason: "deny_destination".into(),
            destination: destination.into(),
            protocol: "tcp".into(),
            reporter: "node/n1".into(),
            hook: Some(hook.into()),
            rule: None,
            came: None,
            status: None,
            bytes_up: None,
            bytes_down: None,
        };
        let events = [
            at(0, "cgroup/connect4", "192.0.2.1:80"),
            at(1, "cgroup_skb/egress", "192.0.2.1:80"),
            at(2, "tc/from_pod", "192.0.2.1:80"),
            at(3, "cgroup_skb/egress", "192.0.2.1:80"),
            at(4, "cgroup/connect4", "192.0.2.2:80"),
            at(5000, "cgroup/connect4", "192.0.2.1:80"),
        ];
        let lines: Vec<String> = collapse(&events).into_iter().map(|(e, h, n)| text_line(e, &h, n)).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].ends_with(
                "deny_destination at cgroup/connect4, cgroup_skb/egress, tc/from_pod (4 times; node/n1)"
            ),
            "{lines:#?}"
        );
        assert!(
            lines[2].ends_with("deny_destination at cgroup/connect4 (node/n1)"),
            "a second later: {lines:#?}"
        );
    }
}
