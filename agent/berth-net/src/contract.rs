//! What every [`NetworkHost`] must do, as cases any host can be run
//! through: [`FakeHost`](crate::fake::FakeHost) in `cargo test`, the
//! kernel (in a network namespace of the test's own) as root in tier 2. A
//! case returns what went wrong instead of panicking, so the caller names
//! the host.

use std::net::{Ipv4Addr, SocketAddr};

use crate::cidr::Cidr;
use crate::dns::{ServiceEntry, Zone};
use crate::host::{HostError, NetworkHost};
use crate::link::PodLink;
use crate::nft::{Endpoint, PortRules, Protocol, Ruleset, ServiceRules, meaning};

/// A case: its name, and the check, given a node with no pod network.
pub type Case = (&'static str, fn(&dyn NetworkHost) -> Result<(), String>);

pub const CASES: &[Case] = &[
    (
        "the bridge is made once and its gateway is not one of the node's own addresses",
        bridge_is_idempotent,
    ),
    (
        "a pod cannot be wired before the bridge exists",
        no_pod_without_bridge,
    ),
    (
        "a wired pod has its namespace, address and veth, and wiring it again changes nothing",
        wiring_is_idempotent,
    ),
    (
        "a pod whose veth was deleted is wired again with the same address",
        broken_wiring_is_remade,
    ),
    (
        "removing a pod takes its namespace and veth, and removing it again is fine",
        removal_is_idempotent,
    ),
    (
        "the Services table is absent until applied, an update leaves what a rewrite does, and every change moves the generation",
        table_updates_match_rewrites,
    ),
    (
        "the DNS responder takes only the node's addresses, one at a time (a wildcard holds them all), and answers from the zone last set",
        resolver_owns_its_address,
    ),
];

/// Runs every case on fresh hosts from `make`; returns the failures.
pub fn run(make: &dyn Fn(&str) -> Box<dyn NetworkHost>) -> Vec<String> {
    CASES
        .iter()
        .filter_map(|(name, case)| {
            let host = make(name);
            case(host.as_ref()).err().map(|e| format!("{name}: {e}"))
        })
        .collect()
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn e(err: HostError) -> String {
    err.to_string()
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn pods() -> Cidr {
    Cidr::new(Ipv4Addr::new(10, 99, 0, 0), 24).unwrap_or(Cidr::ZERO)
}

fn services() -> Cidr {
    Cidr::new(Ipv4Addr::new(10, 98, 0, 0), 24).unwrap_or(Cidr::ZERO)
}

fn bridge(h: &dyn NetworkHost) -> Result<(), String> {
    h.ensure_bridge(GATEWAY, pods(), services()).map_err(e)
}

fn pod(name: &str, last: u8) -> PodLink {
    PodLink {
        netns: name.to_string(),
        host_if: crate::host_if_name(name),
        ip: Ipv4Addr::new(10, 99, 0, last),
        prefix: 24,
        gateway: GATEWAY,
    }
}

fn bridge_is_idempotent(h: &dyn NetworkHost) -> Result<(), String> {
    bridge(h)?;
    bridge(h)?;
    let own = h.node_addresses().map_err(e)?;
    check(own.iter().all(|(_, ip, _)| *ip != GATEWAY), || {
        format!("the gateway is listed as the node's own: {own:?}")
    })?;
    check(h.pod_namespaces().is_empty(), || {
        format!("namespaces on a fresh node: {:?}", h.pod_namespaces())
    })
}

fn no_pod_without_bridge(h: &dyn NetworkHost) -> Result<(), String> {
    match h.ensure_pod(&pod("default_early", 2)) {
        Err(_) => Ok(()),
        Ok(changed) => Err(format!("wired without a bridge (changed: {changed})")),
    }
}

fn wiring_is_idempotent(h: &dyn NetworkHost) -> Result<(), String> {
    bridge(h)?;
    let a = pod("default_a", 2);
    check(h.ensure_pod(&a).map_err(e)?, || {
        "a first wiring reported no change".into()
    })?;
    check(!h.ensure_pod(&a).map_err(e)?, || {
        "a second wiring reported a change".into()
    })?;
    let names = h.pod_namespaces();
    check(names == ["default_a"], || format!("namespaces {names:?}"))?;
    let address = h.pod_address("default_a").map_err(e)?;
    check(address == Some((a.ip, 24)), || {
        format!("pod address {address:?}")
    })?;
    let links = h.pod_host_links().map_err(e)?;
    check(links == [a.host_if.clone()], || {
        format!("host links {links:?}")
    })?;
    check(h.pod_address("default_nobody").is_err(), || {
        "an address read from a namespace that does not exist".into()
    })
}

fn broken_wiring_is_remade(h: &dyn NetworkHost) -> Result<(), String> {
    bridge(h)?;
    let a = pod("default_a", 7);
    h.ensure_pod(&a).map_err(e)?;
    check(h.delete_link(&a.host_if).map_err(e)?, || {
        "deleting the veth reported nothing deleted".into()
    })?;
    check(!h.delete_link(&a.host_if).map_err(e)?, || {
        "deleting a veth twice reported a deletion".into()
    })?;
    let gone = h.pod_address("default_a").map_err(e)?;
    check(gone.is_none(), || {
        format!("the pod side outlived its veth: {gone:?}")
    })?;
    check(h.ensure_pod(&a).map_err(e)?, || {
        "broken wiring was not remade".into()
    })?;
    let back = h.pod_address("default_a").map_err(e)?;
    check(back == Some((a.ip, 24)), || format!("remade with {back:?}"))
}

fn removal_is_idempotent(h: &dyn NetworkHost) -> Result<(), String> {
    bridge(h)?;
    let (a, b) = (pod("default_a", 2), pod("default_b", 3));
    h.ensure_pod(&a).map_err(e)?;
    h.ensure_pod(&b).map_err(e)?;
    h.remove_pod(&a.netns, &a.host_if).map_err(e)?;
    h.remove_pod(&a.netns, &a.host_if).map_err(e)?;
    let names = h.pod_namespaces();
    check(names == ["default_b"], || format!("namespaces {names:?}"))?;
    let links = h.pod_host_links().map_err(e)?;
    check(links == [b.host_if.clone()], || {
        format!("host links {links:?}")
    })
}

fn ruleset(web: &[u8], sticky: Option<u32>) -> Ruleset {
    Ruleset {
        pod_cidr: pods(),
        refused_to_pods: Vec::new(),
        services: vec![ServiceRules {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 98, 0, 10),
            affinity_seconds: sticky,
            ports: vec![PortRules {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                endpoints: web
                    .iter()
                    .map(|last| Endpoint {
                        ip: Ipv4Addr::new(10, 99, 0, *last),
                        port: 8080,
                    })
                    .collect(),
            }],
        }],
    }
}

fn table_updates_match_rewrites(h: &dyn NetworkHost) -> Result<(), String> {
    let listed = h.table_listing().map_err(e)?;
    check(listed.is_none(), || {
        format!("a table before any: {listed:?}")
    })?;
    let (first, second) = (ruleset(&[2, 3], None), ruleset(&[3, 4, 5], Some(60)));
    let g0 = h.table_generation();
    h.apply_table(None, &first).map_err(e)?;
    let g1 = h.table_generation();
    check(g0.is_some() && g1.is_some() && g0 != g1, || {
        format!("the generation did not move with an apply: {g0:?} → {g1:?}")
    })?;
    check(h.table_generation() == g1, || {
        "reading the generation moved it".into()
    })?;
    h.apply_table(Some(&first), &second).map_err(e)?;
    let updated = h
        .table_listing()
        .map_err(e)?
        .ok_or("no table after an update")?;
    check(h.table_generation() != g1, || {
        "the generation did not move with an update".into()
    })?;
    h.remove_table().map_err(e)?;
    let listed = h.table_listing().map_err(e)?;
    check(listed.is_none(), || {
        format!("a table after removal: {listed:?}")
    })?;
    h.remove_table().map_err(e)?;
    h.apply_table(None, &second).map_err(e)?;
    let whole = h
        .table_listing()
        .map_err(e)?
        .ok_or("no table after a rewrite")?;
    check(meaning(&updated) == meaning(&whole), || {
        format!("an update left\n{updated}\nbut a rewrite\n{whole}")
    })
}

fn resolver_owns_its_address(h: &dyn NetworkHost) -> Result<(), String> {
    bridge(h)?;
    let elsewhere = SocketAddr::from((Ipv4Addr::new(10, 200, 0, 1), 53));
    check(
        h.start_resolver(elsewhere, Vec::new(), Zone::default())
            .is_err(),
        || "a responder on an address the node does not have".into(),
    )?;
    let address = SocketAddr::from((GATEWAY, 53));
    let first = h
        .start_resolver(address, Vec::new(), Zone::default())
        .map_err(e)?;
    check(first.address() == address, || {
        format!("listening on {}", first.address())
    })?;
    check(
        h.start_resolver(address, Vec::new(), Zone::default())
            .is_err(),
        || "two responders on one address".into(),
    )?;
    let mut zone = Zone {
        domain: "cluster.local".into(),
        ..Zone::default()
    };
    zone.services.insert(
        ("default".into(), "web".into()),
        ServiceEntry {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Some(Ipv4Addr::new(10, 98, 0, 10)),
            endpoints: Vec::new(),
            ports: Vec::new(),
        },
    );
    first.set_zone(zone.clone());
    check(*first.zone() == zone, || {
        "the zone set is not the zone answered from".into()
    })?;
    drop(first);
    // Someone else's responder on every address holds the port on ours.
    let wildcard = h
        .start_resolver(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53)),
            Vec::new(),
            Zone::default(),
        )
        .map_err(e)?;
    check(
        h.start_resolver(address, Vec::new(), Zone::default())
            .is_err(),
        || "a responder on a port a wildcard holds".into(),
    )?;
    drop(wildcard);
    let again = h
        .start_resolver(address, Vec::new(), Zone::default())
        .map_err(e)?;
    check(again.zone().services.is_empty(), || {
        "a new responder started with old records".into()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_case_passes_on_the_fake() {
        let failures = super::run(&|_| Box::new(crate::fake::FakeHost::new()));
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
