//! Services as one nftables table, `ip berth`, owned by the agent and
//! replaced whole in one transaction (`nft -f -`): the kernel applies the
//! delete and the new table atomically, so no packet sees half a ruleset,
//! and an admin's other tables are never read or touched.
//!
//! Layout, per Service port:
//! - `services` maps `cluster IP . protocol . port` to the port's chain;
//!   `node-ports` maps `protocol . port` on any local address likewise;
//! - the port's chain picks an endpoint with `numgen random` (after the
//!   client's affinity set, when the Service asks for `ClientIP`);
//! - the endpoint's chain marks hairpin traffic (a pod reaching itself
//!   through its Service) for masquerade and DNATs;
//! - a Service port without endpoints is refused (a TCP reset, so
//!   `connect` fails at once; ICMP for UDP) instead of timing out.
//!
//! Pods reach each other without NAT; traffic leaving the pod prefix is
//! masqueraded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::cidr::Cidr;

pub const TABLE: &str = "berth";
/// The packet mark bit that asks for masquerade (kube-proxy's choice too).
const MASQ_MARK: u32 = 0x4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn word(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRules {
    /// The Service port's name, or its number when it has none.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// `sessionAffinity: ClientIP`, with its timeout in seconds.
    pub affinity_seconds: Option<u32>,
    pub ports: Vec<PortRules>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub pod_cidr: Cidr,
    pub services: Vec<ServiceRules>,
    /// TCP ports of the node itself that pods are refused on (the metrics
    /// endpoint, unless the node config lets pods in).
    pub refused_to_pods: Vec<u16>,
}

fn port_chain(s: &ServiceRules, p: &PortRules) -> String {
    format!("svc_{}_{}_{}", s.namespace, s.name, p.name)
}

fn endpoint_chain(s: &ServiceRules, p: &PortRules, e: &Endpoint) -> String {
    format!(
        "ep_{}_{}_{}_{}_{}",
        s.namespace, s.name, p.name, e.ip, e.port
    )
}

fn affinity_set(s: &ServiceRules, p: &PortRules, e: &Endpoint) -> String {
    format!(
        "aff_{}_{}_{}_{}_{}",
        s.namespace, s.name, p.name, e.ip, e.port
    )
}

/// The table as named objects: what a full rendering writes and what an
/// update compares.
#[derive(Debug, Default, PartialEq, Eq)]
struct Objects {
    /// Service-port and endpoint chains: name → rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name → timeout in seconds.
    sets: BTreeMap<String, u32>,
    /// `services` map: key → chain.
    services: BTreeMap<String, String>,
    /// `node-ports` map: key → chain.
    node_ports: BTreeMap<String, String>,
    closed: BTreeSet<String>,
    closed_node_ports: BTreeSet<String>,
}

fn objects(rules: &Ruleset) -> Objects {
    let mut o = Objects::default();
    for s in &rules.services {
        for p in &s.ports {
            let proto = p.protocol.word();
            let key = format!("{} . {proto} . {}", s.cluster_ip, p.port);
            if p.endpoints.is_empty() {
                o.closed.insert(key);
                if let Some(np) = p.node_port {
                    o.closed_node_ports.insert(format!("{proto} . {np}"));
                }
                continue;
            }
            let chain = port_chain(s, p);
            o.services.insert(key, chain.clone());
            if let Some(np) = p.node_port {
                o.node_ports
                    .insert(format!("{proto} . {np}"), chain.clone());
            }
            let mut rules = Vec::new();
            if let Some(timeout) = s.affinity_seconds {
                for e in &p.endpoints {
                    let set = affinity_set(s, p, e);
                    o.sets.insert(set.clone(), timeout);
                    rules.push(format!("ip saddr @{set} goto {}", endpoint_chain(s, p, e)));
                }
            }
            let targets: Vec<String> = p
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{i} : goto {}", endpoint_chain(s, p, e)))
                .collect();
            rules.push(format!(
                "numgen random mod {} vmap {{ {} }}",
                p.endpoints.len(),
                targets.join(", ")
            ));
            o.chains.insert(chain, rules);
            for e in &p.endpoints {
                let mut rules = vec![format!(
                    "ip saddr {} meta mark set meta mark or {MASQ_MARK:#x}",
                    e.ip
                )];
                if s.affinity_seconds.is_some() {
                    rules.push(format!("update @{} {{ ip saddr }}", affinity_set(s, p, e)));
                }
                rules.push(format!("meta l4proto {proto} dnat to {}:{}", e.ip, e.port));
                o.chains.insert(endpoint_chain(s, p, e), rules);
            }
        }
    }
    o
}

fn set_definition(timeout: u32) -> String {
    format!("type ipv4_addr; flags dynamic,timeout; timeout {timeout}s;")
}

/// Only what changed from `old` to `new`, as one `nft -f` transaction:
/// chains made or rewritten, map and set elements added or removed, chains
/// and sets no longer used deleted last. `None` when the change touches
/// the table's frame (the pod range), which takes a full rendering.
pub fn render_update(old: &Ruleset, new: &Ruleset) -> Option<String> {
    if old.pod_cidr != new.pod_cidr || old.refused_to_pods != new.refused_to_pods {
        return None;
    }
    let (a, b) = (objects(old), objects(new));
    let mut out = String::new();
    let t = TABLE;
    for (set, timeout) in &b.sets {
        if a.sets.get(set) != Some(timeout) {
            if a.sets.contains_key(set) {
                // A set's timeout cannot change in place: a full rendering.
                return None;
            }
            let _ = writeln!(
                out,
                "add set ip {t} {set} {{ {} }}",
                set_definition(*timeout)
            );
        }
    }
    let changed: Vec<(&String, &Vec<String>)> = b
        .chains
        .iter()
        .filter(|(name, rules)| a.chains.get(*name) != Some(*rules))
        .collect();
    for (name, _) in &changed {
        if !a.chains.contains_key(*name) {
            let _ = writeln!(out, "add chain ip {t} {name}");
        }
    }
    // Endpoint chains before the port chains that jump to them.
    let mut ordered = changed.clone();
    ordered.sort_by_key(|(name, _)| !name.starts_with("ep_"));
    for (name, rules) in ordered {
        if a.chains.contains_key(name) {
            let _ = writeln!(out, "flush chain ip {t} {name}");
        }
        for r in rules {
            let _ = writeln!(out, "add rule ip {t} {name} {r}");
        }
    }
    let map_update = |out: &mut String,
                      map: &str,
                      a: &BTreeMap<String, String>,
                      b: &BTreeMap<String, String>| {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                let _ = writeln!(out, "delete element ip {t} {map} {{ {k} }}");
            }
        }
        for (k, v) in b {
            if a.get(k) != Some(v) {
                let _ = writeln!(out, "add element ip {t} {map} {{ {k} : goto {v} }}");
            }
        }
    };
    map_update(&mut out, "services", &a.services, &b.services);
    map_update(&mut out, "node-ports", &a.node_ports, &b.node_ports);
    let set_update = |out: &mut String, set: &str, a: &BTreeSet<String>, b: &BTreeSet<String>| {
        for k in a.difference(b) {
            let _ = writeln!(out, "delete element ip {t} {set} {{ {k} }}");
        }
        for k in b.difference(a) {
            let _ = writeln!(out, "add element ip {t} {set} {{ {k} }}");
        }
    };
    set_update(&mut out, "no-endpoints", &a.closed, &b.closed);
    set_update(
        &mut out,
        "no-endpoint-node-ports",
        &a.closed_node_ports,
        &b.closed_node_ports,
    );
    // Port chains before the endpoint chains they jump to.
    let mut gone: Vec<&String> = a
        .chains
        .keys()
        .filter(|n| !b.chains.contains_key(*n))
        .collect();
    gone.sort_by_key(|name| name.starts_with("ep_"));
    for name in &gone {
        let _ = writeln!(out, "flush chain ip {t} {name}");
    }
    for name in &gone {
        let _ = writeln!(out, "delete chain ip {t} {name}");
    }
    for set in a.sets.keys().filter(|s| !b.sets.contains_key(*s)) {
        let _ = writeln!(out, "delete set ip {t} {set}");
    }
    Some(out)
}

