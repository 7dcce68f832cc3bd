//! `egress-agent observe`: per pod, the kernel's verdicts (refused, audited, would steer) and
//! the gateway's decisions (host, rule, status, bytes) in one stream ordered by time. It reads
//! every node agent's and gateway replica's `/events` (through the API server's pod proxy, or
//! the endpoints named with `--from`), keeps its place in each by number, and with `--follow`
//! asks again every `--interval`.
//!
//! What a process no longer keeps (it holds its last few thousand verdicts) is reported as
//! missed; a process that restarted (its `since` changed) is read again from its start.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    io::Write as _,
    time::Duration,
};

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

/// Where one endpoint's streams stand: per process that answered there (see
/// `Page::instance`: the replicas behind a Service answer at one address, in turn; a restarted
/// process is another one and is read from its start).
#[derive(Default)]
struct Place {
    after: HashMap<String, u64>,
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
                Ok(pods) => {
                    endpoints = pods.into_iter().map(Endpoint::Pod).collect();
                    // Pods gone are forgotten.
                    places.retain(|name, _| endpoints.iter().any(|e| e.describe() == *name));
                }
                // Once: nothing to read. Following: the pods read last, until the API answers.
                Err(e) if round == 0 || !options.follow => return Err(e),
                Err(e) => eprintln!("observe: listing the agents and gateways: {e:#}"),
            }
        }
        let mut events = Vec::new();
        for endpoint in &endpoints {
            let place = places.entry(endpoint.describe()).or_default();
            let (name, reporter) = (endpoint.describe(), endpoint.reporter());
            let page = |after| endpoint.page(client.as_ref(), after);
            let one_process = matches!(endpoint, Endpoint::Pod(_));
            match read_new(&name, &reporter, one_process, place, page).await {
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
                for e in &events {
                    // A rule's name is the tenant's text: no line of its own, no escapes.
                    writeln!(out, "{}", printable(&text_line(e)))?;
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

/// Everything the endpoint has after `place`, page by page; `place` moves on with what is
/// returned (when a later page fails, the events before it are returned, and counted read).
///
/// The processes behind one address (the replicas behind a Service) may answer in any order,
/// and a request cannot choose which: each asks from the lowest place of the processes seen
/// there, and what an answer repeats is dropped by number. A process never seen before is read
/// from its start. At a pod's address (`one_process`) a new process is the pod's restart: the
/// old one's place is forgotten.
async fn read_new<F: Future<Output = Result<Page>>>(
    name: &str,
    reporter: &str,
    one_process: bool,
    place: &mut Place,
    mut page_after: impl FnMut(u64) -> F,
) -> Result<Vec<FeedEvent>> {
    let mut events = Vec::new();
    let lowest = |place: &Place| place.after.values().copied().min().unwrap_or(0);
    let mut asked = lowest(place);
    let mut retries = 0;
    loop {
        let page = match page_after(asked).await {
            Ok(page) => page,
            Err(e) if events.is_empty() => return Err(e),
            Err(e) => {
                eprintln!("observe: {name}: {e:#}");
                return Ok(events);
            }
        };
        let from = match place.after.get(&page.instance) {
            Some(from) => *from,
            None => {
                if !place.after.is_empty() {
                    eprintln!(
                        "observe: {name} answers from another process (counting since {}): reading it from its start",
                        page.since
                    );
                }
                if one_process {
                    place.after.clear();
                }
                place.after.insert(page.instance.clone(), 0);
                0
            }
        };
        if asked > from {
            // It has events below what was asked: ask again from there (a few times; then its
            // next answer will).
            asked = lowest(place);
            retries += 1;
            if retries <= 3 {
                continue;
            }
            return Ok(events);
        }
        if page.missed > 0 {
            eprintln!(
                "observe: {name} no longer holds {} verdict{} (it keeps its latest few thousand)",
                page.missed,
                if page.missed == 1 { "" } else { "s" }
            );
        }
        // A short page had everything there was (a busy process never runs dry).
        let done = page.events.len() < crate::feed::PAGE;
        events.extend(page.events.into_iter().filter(|e| e.seq > from).map(|mut e| {
            e.reporter = reporter.to_owned();
            e
        }));
        place.after.insert(page.instance, page.next.max(from));
        if done {
            return Ok(events);
        }
        asked = lowest(place);
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

fn text_line(e: &FeedEvent) -> String {
    let (source, destination, detail) = match e.source {
        Source::Kernel => (
            "kernel",
            format!("{}/{}", e.destination, e.protocol),
            format!("{} at {} ({})", e.reason, e.hook.as_deref().unwrap_or("-"), e.reporter),
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
            time: "2026-12-06T23:10:01.123Z".into(),
            reporter: "node/n1".into(),
            hook: Some("connect4".into()),
            ..FeedEvent::new(
                Source::Kernel,
                "team-a",
                "web-1",
                "deny",
                "deny_destination",
                "192.0.2.10:443",
                "tcp",
            )
        };
        let line = text_line(&e);
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
        let line = text_line(&e);
        assert!(
            line.ends_with(
                "allowed by EgressPolicy/team-a/p#github, status 200, 10 B up, 20 B down, proxy (pod/gw-1)"
            ),
            "{line}"
        );
    }

    #[test]
    fn replicas_answering_in_turn_are_each_read_once_in_full() {
        use crate::feed::Feed;
        let (one, two) = (Feed::new(100), Feed::new(100));
        let event = |destination: &str| {
            FeedEvent::new(Source::Gateway, "team-a", "web", "allow", "allowed", destination, "tcp")
        };
        for i in 0..3 {
            one.push(event(&format!("one{i}.example:443")));
        }
        for i in 0..5 {
            two.push(event(&format!("two{i}.example:443")));
        }
        // A Service in front: the replicas answer strictly in turn.
        let turn = std::cell::Cell::new(0u32);
        let ask = |after: u64| {
            turn.set(turn.get() + 1);
            let feed = if turn.get() % 2 == 1 { &one } else { &two };
            std::future::ready(Ok(feed.after(after)))
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut place = Place::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let got = runtime.block_on(read_new("svc", "svc", false, &mut place, ask)).unwrap();
            seen.extend(got.into_iter().map(|e| e.destination));
        }
        seen.sort();
        let mut want: Vec<String> = (0..3).map(|i| format!("one{i}.example:443")).collect();
        want.extend((0..5).map(|i| format!("two{i}.example:443")));
        assert_eq!(seen, want, "each event once, none lost");
        // Later events of either come once.
        two.push(event("two5.example:443"));
        one.push(event("one3.example:443"));
        let mut later = Vec::new();
        for _ in 0..4 {
            later.extend(
                runtime
                    .block_on(read_new("svc", "svc", false, &mut place, ask))
                    .unwrap()
                    .into_iter()
                    .map(|e| e.destination),
            );
        }
        later.sort();
        assert_eq!(later, ["one3.example:443", "two5.example:443"]);

        // A pod's process restarted: read from its start, the old one's place forgotten.
        let (before, after) = (Feed::new(100), Feed::new(100));
        before.push(event("a.example:443"));
        after.push(event("b.example:443"));
        let mut place = Place::default();
        let read = |feed: &Feed, place: &mut Place| {
            let ask = |n: u64| std::future::ready(Ok(feed.after(n)));
            runtime.block_on(read_new("pod", "pod", true, place, ask)).unwrap()
        };
        assert_eq!(read(&before, &mut place).len(), 1);
        assert_eq!(read(&after, &mut place)[0].destination, "b.example:443");
        assert_eq!(place.after.len(), 1, "only the running process is followed");
    }
}
