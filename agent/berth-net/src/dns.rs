//! The cluster DNS responder: `<service>.<namespace>.svc.<domain>` (A, and
//! SRV for named ports), headless Services answered with their pods'
//! addresses, every other name forwarded to the node's own resolvers.
//!
//! Messages are parsed and written by `hickory-proto`; the server is a few
//! threads on std sockets (UDP and TCP on the bridge address, port 53).
//! The zone is swapped whole when Services or endpoints change, so a query
//! never sees half an update.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Seconds a cluster answer may be cached (Kubernetes' DNS uses 5 too):
/// endpoints change with pods.
pub const TTL: u32 = 5;
/// Queries forwarded at once; more are answered SERVFAIL at once instead of
/// piling up threads.
const MAX_FORWARDS: usize = 64;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP connections served at once.
const MAX_TCP: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    /// `None` for a headless Service: its name answers with `endpoints`.
    pub cluster_ip: Option<Ipv4Addr>,
    pub endpoints: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
}

/// What the responder answers for, swapped whole on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Zone {
    /// `cluster.local`, lowercase, without the final dot.
    pub domain: String,
    /// By `(namespace, name)`.
    pub services: BTreeMap<(String, String), ServiceEntry>,
}

/// The parts of an in-zone name, from the right: `svc`, the namespace, the
/// Service, and for SRV the `_port._proto` labels.
enum Lookup<'a> {
    Service(&'a ServiceEntry),
    /// `<a-b-c-d>.<service>...` of a headless Service's endpoint.
    Endpoint(Ipv4Addr),
    Srv(&'a ServiceEntry, &'a ServicePort),
    /// Inside the zone but not a name that exists (NXDOMAIN) ...
    Missing,
    /// ... or a name that exists only as a parent (`svc.<domain>`): NODATA.
    Empty,
}

impl Zone {
    fn lookup(&self, labels: &[String]) -> Lookup<'_> {
        // labels: the name's labels before the domain, leftmost first.
        match labels {
            [] => Lookup::Empty,
            [svc] if svc == "svc" => Lookup::Empty,
            [ns, svc] if svc == "svc" => {
                if self.services.keys().any(|(n, _)| n == ns) {
                    Lookup::Empty
                } else {
                    Lookup::Missing
                }
            }
            [name, ns, svc] if svc == "svc" => match self.services.get(&(ns.clone(), name.clone()))
            {
                Some(s) => Lookup::Service(s),
                None => Lookup::Missing,
            },
            [port, proto, name, ns, svc]
                if svc == "svc" && port.starts_with('_') && proto.starts_with('_') =>
            {
                let Some(s) = self.services.get(&(ns.clone(), name.clone())) else {
                    return Lookup::Missing;
                };
                let (port, proto) = (&port[1..], &proto[1..]);
                match s
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(port) && p.protocol == proto)
                {
                    Some(p) => Lookup::Srv(s, p),
                    None => Lookup::Missing,
                }
            }
            [host, name, ns, svc] if svc == "svc" => {
                let Some(s) = self.services.get(&(ns.clone(), name.clone())) else {
                    return Lookup::Missing;
                };
                match host.replace('-', ".").parse::<Ipv4Addr>() {
                    Ok(ip) if s.cluster_ip.is_none() && s.endpoints.contains(&ip) => {
                        Lookup::Endpoint(ip)
                    }
                    _ => Lookup::Missing,
                }
            }
            _ => Lookup::Missing,
        }
    }

    /// The labels of `name` before the zone's domain, if it is inside.
    fn inside(&self, name: &str) -> Option<Vec<String>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == self.domain {
            return Some(Vec::new());
        }
        let rest = name.strip_suffix(&self.domain)?.strip_suffix('.')?;
        Some(rest.split('.').map(str::to_string).collect())
    }
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not ours: send the query to the node's resolvers.
    Forward,
    /// Unparseable: nothing to answer.
    Drop,
}

fn name_of(text: &str) -> Option<Name> {
    Name::from_ascii(text).ok()
}

fn a_record(name: &Name, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), TTL, RData::A(A(ip)))
}

