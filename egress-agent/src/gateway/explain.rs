//! `egress-agent explain`: how the gateway would decide one connection, step by step, from the
//! policy resources in the cluster (or in files) and optionally the gateway's configuration
//! file. The same evaluation the gateway runs (`decision::decide`), with its reasons spelled
//! out, for a namespace owner asking "why can my pod not reach this?".

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, ResourceExt as _, api::ListParams};
use serde::Deserialize;

use super::{
    decision::{self, Outcome},
    policy::{Deny, Policy},
    target::parse_authority,
    tiers::{self, Client, Labels, RuleRef, Stage, Tiers, Verdict, Via},
};
use crate::crd::{ClusterEgressPolicy, EgressPolicy};

/// What is asked, as given on the command line.
pub struct Question {
    pub namespace: String,
    /// A name or an address, as the client would ask for it (CONNECT, SNI, Host).
    pub host: String,
    pub port: u16,
    /// The client pod, whose labels count (from the API, or from the files' `Pod` objects).
    pub pod: Option<String>,
    /// `key=value` each, added to the pod's (or alone, without a pod).
    pub pod_labels: Vec<String>,
    /// `Connect`, `TlsPassthrough`, `TlsOrigination` or `TcpForward`.
    pub via: String,
    /// The gateway's configuration: its rules come first, as in the gateway.
    pub gateway_config: Option<PathBuf>,
}

/// The objects the answer is computed from.
#[derive(Default)]
pub struct Objects {
    pub cluster: Vec<ClusterEgressPolicy>,
    pub namespaced: Vec<EgressPolicy>,
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
}

impl Objects {
    /// Every `ClusterEgressPolicy`, `EgressPolicy`, `Namespace` and `Pod` in YAML files (several
    /// documents each, or `kind: List` as `kubectl get -o yaml` prints); other kinds are skipped.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut objects = Self::default();
        for path in paths {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            objects.add_yaml(&text).with_context(|| format!("in {}", path.display()))?;
        }
        Ok(objects)
    }

    fn add_yaml(&mut self, text: &str) -> Result<()> {
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value =
                serde_yaml::Value::deserialize(document).with_context(|| format!("document {}", i + 1))?;
            self.add(value).with_context(|| format!("document {}", i + 1))?;
        }
        Ok(())
    }

    fn add(&mut self, value: serde_yaml::Value) -> Result<()> {
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
        match kind.as_str() {
            "List" => {
                for item in value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default() {
                    self.add(item)?;
                }
            }
            "ClusterEgressPolicy" => self.cluster.push(typed(value, &kind)?),
            "EgressPolicy" => self.namespaced.push(typed(value, &kind)?),
            "Namespace" => self.namespaces.push(typed(value, &kind)?),
            "Pod" => self.pods.push(typed(value, &kind)?),
            _ => {}
        }
        Ok(())
    }

    /// The policies and namespaces as the API server has them now (the kubeconfig's cluster),
    /// and the pod `question` names.
    pub async fn from_cluster(question: &Question) -> Result<Self> {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        Self::from_client(client, question.pod.as_deref(), &question.namespace).await
    }

    /// The policies and namespaces through `client`, and `pod` of `namespace` if named.
    pub async fn from_client(client: kube::Client, pod: Option<&str>, namespace: &str) -> Result<Self> {
        let all = ListParams::default();
        let cluster = Api::<ClusterEgressPolicy>::all(client.clone())
            .list(&all)
            .await
            .context("listing ClusterEgressPolicy objects (are the CRDs installed?)")?;
        let namespaced = Api::<EgressPolicy>::all(client.clone())
            .list(&all)
            .await
            .context("listing EgressPolicy objects")?;
        let namespaces =
            Api::<Namespace>::all(client.clone()).list(&all).await.context("listing namespaces")?;
        let mut pods = Vec::new();
        if let Some(pod) = pod {
            let api = Api::<Pod>::namespaced(client, namespace);
            let found = api.get_opt(pod).await.with_context(|| format!("reading pod {namespace}/{pod}"))?;
            pods.extend(found);
        }
        Ok(Self { cluster: cluster.items, namespaced: namespaced.items, namespaces: namespaces.items, pods })
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value, kind: &str) -> Result<T> {
    let name =
        value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("?").to_owned();
    serde_yaml::from_value(value).with_context(|| format!("{kind} {name:?} does not match its schema"))
}

