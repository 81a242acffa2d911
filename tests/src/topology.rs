//! The topology model: the subset of a containerlab topology file that the lab realises.
//!
//! Pure: parsing and queries only, no I/O beyond reading the file. The same YAML that
//! `containerlab deploy` accepts (see `deploy/containerlab/tdsc.clab.yml`) is the single
//! source of truth for node names, kinds, links, sysctls and addressing `exec` lines.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Label that gives a node's part in the tcp-dsc lab.
pub const ROLE_LABEL: &str = "tdsc.role";

/// Container path that a cluster node's tdscd configuration is bound to.
pub const DAEMON_CONFIG_PATH: &str = "/etc/tdsc/tdscd.toml";

/// Longest Linux interface name (`IFNAMSIZ` 16 including the NUL).
const MAX_IFNAME: usize = 15;

/// Why a topology could not be read or is not one the lab can realise.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("topology is not valid YAML for the model")]
    Parse(#[source] serde_yaml::Error),
    #[error("link endpoint {endpoint:?} is not of the form node:interface")]
    BadEndpoint { endpoint: String },
    #[error("link endpoint {endpoint:?} names unknown node {node:?}")]
    UnknownNode { endpoint: String, node: String },
    #[error("interface name {name:?} is longer than {MAX_IFNAME} bytes")]
    InterfaceNameTooLong { name: String },
    #[error("link {index} has {count} endpoints; the lab realises only point-to-point veths")]
    NotPointToPoint { index: usize, count: usize },
    #[error("node {node:?} has kind {kind:?}; the lab realises only `linux` and `bridge`")]
    UnsupportedKind { node: String, kind: String },
    #[error("lab name {name:?} is not a valid containerlab name")]
    BadLabName { name: String },
}

/// A parsed topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Lab name; namespaces are called `clab-<name>-<node>`.
    pub name: String,
    /// Nodes by name, in name order.
    pub nodes: BTreeMap<String, Node>,
    /// Point-to-point links, in file order.
    pub links: Vec<Link>,
    /// Directory of the topology file: relative `binds` are resolved against it, as
    /// containerlab does.
    pub base_dir: PathBuf,
}

/// What the lab does with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A container: here, a network namespace of its own.
    Linux,
    /// A learning Linux bridge. Real containerlab expects it in the host namespace; the lab
    /// puts it in a namespace of its own so that tests never touch the host.
    Bridge,
}

/// One node of the topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub image: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub binds: Vec<Bind>,
    pub sysctls: BTreeMap<String, String>,
    /// Commands run inside the node after the links are up (containerlab's `exec`).
    pub exec: Vec<String>,
    /// Environment of the container (containerlab's `env`; the namespace engine has none).
    pub env: BTreeMap<String, String>,
    /// The container's command (containerlab's `cmd`), if it sets one; the namespace engine
    /// starts the lab's processes itself instead.
    pub cmd: Option<String>,
}

/// A `host:container[:options]` bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path, resolved against the topology directory when relative.
    pub host: PathBuf,
    pub container: String,
    /// Mount options after the second colon (`ro`), if any.
    pub options: Option<String>,
}

/// One end of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    pub interface: String,
}

/// A veth between two endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub a: Endpoint,
    pub b: Endpoint,
}

/// A node's part in the tcp-dsc lab, from its [`ROLE_LABEL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs tdscd and an HTTP server behind the VIP.
    ClusterNode,
    /// Runs an HTTP server on its own address, without tcp-dsc.
    Baseline,
    /// Sends requests.
    Client,
}