/// Answers a query from the zone, or says it must be forwarded.
pub fn answer(zone: &Zone, query: &[u8]) -> Reply {
    let Ok(request) = Message::from_vec(query) else {
        // A header is 12 bytes; with one, say FORMERR.
        if query.len() >= 12 {
            let id = u16::from_be_bytes([query[0], query[1]]);
            let msg = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return msg.to_vec().map_or(Reply::Drop, Reply::Answer);
        }
        return Reply::Drop;
    };
    if request.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let [question] = request.queries.as_slice() else {
        return respond_error(&request, ResponseCode::FormErr);
    };
    let Some(labels) = zone.inside(&question.name().to_ascii()) else {
        return Reply::Forward;
    };
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_query(question.clone());
    let qname = question.name().to_lowercase();
    let qtype = question.query_type();
    let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
    match zone.lookup(&labels) {
        Lookup::Missing => response.metadata.response_code = ResponseCode::NXDomain,
        Lookup::Empty => {}
        Lookup::Service(s) => {
            if wants(RecordType::A) {
                match s.cluster_ip {
                    Some(ip) => {
                        response.add_answer(a_record(&qname, ip));
                    }
                    None => {
                        for ip in &s.endpoints {
                            response.add_answer(a_record(&qname, *ip));
                        }
                    }
                }
            }
        }
        Lookup::Endpoint(ip) => {
            if wants(RecordType::A) {
                response.add_answer(a_record(&qname, ip));
            }
        }
        Lookup::Srv(s, p) => {
            if wants(RecordType::SRV) {
                let service = format!("{}.{}.svc.{}.", s.name, s.namespace, zone.domain);
                let targets: Vec<(String, Ipv4Addr)> = match s.cluster_ip {
                    Some(ip) => vec![(service, ip)],
                    None => s
                        .endpoints
                        .iter()
                        .map(|ip| {
                            (
                                format!("{}.{service}", ip.to_string().replace('.', "-")),
                                *ip,
                            )
                        })
                        .collect(),
                };
                let weight = u16::try_from(100 / targets.len().max(1)).unwrap_or(100);
                for (target, ip) in targets {
                    let Some(target_name) = name_of(&target) else {
                        continue;
                    };
                    response.add_answer(Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, weight, p.port, target_name.clone())),
                    ));
                    response.add_additional(a_record(&target_name, ip));
                }
            }
        }
    }
    response.to_vec().map_or(Reply::Drop, Reply::Answer)
}

fn respond_error(request: &Message, code: ResponseCode) -> Reply {
    let mut msg = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    msg.add_queries(request.queries.clone());
    msg.to_vec().map_or(Reply::Drop, Reply::Answer)
}

/// SERVFAIL for a query that could not be forwarded.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    match respond_error(&request, ResponseCode::ServFail) {
        Reply::Answer(b) => Some(b),
        _ => None,
    }
}