/// The answer: its text, and whether the connection would be allowed.
pub struct Answer {
    pub text: String,
    pub allowed: bool,
}

/// How the gateway would decide `question`, given `objects`.
pub fn explain(question: &Question, objects: &Objects) -> Result<Answer> {
    let target = match parse_authority(&question.host) {
        Ok((target, None)) => target,
        Ok((_, Some(_))) => bail!("--host {:?}: give the port with --port", question.host),
        Err(_) => bail!("--host {:?} is not a host name or an IP address", question.host),
    };
    let port = question.port;
    if port == 0 {
        bail!("--port 0 is not a port");
    }
    let via: Via = serde_yaml::from_str(&question.via).map_err(|_| {
        anyhow::anyhow!(
            "--via {:?} is not one of Connect, TlsPassthrough, TlsOrigination, TcpForward",
            question.via
        )
    })?;
    let mut pod_labels = Labels::new();
    if let Some(pod) = &question.pod {
        let found = objects
            .pods
            .iter()
            .find(|p| p.name_any() == *pod && p.namespace().as_deref() == Some(&question.namespace))
            .with_context(|| format!("pod {}/{pod} not found", question.namespace))?;
        pod_labels.clone_from(found.labels());
    }
    pod_labels.extend(parse_labels(&question.pod_labels)?);
    let file = question.gateway_config.as_deref().map(Policy::from_config_file).transpose()?;
    let namespace = objects.namespaces.iter().find(|n| n.name_any() == question.namespace);
    let namespace_labels = tiers::namespace_labels(
        namespace.map(|n| n.labels().clone()).unwrap_or_default(),
        &question.namespace,
    );
    let (tiers, rejected) = Tiers::build(&objects.cluster, &objects.namespaced);
    let client = Client {
        namespace: &question.namespace,
        namespace_labels: &namespace_labels,
        pod_labels: &pod_labels,
    };
    let outcome = decision::decide(
        file.as_ref().unwrap_or(&Policy::default()),
        &tiers,
        Some(&client),
        &target,
        port,
        via,
    );

    let mut text = String::new();
    let _ = writeln!(text, "{} -> {target}:{port} (via {via:?})", question.namespace);
    let _ = writeln!(text, "  namespace labels: {}", show_labels(&namespace_labels));
    if namespace.is_none() {
        let _ = writeln!(
            text,
            "    (no Namespace object {:?}: only its name label is known)",
            question.namespace
        );
    }
    let _ = writeln!(text, "  pod labels: {}", show_labels(&pod_labels));
    if !rejected.is_empty() {
        let _ = writeln!(text, "  objects the gateway would refuse (they take no part):");
        for r in &rejected {
            let _ = writeln!(text, "    {}: {}", r.object, r.reason);
        }
    }
    let allowed = steps(&mut text, &outcome, file.is_some(), &question.namespace);
    Ok(Answer { text, allowed })
}

/// Writes the steps that led to `outcome` and the verdict; true when allowed.
fn steps(text: &mut String, outcome: &Outcome, with_file: bool, namespace: &str) -> bool {
    let file_step = |text: &mut String| {
        if with_file {
            let _ = writeln!(text, "  1. the gateway file's rules: none allows it");
        }
    };
    match outcome {
        Outcome::File(Ok(grant)) => {
            let _ = writeln!(
                text,
                "  1. the gateway file's rules: {} allows it (they come first)",
                grant.matched
            );
            let _ = writeln!(text, "ALLOWED by the gateway file's rule {}", grant.matched);
            true
        }
        Outcome::File(Err(deny)) => {
            file_step(text);
            let why = match deny {
                Deny::NotAllowed => "no rule allows it, and there are no policy resources".to_owned(),
                other => other.name().to_owned(),
            };
            let _ = writeln!(text, "DENIED: {why}");
            false
        }
        Outcome::Resources(verdict) => {
            file_step(text);
            resource_steps(text, verdict, namespace)
        }
    }
}