impl Topology {
    /// Reads and parses a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        Self::parse(&text, &base)
    }

    /// Parses topology text; `base_dir` resolves relative binds.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, TopologyError> {
        let raw: RawTopology = serde_yaml::from_str(text).map_err(TopologyError::Parse)?;
        let mut nodes = BTreeMap::new();
        for (name, raw_node) in raw.topology.nodes {
            let raw_node = raw_node.unwrap_or_default();
            let kind_name = raw_node
                .kind
                .clone()
                .or_else(|| raw.topology.defaults.kind.clone())
                .unwrap_or_else(|| "linux".to_owned());
            let kind = match kind_name.as_str() {
                "linux" => Kind::Linux,
                "bridge" => Kind::Bridge,
                _ => {
                    return Err(TopologyError::UnsupportedKind {
                        node: name,
                        kind: kind_name,
                    })
                }
            };
            let binds = raw_node
                .binds
                .iter()
                .filter_map(|b| {
                    let mut parts = b.splitn(3, ':');
                    let host = parts.next()?;
                    let container = parts.next()?;
                    let options = parts.next().map(str::to_owned);
                    let host = Path::new(host);
                    Some(Bind {
                        host: if host.is_absolute() {
                            host.to_owned()
                        } else {
                            base_dir.join(host)
                        },
                        container: container.to_owned(),
                        options,
                    })
                })
                .collect();
            nodes.insert(
                name,
                Node {
                    kind,
                    image: raw_node
                        .image
                        .or_else(|| raw.topology.defaults.image.clone()),
                    labels: raw_node
                        .labels
                        .into_iter()
                        .map(|(k, v)| (k, scalar_to_string(v)))
                        .collect(),
                    binds,
                    sysctls: raw_node
                        .sysctls
                        .into_iter()
                        .map(|(k, v)| (k, scalar_to_string(v)))
                        .collect(),
                    exec: raw_node.exec,
                    env: raw_node
                        .env
                        .into_iter()
                        .map(|(k, v)| (k, scalar_to_string(v)))
                        .collect(),
                    cmd: raw_node.cmd,
                },
            );
        }
        let mut links = Vec::new();
        for (index, raw_link) in raw.topology.links.into_iter().enumerate() {
            if raw_link.endpoints.len() != 2 {
                return Err(TopologyError::NotPointToPoint {
                    index,
                    count: raw_link.endpoints.len(),
                });
            }
            let a = parse_endpoint(&raw_link.endpoints[0], &nodes)?;
            let b = parse_endpoint(&raw_link.endpoints[1], &nodes)?;
            links.push(Link { a, b });
        }
        Ok(Topology {
            name: raw.name,
            nodes,
            links,
            base_dir: base_dir.to_owned(),
        })
    }

    /// The same topology under another lab name, so that several labs can exist at once.
    pub fn renamed(mut self, name: &str) -> Result<Self, TopologyError> {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(TopologyError::BadLabName {
                name: name.to_owned(),
            });
        }
        self.name = name.to_owned();
        Ok(self)
    }

    /// containerlab's name for a node's container, used here as its namespace name.
    pub fn netns_name(&self, node: &str) -> String {
        format!("clab-{}-{}", self.name, node)
    }

    /// Nodes of a role, in name order.
    pub fn nodes_with_role(&self, role: Role) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.role() == Some(role))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Links with an end on `node`.
    pub fn links_of<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Link> + 'a {
        self.links
            .iter()
            .filter(move |l| l.a.node == node || l.b.node == node)
    }
}

impl Node {
    /// The node's role label, if it has a known one.
    pub fn role(&self) -> Option<Role> {
        match self.labels.get(ROLE_LABEL).map(String::as_str) {
            Some("node") => Some(Role::ClusterNode),
            Some("baseline") => Some(Role::Baseline),
            Some("client") => Some(Role::Client),
            _ => None,
        }
    }

    /// Host file bound to `container_path`, if any.
    pub fn bind_for(&self, container_path: &str) -> Option<&Path> {
        self.binds
            .iter()
            .find(|b| b.container == container_path)
            .map(|b| b.host.as_path())
    }

    /// IPv4 addresses that the node's `exec` lines add (`ip addr add A/P dev IF`), with
    /// prefix length and interface.
    pub fn ipv4_addresses(&self) -> Vec<(Ipv4Addr, u8, String)> {
        self.exec
            .iter()
            .filter_map(|line| parse_ip_addr_add(line))
            .collect()
    }

    /// First IPv4 address the node's `exec` lines add.
    pub fn first_ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4_addresses().first().map(|(a, _, _)| *a)
    }
}

/// Recognises `ip addr add 192.0.2.101/24 dev eth0` (also `ip address add`, `ip a add`).
fn parse_ip_addr_add(line: &str) -> Option<(Ipv4Addr, u8, String)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [ip, obj, add, cidr, rest @ ..] = words.as_slice() else {
        return None;
    };
    if *ip != "ip" || !"address".starts_with(obj) || *add != "add" {
        return None;
    }
    let (addr, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let dev = rest
        .windows(2)
        .find(|w| w[0] == "dev")
        .map(|w| w[1].to_owned())?;
    Some((addr.parse().ok()?, prefix.parse().ok()?, dev))
}