/// The whole table as `nft -f` input: create (so the delete never fails),
/// delete, and define again, which nft applies as one transaction.
pub fn render(rules: &Ruleset) -> String {
    let o = objects(rules);
    let mut out = String::with_capacity(4096 + rules.services.len() * 1024);
    let _ = writeln!(out, "table ip {TABLE}\ndelete table ip {TABLE}");
    let _ = writeln!(out, "table ip {TABLE} {{");
    let elements = |items: Vec<String>| -> String {
        if items.is_empty() {
            String::new()
        } else {
            format!("\t\telements = {{ {} }}\n", items.join(",\n\t\t\t"))
        }
    };
    let verdicts =
        |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| format!("{k} : goto {v}")).collect();
    let _ = write!(
        out,
        "\tmap services {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n{}\t}}\n",
        elements(verdicts(&o.services))
    );
    let _ = write!(
        out,
        "\tmap node-ports {{\n\t\ttype inet_proto . inet_service : verdict\n{}\t}}\n",
        elements(verdicts(&o.node_ports))
    );
    let _ = write!(
        out,
        "\tset no-endpoints {{\n\t\ttype ipv4_addr . inet_proto . inet_service\n{}\t}}\n",
        elements(o.closed.iter().cloned().collect())
    );
    let _ = write!(
        out,
        "\tset no-endpoint-node-ports {{\n\t\ttype inet_proto . inet_service\n{}\t}}\n",
        elements(o.closed_node_ports.iter().cloned().collect())
    );
    for (set, timeout) in &o.sets {
        let _ = writeln!(out, "\tset {set} {{ {} }}", set_definition(*timeout));
    }
    let mut chains = String::new();
    for (name, rules) in &o.chains {
        let _ = writeln!(chains, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(chains, "\t\t{r}");
        }
        let _ = writeln!(chains, "\t}}");
    }
    let pods = rules.pod_cidr;
    // The node's own ports pods may not reach: refused before anything
    // else in the input hook (pods reach the node's addresses through it).
    // Not on loopback: the node talking to its own bridge address has a
    // source in the pod range too.
    let refused = if rules.refused_to_pods.is_empty() {
        String::new()
    } else {
        let ports: Vec<String> = rules.refused_to_pods.iter().map(u16::to_string).collect();
        format!(
            "\t\tiifname != \"lo\" ip saddr {pods} tcp dport {{ {} }} reject with tcp reset\n",
            ports.join(", ")
        )
    };
    let _ = write!(
        out,
        "\tchain services {{
\t\tip daddr . meta l4proto . th dport vmap @services
\t\tfib daddr type local meta l4proto . th dport vmap @node-ports
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tjump services
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade
\t\tip saddr {pods} ip daddr != {pods} masquerade
\t}}
\tchain refuse {{
\t\tip daddr . meta l4proto . th dport @no-endpoints goto refused
\t\tfib daddr type local meta l4proto . th dport @no-endpoint-node-ports goto refused
\t}}
\tchain refused {{
\t\tmeta l4proto tcp reject with tcp reset
\t\treject
\t}}
\tchain input {{
\t\ttype filter hook input priority 0; policy accept;
{refused}\t\tct state new jump refuse
\t}}
\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state new jump refuse
\t}}
\tchain output-filter {{
\t\ttype filter hook output priority 0; policy accept;
\t\tct state new jump refuse
\t}}
"
    );
    out.push_str(&chains);
    out.push_str("}\n");
    out
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("nft refused the {TABLE} table: {0}")]
    Refused(String),
}