fn resource_steps(text: &mut String, verdict: &Verdict, namespace: &str) -> bool {
    match verdict {
        Verdict::Accept { by, passed, exceptions } => {
            match by.stage {
                Stage::Admin => line(text, &format!("Admin: {by} accepts it")),
                Stage::Namespace => {
                    if let Some(pass) = passed {
                        line(text, &format!("Admin: {pass} passes it to {namespace}"));
                    }
                    line(text, &format!("{namespace}: {by} accepts it"));
                }
                Stage::Baseline => {
                    above(text, passed.as_ref(), namespace);
                    line(text, &format!("Baseline: {by} accepts it"));
                }
            }
            let _ = write!(text, "ALLOWED by {by}");
            if !exceptions.is_empty() {
                let nets: Vec<String> = exceptions.iter().map(ToString::to_string).collect();
                let _ = write!(text, " (non-public ranges it opens: {})", nets.join(", "));
            }
            text.push('\n');
            true
        }
        Verdict::Deny { by } => {
            if by.stage == Stage::Baseline {
                line(text, "Admin, then the namespace: nothing decided");
            }
            line(text, &format!("{:?}: {by} denies it", by.stage));
            let _ = writeln!(text, "DENIED by {by} (denied_by_policy)");
            false
        }
        Verdict::Undecided { passed } => {
            above(text, passed.as_ref(), namespace);
            line(text, "Baseline: no rule matches");
            if passed.is_none() {
                line(
                    text,
                    "(a namespace's own EgressPolicy counts only for what an Admin Pass delegates to it)",
                );
            }
            let _ = writeln!(text, "DENIED: no rule decides it (not_allowed)");
            false
        }
    }
}

/// The steps before the Baseline tier: a Pass the namespace did not take up, or nothing.
fn above(text: &mut String, passed: Option<&RuleRef>, namespace: &str) {
    match passed {
        Some(pass) => {
            line(text, &format!("Admin: {pass} passes it to {namespace}"));
            line(
                text,
                &format!("{namespace}: no EgressPolicy accepts it (for these pod labels and this way in)"),
            );
        }
        None => line(text, "Admin: no rule decides it"),
    }
}

fn line(text: &mut String, step: &str) {
    let _ = writeln!(text, "  {step}");
}

fn parse_labels(pairs: &[String]) -> Result<Labels> {
    let mut labels = BTreeMap::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("pod label {pair:?} is not key=value");
        };
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

fn show_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return "(none)".into();
    }
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// `explain` with the objects from `files`, or from the cluster when there are none.
pub fn run(question: &Question, files: &[PathBuf]) -> Result<bool> {
    let objects = if files.is_empty() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(Objects::from_cluster(question))?
    } else {
        Objects::from_files(files)?
    };
    let answer = explain(question, &objects)?;
    print!("{}", answer.text);
    Ok(answer.allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's example, as `kubectl get -o yaml` would list part of it.
    const OBJECTS: &str = r#"
apiVersion: egressfw.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: platform}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - {name: no-paste-sites, action: Deny, to: [{domainNames: ["pastebin.com", "*.pastebin.com"]}]}
    - {name: github-is-delegated, action: Pass, to: [{domainNames: ["github.com", "*.github.com"]}], ports: [{port: 443}]}
---
apiVersion: v1
kind: List
items:
  - apiVersion: egressfw.io/v1alpha1
    kind: EgressPolicy
    metadata: {name: ci, namespace: team-a}
    spec:
      podSelector: {matchLabels: {app: ci}}
      egress:
        - {name: github-api, action: Accept, to: [{domainNames: ["api.github.com"]}], ports: [{port: 443}]}
  - apiVersion: v1
    kind: Namespace
    metadata: {name: team-a, labels: {team: a}}
  - apiVersion: v1
    kind: Pod
    metadata: {name: runner, namespace: team-a, labels: {app: ci}}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: skipped}