fn parse_endpoint(text: &str, nodes: &BTreeMap<String, Node>) -> Result<Endpoint, TopologyError> {
    let (node, interface) = text
        .split_once(':')
        .filter(|(n, i)| !n.is_empty() && !i.is_empty())
        .ok_or_else(|| TopologyError::BadEndpoint {
            endpoint: text.to_owned(),
        })?;
    if !nodes.contains_key(node) {
        return Err(TopologyError::UnknownNode {
            endpoint: text.to_owned(),
            node: node.to_owned(),
        });
    }
    if interface.len() > MAX_IFNAME {
        return Err(TopologyError::InterfaceNameTooLong {
            name: interface.to_owned(),
        });
    }
    Ok(Endpoint {
        node: node.to_owned(),
        interface: interface.to_owned(),
    })
}

fn scalar_to_string(v: serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s,
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        other => serde_yaml::to_string(&other)
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

// The serde shape of the file: only what the model uses; everything else is ignored here
// (the JSON-schema test checks the whole file).

#[derive(Deserialize)]
struct RawTopology {
    name: String,
    topology: RawTopo,
}

#[derive(Deserialize)]
struct RawTopo {
    #[serde(default)]
    defaults: RawNode,
    #[serde(default)]
    nodes: BTreeMap<String, Option<RawNode>>,
    #[serde(default)]
    links: Vec<RawLink>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RawNode {
    kind: Option<String>,
    image: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    binds: Vec<String>,
    #[serde(default)]
    sysctls: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    exec: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, serde_yaml::Value>,
    cmd: Option<String>,
}

#[derive(Deserialize)]
struct RawLink {
    endpoints: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name: t
topology:
  nodes:
    br: {kind: bridge}
    a:
      kind: linux
      labels: {tdsc.role: client}
      sysctls: {net.ipv4.tcp_fastopen: 5}
      binds: [cfg.toml:/etc/tdsc/tdscd.toml:ro]
      env: {WAIT: 198.51.100.11}
      cmd: tdscd --config /etc/tdsc/tdscd.toml
      exec: ["ip addr add 192.0.2.101/24 dev eth0", "ip link set eth0 mtu 1400"]
  links:
    - endpoints: ["a:eth0", "br:a-eth0"]
"#;

    #[test]
    fn parses_nodes_links_and_binds() {
        let t = Topology::parse(SMALL, Path::new("/lab")).unwrap();
        assert_eq!(t.name, "t");
        assert_eq!(t.nodes["br"].kind, Kind::Bridge);
        let a = &t.nodes["a"];
        assert_eq!(a.role(), Some(Role::Client));
        assert_eq!(a.sysctls["net.ipv4.tcp_fastopen"], "5");
        assert_eq!(
            a.bind_for(DAEMON_CONFIG_PATH),
            Some(Path::new("/lab/cfg.toml"))
        );
        assert_eq!(
            a.ipv4_addresses(),
            vec![("192.0.2.101".parse().unwrap(), 24, "eth0".to_owned())]
        );
        assert_eq!(a.binds[0].options.as_deref(), Some("ro"));
        assert_eq!(a.env["WAIT"], "198.51.100.11");
        assert_eq!(
            a.cmd.as_deref(),
            Some("tdscd --config /etc/tdsc/tdscd.toml")
        );
        assert_eq!(t.links[0].b.interface, "a-eth0");
        assert_eq!(t.netns_name("a"), "clab-t-a");
    }

    #[test]
    fn rejects_unknown_node_and_long_names() {
        let bad = SMALL.replace("\"a:eth0\"", "\"zz:eth0\"");
        assert!(matches!(
            Topology::parse(&bad, Path::new(".")),
            Err(TopologyError::UnknownNode { .. })
        ));
        let long = SMALL.replace("br:a-eth0", "br:a-very-long-interface");
        assert!(matches!(
            Topology::parse(&long, Path::new(".")),
            Err(TopologyError::InterfaceNameTooLong { .. })
        ));
    }

    #[test]
    fn renaming_checks_the_name() {
        let t = Topology::parse(SMALL, Path::new(".")).unwrap();
        assert!(t.clone().renamed("tdsc-e2e-1-2").is_ok());
        assert!(t.renamed("-bad/").is_err());
    }
}