/// Runs `nft` with `args`, feeding `input` on stdin; returns stdout.
fn nft(args: &[&str], input: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces the table in one transaction.
pub fn apply(text: &str) -> Result<(), NftError> {
    nft(&["-f", "-"], Some(text)).map(|_| ())
}

/// The table as the kernel has it now, without counters and without the
/// clients learnt by affinity sets (they change with traffic, not with
/// anyone's edit). `None` when the table is not there.
pub fn listing() -> Result<Option<String>, NftError> {
    match nft(&["-s", "list", "table", "ip", TABLE], None) {
        Ok(text) => Ok(Some(without_learnt_elements(&text))),
        Err(NftError::Refused(msg)) if msg.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The nftables generation: the kernel bumps it on every nftables
/// transaction, whoever sends it. Read over netlink (`NFT_MSG_GETGEN`)
/// without starting a process, so an unchanged ruleset is known in
/// microseconds instead of listing the table.
pub fn generation() -> std::io::Result<u32> {
    use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFT_MSG_GETGEN: u16 = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NFTA_GEN_ID: u16 = 1;
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    msg.extend_from_slice(&[0, 0, 0, 0]);
    socket.send(&msg, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    parse_generation(
        &reply,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
        NLMSG_ERROR,
        NFTA_GEN_ID,
    )
}

fn parse_generation(reply: &[u8], newgen: u16, error: u16, gen_id: u16) -> std::io::Result<u32> {
    let bad = || std::io::Error::other("a malformed NFT_MSG_NEWGEN reply");
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
    };
    let len = u32_at(reply, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(reply, 4).ok_or_else(bad)?;
    let msg = reply.get(..len).ok_or_else(bad)?;
    if kind == error {
        let code = u32_at(msg, 16).ok_or_else(bad)? as i32;
        return Err(std::io::Error::from_raw_os_error(-code));
    }
    if kind != newgen {
        return Err(bad());
    }
    // Attributes follow the 16-byte header and the 4-byte nfgenmsg.
    let mut at = 20;
    while let (Some(nla_len), Some(nla_type)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let nla_len = usize::from(nla_len);
        if nla_len < 4 {
            break;
        }
        if nla_type & 0x3fff == gen_id {
            let v = msg.get(at + 4..at + 8).ok_or_else(bad)?;
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (nla_len + 3) & !3;
    }
    Err(bad())
}

/// Removes the table (used when the node has no pod network any more).
pub fn remove() -> Result<(), NftError> {
    apply(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// A listing reduced to what it says, whatever order the kernel keeps:
/// every rule line and every element, counted. Two listings of the same
/// table (one updated in place, one written whole) have the same meaning.
pub fn meaning(listing: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    let mut in_elements = false;
    for line in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let body = if let Some(rest) = line.strip_prefix("elements = {") {
            in_elements = true;
            rest
        } else {
            line
        };
        if in_elements {
            let end = body.ends_with('}');
            for e in body.trim_end_matches('}').split(',') {
                let e = e.trim();
                if !e.is_empty() {
                    items.push(format!("element {e}"));
                }
            }
            in_elements = !end;
        } else {
            items.push(body.to_string());
        }
    }
    items.sort();
    items
}

fn without_learnt_elements(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_affinity = false;
    let mut skipping = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("set ") {
            in_affinity = t.starts_with("set aff_");
        }
        if skipping {
            if t.ends_with('}') {
                skipping = false;
            }
            continue;
        }
        if in_affinity && t.starts_with("elements = {") {
            skipping = !t.ends_with('}');
            continue;
        }
        if t == "}" {
            in_affinity = false;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    fn web(endpoints: Vec<Endpoint>, affinity: Option<u32>) -> Ruleset {
        Ruleset {
            pod_cidr: "10.88.0.0/16".parse().expect("valid"),
            refused_to_pods: Vec::new(),
            services: vec![ServiceRules {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
                affinity_seconds: affinity,
                ports: vec![PortRules {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    endpoints,
                }],
            }],
        }
    }

    #[test]
    fn a_service_maps_its_ip_and_node_port_to_a_random_endpoint() {
        let text = render(&web(
            vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 88, 0, 2),
                    port: 8080,
                },
                Endpoint {
                    ip: Ipv4Addr::new(10, 88, 0, 3),
                    port: 8080,
                },
            ],
            None,
        ));
        assert!(text.starts_with("table ip berth\ndelete table ip berth\n"));
        assert!(text.contains("elements = { 10.96.0.10 . tcp . 80 : goto svc_default_web_http }"));
        assert!(text.contains("elements = { tcp . 30080 : goto svc_default_web_http }"));
        assert!(text.contains(
            "numgen random mod 2 vmap { 0 : goto ep_default_web_http_10.88.0.2_8080, 1 : goto ep_default_web_http_10.88.0.3_8080 }"
        ));
        assert!(text.contains("ip saddr 10.88.0.3 meta mark set meta mark or 0x4000"));
        assert!(text.contains("meta l4proto tcp dnat to 10.88.0.3:8080"));
        assert!(text.contains("ip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 masquerade"));
        assert!(!text.contains("aff_"));
    }

    #[test]
    fn no_endpoints_means_refused_and_affinity_adds_a_set_per_endpoint() {
        let text = render(&web(Vec::new(), None));
        assert!(text.contains("set no-endpoints {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\telements = { 10.96.0.10 . tcp . 80 }"));
        assert!(text.contains("elements = { tcp . 30080 }"));
        assert!(!text.contains("chain svc_"));
        let sticky = render(&web(
            vec![Endpoint {
                ip: Ipv4Addr::new(10, 88, 0, 2),
                port: 8080,
            }],
            Some(10800),
        ));
        assert!(sticky.contains("set aff_default_web_http_10.88.0.2_8080 {"));
        assert!(sticky.contains("timeout 10800s"));
        assert!(sticky.contains(
            "ip saddr @aff_default_web_http_10.88.0.2_8080 goto ep_default_web_http_10.88.0.2_8080"
        ));
        assert!(sticky.contains("update @aff_default_web_http_10.88.0.2_8080 { ip saddr }"));
    }

    #[test]
    fn learnt_affinity_clients_are_not_part_of_the_listing() {
        let listed = "table ip berth {\n\tset aff_x {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 3h\n\t\telements = { 10.88.0.3 timeout 3h expires 2h59m,\n\t\t\t     10.88.0.4 timeout 3h expires 1h }\n\t}\n\tset no-endpoints {\n\t\ttype ipv4_addr\n\t\telements = { 10.96.0.1 }\n\t}\n}\n";
        let kept = without_learnt_elements(listed);
        assert!(!kept.contains("10.88.0.3"));
        assert!(!kept.contains("10.88.0.4"));
        assert!(kept.contains("timeout 3h\n\t}"));
        assert!(kept.contains("elements = { 10.96.0.1 }"));
    }

    #[test]
    fn an_update_touches_only_what_changed() {
        let two = web(
            vec![
                Endpoint {
                    ip: Ipv4Addr::new(10, 88, 0, 2),
                    port: 8080,
                },
                Endpoint {
                    ip: Ipv4Addr::new(10, 88, 0, 3),
                    port: 8080,
                },
            ],
            None,
        );
        assert_eq!(render_update(&two, &two).as_deref(), Some(""));
        let one = web(
            vec![Endpoint {
                ip: Ipv4Addr::new(10, 88, 0, 3),
                port: 8080,
            }],
            None,
        );
        let update = render_update(&two, &one).expect("in place");
        assert_eq!(
            update,
            "flush chain ip berth svc_default_web_http
add rule ip berth svc_default_web_http numgen random mod 1 vmap { 0 : goto ep_default_web_http_10.88.0.3_8080 }
flush chain ip berth ep_default_web_http_10.88.0.2_8080
delete chain ip berth ep_default_web_http_10.88.0.2_8080
"
        );
        // The last endpoint gone: out of the maps, into the refusing sets.
        let none = web(Vec::new(), None);
        let update = render_update(&one, &none).expect("in place");
        assert!(
            update.contains("delete element ip berth services { 10.96.0.10 . tcp . 80 }"),
            "{update}"
        );
        assert!(
            update.contains("add element ip berth no-endpoints { 10.96.0.10 . tcp . 80 }"),
            "{update}"
        );
        assert!(
            update.contains("add element ip berth no-endpoint-node-ports { tcp . 30080 }"),
            "{update}"
        );
        // A new pod range is a new frame: the whole table.
        let mut moved = one.clone();
        moved.pod_cidr = "10.89.0.0/16".parse().expect("valid");
        assert_eq!(render_update(&one, &moved), None);
    }

    #[test]
    fn the_nodes_refused_ports_reset_pod_connections_first_in_the_input_hook() {
        let open = web(Vec::new(), None);
        assert!(!render(&open).contains("tcp dport {"), "{}", render(&open));
        let mut closed = open.clone();
        closed.refused_to_pods = vec![9100];
        let text = render(&closed);
        assert!(
            text.contains(
                "hook input priority 0; policy accept;\n\t\tiifname != \"lo\" ip saddr 10.88.0.0/16 tcp dport { 9100 } reject with tcp reset\n"
            ),
            "{text}"
        );
        // Part of the frame: a change is a whole rendering.
        assert_eq!(render_update(&open, &closed), None);
        assert_eq!(render_update(&closed, &closed).as_deref(), Some(""));
    }
}