"#;

    fn question(host: &str, port: u16, pod: Option<&str>, pod_labels: &[&str]) -> Question {
        Question {
            namespace: "team-a".into(),
            host: host.into(),
            port,
            pod: pod.map(Into::into),
            pod_labels: pod_labels.iter().map(|l| (*l).to_owned()).collect(),
            via: "Connect".into(),
            gateway_config: None,
        }
    }

    fn objects() -> Objects {
        let mut objects = Objects::default();
        objects.add_yaml(OBJECTS).unwrap();
        objects
    }

    fn ask(host: &str, port: u16, pod: Option<&str>, pod_labels: &[&str]) -> Answer {
        explain(&question(host, port, pod, pod_labels), &objects()).unwrap()
    }

    #[test]
    fn each_way_a_decision_can_go_is_told_with_its_rules() {
        let a = ask("api.github.com", 443, Some("runner"), &[]);
        assert!(a.allowed, "{}", a.text);
        assert!(
            a.text.contains("namespace labels: kubernetes.io/metadata.name=team-a, team=a"),
            "{}",
            a.text
        );
        let steps = "  pod labels: app=ci\n  \
                     Admin: ClusterEgressPolicy/platform#github-is-delegated passes it to team-a\n  \
                     team-a: EgressPolicy/team-a/ci#github-api accepts it\n\
                     ALLOWED by EgressPolicy/team-a/ci#github-api\n";
        assert!(a.text.ends_with(steps), "{}", a.text);

        // The labels given win over the pod's.
        let a = ask("api.github.com", 443, Some("runner"), &["app=web"]);
        assert!(a.text.contains("pod labels: app=web\n"), "{}", a.text);
        assert!(!a.allowed);
        assert!(a.text.contains("team-a: no EgressPolicy accepts it"), "{}", a.text);
        assert!(a.text.ends_with("DENIED: no rule decides it (not_allowed)\n"), "{}", a.text);

        let a = ask("www.pastebin.com", 443, None, &["app=ci"]);
        assert!(!a.allowed);
        assert!(
            a.text.ends_with("DENIED by ClusterEgressPolicy/platform#no-paste-sites (denied_by_policy)\n"),
            "{}",
            a.text
        );

        // Not delegated: the namespace's own rule could not help, and the answer says why.
        let a = ask("example.org", 443, None, &[]);
        assert!(!a.allowed);
        assert!(a.text.contains("Admin: no rule decides it"), "{}", a.text);
        assert!(a.text.contains("only for what an Admin Pass delegates"), "{}", a.text);
        // Delegated on 443 only.
        assert!(!ask("api.github.com", 22, None, &["app=ci"]).allowed);
    }

    #[test]
    fn bad_questions_name_the_bad_value() {
        let objects = objects();
        let error = |q: Question| format!("{:#}", explain(&q, &objects).err().expect("refused"));
        assert!(error(question("a b", 443, None, &[])).contains("--host \"a b\" is not a host name"));
        assert!(error(question("x.example:443", 443, None, &[])).contains("give the port with --port"));
        assert!(error(question("x.example", 0, None, &[])).contains("--port 0"));
        assert!(error(question("x.example", 443, Some("gone"), &[])).contains("pod team-a/gone not found"));
        assert!(
            error(question("x.example", 443, None, &["app"])).contains("pod label \"app\" is not key=value")
        );
        let mut via = question("x.example", 443, None, &[]);
        via.via = "Carrier".into();
        assert!(error(via).contains("--via \"Carrier\""));
        let mut bad = Objects::default();
        let e = bad.add_yaml("kind: EgressPolicy\nmetadata: {name: x}\nspec: {egress: 3}\n").unwrap_err();
        assert!(format!("{e:#}").contains("EgressPolicy \"x\" does not match its schema"), "{e:#}");
    }
}
