//! What the gateway reads: its subcommand, its configuration file (through the ConfigMap), and
//! the ports that configuration listens on.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The gateway's Deployment and Service (the name the agent's `gateways[].service` refers to).
pub(crate) const GATEWAY: &str = "egress-gateway";

/// The gateway as deployed: the Deployment, its pod and container, and the configuration the
/// container reads.
pub(crate) struct Gateway<'a> {
    pub(crate) file: &'a str,
    pub(crate) deployment: Deployment,
    pub(crate) pod: PodSpec,
    pub(crate) container: Container,
    /// The file of the ConfigMap the configuration comes from.
    pub(crate) config_file: &'a str,
    pub(crate) config: GatewayConfig,
}

impl Manifests {
    /// Every gateway of the rendering: the Deployments whose container runs `egress-agent
    /// gateway` (the base's, and the examples' own).
    pub(crate) fn gateway_names(&self) -> Vec<String> {
        let names: Vec<String> = self
            .all::<Deployment>()
            .into_iter()
            .filter(|(file, d)| {
                let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
                pod.is_some_and(|p| p.containers.iter().any(|c| subcommand(file, c) == Some("gateway")))
            })
            .filter_map(|(_, d)| d.metadata.name)
            .collect();
        assert!(names.iter().any(|n| n == GATEWAY), "no Deployment {GATEWAY} runs the gateway");
        names
    }

    /// Gateway `name`'s Deployment, its pod spec and its one container.
    pub(crate) fn gateway_deployment_named(&self, name: &str) -> (&str, Deployment, PodSpec, Container) {
        let (file, d) = self
            .all::<Deployment>()
            .into_iter()
            .find(|(_, d)| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("deploy/: no Deployment {name}"));
        let pod =
            d.spec.clone().and_then(|s| s.template.spec).unwrap_or_else(|| panic!("{file}: no pod spec"));
        assert_eq!(pod.containers.len(), 1, "{file}: the gateway pod has one container");
        let container = pod.containers[0].clone();
        (file, d, pod, container)
    }

    /// The base's gateway, with the configuration its container reads.
    pub(crate) fn gateway(&self) -> Gateway<'_> {
        self.gateway_named(GATEWAY)
    }

    /// Gateway `name`, with the configuration its container reads, parsed by the gateway's parser.
    pub(crate) fn gateway_named(&self, name: &str) -> Gateway<'_> {
        let (file, deployment, pod, container) = self.gateway_deployment_named(name);
        let path = gateway_config_path(file, &container);
        let (config_file, key, text) = config_map_entry(self, file, &pod, &container, &path);
        let config = egress_agent::gateway::config::parse(&text)
            .unwrap_or_else(|e| panic!("{config_file}: {key} is not a valid gateway config: {e:?}"));
        Gateway { file, deployment, pod, container, config_file, config }
    }

    /// The base gateway's Service, in the gateway's namespace.
    pub(crate) fn gateway_service(&self) -> (&str, Service) {
        self.gateway_service_named(GATEWAY)
    }

    /// Gateway `name`'s Service: the Service of the same name, in the gateway's namespace.
    pub(crate) fn gateway_service_named(&self, name: &str) -> (&str, Service) {
        self.all::<Service>()
            .into_iter()
            .find(|(_, s)| {
                s.metadata.name.as_deref() == Some(name)
                    && s.metadata.namespace.as_deref() == Some(self.namespace.as_str())
            })
            .unwrap_or_else(|| panic!("deploy/: no Service {}/{name}", self.namespace))
    }
}

impl Gateway<'_> {
    pub(crate) fn pod_labels(&self) -> BTreeMap<String, String> {
        let template = self.deployment.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
        template.and_then(|md| md.labels.clone()).unwrap_or_default()
    }
}

/// Where the gateway container reads its configuration: `--config`, EGRESSFW_GATEWAY_CONFIG, or
/// the gateway's default.
pub(crate) fn gateway_config_path(file: &str, c: &Container) -> String {
    value_or(file, c, "config", "EGRESSFW_GATEWAY_CONFIG", GATEWAY_DEFAULT_CONFIG_PATH)
}

/// The subcommand the container runs: the first argument that is neither a flag nor the value
/// of one (egress-agent's global flags, which may precede it, all take a value).
pub(crate) fn subcommand<'a>(file: &str, c: &'a Container) -> Option<&'a str> {
    assert!(c.command.is_none(), "{file}: `command` replaces the image's egress-agent entrypoint; use args");
    let mut args = c.args.iter().flatten();
    while let Some(a) = args.next() {
        if !a.starts_with('-') {
            return Some(a);
        }
        assert!(a.starts_with("--"), "{file}: use long flags in args ({a:?}): this test resolves only those");
        if !a.contains('=') {
            args.next();
        }
    }
    None
}

/// The container port a Service port sends to: its targetPort, by name or number (absent: the
/// same number as `port`).
pub(crate) fn target_container_port(file: &str, c: &Container, port: &ServicePort) -> i32 {
    let target = port.target_port.clone().unwrap_or(IntOrString::Int(port.port));
    let found = container_port(c, &target).unwrap_or_else(|| {
        panic!(
            "{file}: Service port {:?} ({}) targets {target:?}, which the gateway container does not declare",
            port.name, port.port
        )
    });
    found.container_port
}