/// Sends the query to each upstream in turn over UDP; the first answer
/// whose ID matches is returned verbatim.
pub fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    if query.len() < 2 {
        return None;
    }
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = UdpSocket::bind(bind) else {
            continue;
        };
        if socket.set_read_timeout(Some(FORWARD_TIMEOUT)).is_err()
            || socket.connect(upstream).is_err()
        {
            continue;
        }
        if socket.send(query).is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(n) = socket.recv(&mut buf)
            && n >= 2
            && buf[..2] == query[..2]
        {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

/// The node's resolvers from a `resolv.conf`, without `skip` (the
/// responder's own address: forwarding to itself would loop).
pub fn upstreams_from(resolv_conf: &str, skip: Ipv4Addr) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != std::net::IpAddr::V4(skip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A running responder. Dropping it stops its threads and frees the port
/// before `drop` returns.
#[derive(Debug)]
pub struct DnsServer {
    zone: Arc<RwLock<Arc<Zone>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub address: SocketAddr,
}

impl DnsServer {
    /// Binds UDP and TCP on `address` and starts answering.
    pub fn start(
        address: SocketAddr,
        upstreams: Vec<SocketAddr>,
        zone: Zone,
    ) -> std::io::Result<Self> {
        let udp = UdpSocket::bind(address)?;
        let address = udp.local_addr()?;
        let tcp = TcpListener::bind(address)?;
        udp.set_read_timeout(Some(Duration::from_secs(1)))?;
        tcp.set_nonblocking(true)?;
        let zone = Arc::new(RwLock::new(Arc::new(zone)));
        let stop = Arc::new(AtomicBool::new(false));
        let upstreams = Arc::new(upstreams);
        let mut threads = Vec::new();
        {
            let (zone, stop, upstreams) = (zone.clone(), stop.clone(), upstreams.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("berth-dns-udp".into())
                    .spawn(move || serve_udp(udp, zone, upstreams, stop))?,
            );
        }
        {
            let (zone, stop, upstreams) = (zone.clone(), stop.clone(), upstreams.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("berth-dns-tcp".into())
                    .spawn(move || serve_tcp(tcp, zone, upstreams, stop))?,
            );
        }
        Ok(Self {
            zone,
            stop,
            threads,
            address,
        })
    }

    pub fn set_zone(&self, zone: Zone) {
        if let Ok(mut z) = self.zone.write() {
            *z = Arc::new(zone);
        }
    }

    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().map(|z| z.clone()).unwrap_or_default()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // An empty datagram wakes the UDP loop at once (the TCP loop polls).
        if let Ok(s) = UdpSocket::bind((self.address.ip(), 0)) {
            let _ = s.send_to(&[], self.address);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn current(zone: &RwLock<Arc<Zone>>) -> Arc<Zone> {
    zone.read().map(|z| z.clone()).unwrap_or_default()
}

fn serve_udp(
    socket: UdpSocket,
    zone: Arc<RwLock<Arc<Zone>>>,
    upstreams: Arc<Vec<SocketAddr>>,
    stop: Arc<AtomicBool>,
) {
    let Ok(socket) = socket.try_clone().map(Arc::new) else {
        return;
    };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let query = &buf[..n];
        match answer(&current(&zone), query) {
            Reply::Answer(bytes) => {
                let _ = socket.send_to(&bytes, from);
            }
            Reply::Drop => {}
            Reply::Forward => {
                if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if let Some(b) = servfail(query) {
                        let _ = socket.send_to(&b, from);
                    }
                    continue;
                }
                let (socket, upstreams, counter, query) = (
                    socket.clone(),
                    upstreams.clone(),
                    in_flight.clone(),
                    query.to_vec(),
                );
                let spawned = std::thread::Builder::new()
                    .name("berth-dns-fwd".into())
                    .spawn(move || {
                        let reply = forward(&query, &upstreams).or_else(|| servfail(&query));
                        if let Some(b) = reply {
                            let _ = socket.send_to(&b, from);
                        }
                        counter.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
}

fn serve_tcp(
    listener: TcpListener,
    zone: Arc<RwLock<Arc<Zone>>>,
    upstreams: Arc<Vec<SocketAddr>>,
    stop: Arc<AtomicBool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let (stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_TCP {
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (zone, upstreams, counter) = (zone.clone(), upstreams.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("berth-dns-conn".into())
            .spawn(move || {
                let _ = serve_connection(stream, &zone, &upstreams);
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One TCP connection: length-prefixed queries until the client is done
/// or idle for 10 s.
fn serve_connection(
    mut stream: TcpStream,
    zone: &RwLock<Arc<Zone>>,
    upstreams: &[SocketAddr],
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut query)?;
        let reply = match answer(&current(zone), &query) {
            Reply::Answer(b) => Some(b),
            Reply::Drop => None,
            Reply::Forward => forward(&query, upstreams).or_else(|| servfail(&query)),
        };
        let Some(reply) = reply else { return Ok(()) };
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_all(&n.to_be_bytes())?;
        stream.write_all(&reply)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;
    use hickory_proto::op::Query;

    fn zone() -> Zone {
        let mut services = BTreeMap::new();
        services.insert(
            ("default".to_string(), "web".to_string()),
            ServiceEntry {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
                endpoints: vec![Ipv4Addr::new(10, 88, 0, 2)],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    protocol: "tcp".into(),
                    port: 80,
                }],
            },
        );
        services.insert(
            ("db".to_string(), "pg".to_string()),
            ServiceEntry {
                namespace: "db".into(),
                name: "pg".into(),
                cluster_ip: None,
                endpoints: vec![Ipv4Addr::new(10, 88, 0, 5), Ipv4Addr::new(10, 88, 0, 6)],
                ports: vec![ServicePort {
                    name: Some("sql".into()),
                    protocol: "tcp".into(),
                    port: 5432,
                }],
            },
        );
        Zone {
            domain: "cluster.local".into(),
            services,
        }
    }

    fn ask(zone: &Zone, name: &str, t: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        match answer(zone, &q.to_vec().expect("encoded")) {
            Reply::Answer(b) => {
                let m = Message::from_vec(&b).expect("decodes");
                assert_eq!(m.metadata.id, q.metadata.id);
                m
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        addresses_in(&m.answers)
    }

    fn addresses_in(records: &[Record]) -> Vec<Ipv4Addr> {
        records
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn service_names_answer_their_cluster_ip_and_headless_names_their_pods() {
        let z = zone();
        let m = ask(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(m.answers[0].ttl, TTL);
        // Case does not matter.
        let m = ask(&z, "WEB.Default.SVC.cluster.local.", RecordType::A);
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 96, 0, 10)]);
        let m = ask(&z, "pg.db.svc.cluster.local.", RecordType::A);
        assert_eq!(
            addresses(&m),
            [Ipv4Addr::new(10, 88, 0, 5), Ipv4Addr::new(10, 88, 0, 6)]
        );
        let m = ask(&z, "10-88-0-6.pg.db.svc.cluster.local.", RecordType::A);
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 88, 0, 6)]);
        // AAAA of an existing name: no data, not NXDOMAIN.
        let m = ask(&z, "web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn srv_names_named_ports_and_unknown_names_are_nxdomain() {
        let z = zone();
        let m = ask(
            &z,
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        let RData::SRV(srv) = &m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target.to_ascii(), "web.default.svc.cluster.local.");
        assert_eq!(addresses_in(&m.additionals), [Ipv4Addr::new(10, 96, 0, 10)]);
        let m = ask(&z, "_sql._tcp.pg.db.svc.cluster.local.", RecordType::SRV);
        assert_eq!(m.answers.len(), 2, "one SRV per pod of a headless Service");
        for name in [
            "nope.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "_https._tcp.web.default.svc.cluster.local.",
            "10-88-0-9.pg.db.svc.cluster.local.",
            "a.b.c.d.e.f.cluster.local.",
        ] {
            let m = ask(&z, name, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
        let m = ask(&z, "default.svc.cluster.local.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_is_not_answered() {
        let z = zone();
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("example.org.").expect("name"),
            RecordType::A,
        ));
        assert_eq!(answer(&z, &q.to_vec().expect("encoded")), Reply::Forward);
        assert_eq!(answer(&z, b"\x01"), Reply::Drop);
        let Reply::Answer(b) = answer(&z, &[0x12, 0x34, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 9]) else {
            panic!("a header gets FORMERR")
        };
        let m = Message::from_vec(&b).expect("decodes");
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x1234, ResponseCode::FormErr)
        );
        assert_eq!(
            upstreams_from(
                "# x\nnameserver 127.0.0.53\nnameserver 10.88.0.1\noptions edns0\n",
                Ipv4Addr::new(10, 88, 0, 1)
            ),
            [SocketAddr::from(([127, 0, 0, 53], 53))]
        );
    }

    #[test]
    fn the_server_answers_over_udp_and_tcp_and_forwards_the_rest() {
        // An upstream on loopback that answers everything with 192.0.2.7.
        let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let up_addr = upstream.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buf) {
                let q = Message::from_vec(&buf[..n]).expect("query");
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.add_queries(q.queries.clone());
                r.add_answer(a_record(q.queries[0].name(), Ipv4Addr::new(192, 0, 2, 7)));
                let _ = upstream.send_to(&r.to_vec().expect("encoded"), from);
            }
        });
        let server = DnsServer::start("127.0.0.1:0".parse().expect("addr"), vec![up_addr], zone())
            .expect("started");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let udp = |name: &str| {
            let mut q = Message::query();
            q.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            client
                .send_to(&q.to_vec().expect("encoded"), server.address)
                .expect("sent");
            let mut buf = [0u8; 4096];
            let n = client.recv(&mut buf).expect("answer");
            addresses(&Message::from_vec(&buf[..n]).expect("decodes"))
        };
        assert_eq!(
            udp("web.default.svc.cluster.local."),
            [Ipv4Addr::new(10, 96, 0, 10)]
        );
        assert_eq!(udp("example.org."), [Ipv4Addr::new(192, 0, 2, 7)]);
        // A new zone is seen by the next query.
        let mut z = zone();
        z.services.clear();
        server.set_zone(z);
        assert!(udp("web.default.svc.cluster.local.").is_empty());
        server.set_zone(zone());
        // TCP, two queries on one connection.
        let mut tcp = TcpStream::connect(server.address).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for _ in 0..2 {
            let mut q = Message::query();
            q.add_query(Query::query(
                Name::from_ascii("pg.db.svc.cluster.local.").expect("name"),
                RecordType::A,
            ));
            let bytes = q.to_vec().expect("encoded");
            tcp.write_all(&(bytes.len() as u16).to_be_bytes())
                .expect("len");
            tcp.write_all(&bytes).expect("query");
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).expect("len");
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            tcp.read_exact(&mut reply).expect("reply");
            assert_eq!(
                addresses(&Message::from_vec(&reply).expect("decodes")).len(),
                2
            );
        }
    }
}
