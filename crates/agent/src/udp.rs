//! UDP through the tunnels: CONNECT-UDP (RFC 9298) on HTTP/2 extended CONNECT (RFC 8441), each
//! datagram one DATAGRAM capsule (RFC 9297) on the flow's stream, on the same pooled tunnels as
//! TCP.
//!
//! A gateway's rules hand routed UDP from its local networks to a remote site (TPROXY, marked,
//! `capture/nft.rs`; `capture/route.rs` delivers the mark locally) to the sockets `bind_routed`
//! makes; a host with `[[remote]]` hands them its own UDP to those networks the same way (marked
//! on its way out, it comes round through lo), and its flows prove its own identity.
//! `serve_routed` keeps one flow per (source, original destination): a stream to that site's
//! gateways, and a transparent socket bound to the original destination and connected to the
//! source, which both sends the answers (so they come from the address the host asked) and
//! catches the flow's next datagrams. On the far side `serve_stream` admits the stream by the one
//! gateway rule (`gateway::decide`) and relays to a UDP socket connected to the destination.
//!
//! Bounds: a flow queues at most `QUEUE` datagrams towards the tunnel and drops the rest
//! (`tapproof_udp_dropped_datagrams_total{reason="queue_full"}`): a flooding source loses its own
//! datagrams and never holds back a TCP stream, whose windows are its own. One source may hold
//! `FLOWS_PER_SOURCE` flows, a gateway `FLOWS` in all. A flow ends after `udp_idle_timeout`
//! without a datagram either way.

use crate::copy::Carried;
use crate::metrics::{Side, GATEWAY_SERVICE};
use crate::pool::Pool;
use crate::sites::{Direction, Protocol};
use crate::state::{AgentState, TunnelStats};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tapproof_identity::SpiffeId;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The `:protocol` of a CONNECT-UDP request.
pub const PROTOCOL: &str = "connect-udp";
/// Datagrams a flow holds for the tunnel before it drops new ones.
pub const QUEUE: usize = 256;
/// Flows one source address may hold open through a gateway.
pub const FLOWS_PER_SOURCE: usize = 256;
/// Flows a gateway holds open in all.
pub const FLOWS: usize = 16_384;
/// The largest UDP payload (IPv4: 65535 - 20 - 8).
const MAX_PAYLOAD: usize = 65_507;
/// The receive buffer of the routed-UDP sockets.
const ROUTED_RCVBUF: usize = 8 << 20;
/// RFC 9297 capsule type of a datagram.
const DATAGRAM: u64 = 0;

// ---- capsules (RFC 9297) and the request path (RFC 9298) ----

fn put_varint(out: &mut BytesMut, v: u64) {
    match v {
        0..=63 => out.put_u8(v as u8),
        64..=16_383 => out.put_u16(0x4000 | v as u16),
        16_384..=1_073_741_823 => out.put_u32(0x8000_0000 | v as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// A QUIC variable-length integer from the front of `buf`, or `None` when it is not all there.
fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// One UDP payload as a DATAGRAM capsule with context ID 0.
pub fn capsule(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_varint(&mut out, DATAGRAM);
    put_varint(&mut out, payload.len() as u64 + 1);
    put_varint(&mut out, 0);
    out.extend_from_slice(payload);
    out.freeze()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapsuleError {
    #[error("a capsule of {0} bytes: more than a UDP datagram can hold")]
    TooLong(u64),
}

/// Reassembles capsules from a stream's DATA frames, however they were split.
#[derive(Default)]
pub struct Capsules {
    buf: BytesMut,
}

impl Capsules {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next datagram's payload; `Ok(None)` when no whole capsule is buffered. Capsules of
    /// other types and datagrams of other contexts are skipped, as RFC 9297 and 9298 say.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, CapsuleError> {
        loop {
            let Some((kind, a)) = get_varint(&self.buf) else {
                return Ok(None);
            };
            let Some((len, b)) = get_varint(&self.buf[a..]) else {
                return Ok(None);
            };
            if len > MAX_PAYLOAD as u64 + 8 {
                return Err(CapsuleError::TooLong(len));
            }
            let len = len as usize;
            if self.buf.len() < a + b + len {
                return Ok(None);
            }
            self.buf.advance(a + b);
            let mut value = self.buf.split_to(len).freeze();
            if kind != DATAGRAM {
                continue;
            }
            let Some((context, c)) = get_varint(&value) else {
                continue;
            };
            if context != 0 {
                continue;
            }
            value.advance(c);
            return Ok(Some(value));
        }
    }
}

/// The request path for `target`: RFC 9298's default template, an IPv6 address with its colons
/// percent-encoded.
pub fn path_for(target: SocketAddr) -> String {
    let host = match target.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => ip.to_string().replace(':', "%3A"),
    };
    format!("/.well-known/masque/udp/{host}/{}/", target.port())
}

/// The target a request path names; only addresses (a gateway carries to addresses, never
/// resolves names for a peer).
pub fn target_of(path: &str) -> Result<SocketAddr, &'static str> {
    let rest = path
        .strip_prefix("/.well-known/masque/udp/")
        .ok_or("not the CONNECT-UDP path /.well-known/masque/udp/{host}/{port}/")?;
    let mut parts = rest.trim_end_matches('/').split('/');
    let (Some(host), Some(port), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err("the path must be /.well-known/masque/udp/{host}/{port}/");
    };
    let host = host.replace("%3A", ":").replace("%3a", ":");
    let ip: IpAddr = host.parse().map_err(|_| "the target host is not an IP address")?;
    let port: u16 = port.parse().map_err(|_| "the target port is not a number")?;
    if port == 0 {
        return Err("the target port is 0");
    }
    Ok(SocketAddr::new(ip, port))
}

// ---- the relay between a stream and a UDP socket ----

/// Why a flow ended, for the debug log.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("idle")]
    Idle,
    #[error("the local socket closed")]
    LocalGone,
    #[error("the peer ended the stream")]
    PeerEnded,
    #[error("stream error: {0}")]
    Stream(h2::Error),
    #[error("bad capsule from the peer: {0}")]
    Capsule(CapsuleError),
}

/// How long a flow lives without a datagram: `gateway.udp_idle_timeout`.
fn idle_timeout(config: &crate::config::AgentConfig) -> Duration {
    config
        .gateway
        .as_ref()
        .map_or(crate::config::DEFAULT_UDP_IDLE_TIMEOUT, |g| g.udp_idle_timeout)
}

/// Waits until the stream may send `len` bytes, then sends them.
async fn send_capsule(send: &mut SendStream<Bytes>, capsule: Bytes) -> Result<(), h2::Error> {
    let len = capsule.len();
    send.reserve_capacity(len);
    while send.capacity() < len {
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        }
    }
    send.send_data(capsule, false)
}

/// Carries datagrams both ways until the flow is idle for `idle` or either end goes:
/// `outgoing` into the tunnel, the tunnel's datagrams to `socket` (dropped, and counted, when
/// the socket cannot take them at once).
#[allow(clippy::too_many_arguments)]
async fn relay(
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    mut outgoing: mpsc::Receiver<Bytes>,
    socket: &UdpSocket,
    idle: Duration,
    side: Side,
    state: &AgentState,
    carried: &Carried,
) -> End {
    let metrics = &state.metrics;
    let mut capsules = Capsules::default();
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::select! {
            d = outgoing.recv() => {
                let Some(d) = d else { return End::LocalGone };
                deadline = Instant::now() + idle;
                if let Err(e) = send_capsule(&mut send, capsule(&d)).await {
                    return End::Stream(e);
                }
                carried.up.fetch_add(d.len() as u64, Ordering::Relaxed);
                metrics.udp_datagram(side, crate::metrics::Flow::AppToTunnel);
            }
            chunk = recv.data() => {
                let chunk = match chunk {
                    None => return End::PeerEnded,
                    Some(Err(e)) => return End::Stream(e),
                    Some(Ok(c)) => c,
                };
                let _ = recv.flow_control().release_capacity(chunk.len());
                capsules.push(&chunk);
                loop {
                    match capsules.next_datagram() {
                        Ok(Some(d)) => {
                            deadline = Instant::now() + idle;
                            match socket.try_send(&d) {
                                Ok(_) => {
                                    carried.down.fetch_add(d.len() as u64, Ordering::Relaxed);
                                    metrics.udp_datagram(side, crate::metrics::Flow::TunnelToApp);
                                }
                                Err(_) => metrics.udp_dropped(side, "send_failed"),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            send.send_reset(h2::Reason::PROTOCOL_ERROR);
                            return End::Capsule(e);
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let _ = send.send_data(Bytes::new(), true);
                return End::Idle;
            }
        }
    }
}

/// Reads `socket` into `queue` until it fails or the flow's relay ends; a full queue drops.
async fn feed(socket: &UdpSocket, queue: &mpsc::Sender<Bytes>, side: Side, state: &AgentState) {
    let mut buf = vec![0u8; MAX_PAYLOAD + 1];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP unreachable from the destination: the flow goes on (it may answer later).
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        match queue.try_send(Bytes::copy_from_slice(&buf[..n])) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => state.metrics.udp_dropped(side, "queue_full"),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

// ---- the far side: a stream from a remote site's gateway ----

/// Serves one CONNECT-UDP stream: admitted by `gateway::admission` (the rule TCP streams pass),
/// then relayed to a UDP socket connected to the target.
pub(crate) async fn serve_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_id: SpiffeId,
    state: Arc<AgentState>,
    tunnel: Arc<TunnelStats>,
) {
    let metrics = &state.metrics;
    let refuse = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("static response");
        let _ = respond.send_response(response, true);
    };
    let target = match target_of(request.uri().path()) {
        Ok(t) => t,
        Err(why) => {
            metrics.udp_flow(Side::Inbound, "bad_request");
            warn!(peer_id = %peer_id, path = request.uri().path(), why, "UDP stream refused");
            return refuse(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let applied = state.applied();
    let flow = crate::gateway::Flow {
        destination: target,
        named_source: crate::gateway::named_source(&request),
        tunnel_peer: tapproof_audit::canonical(tunnel.peer_addr).ip(),
    };
    let Ok(site) = crate::gateway::decide(&state, &applied, &peer_id, flow, Protocol::Udp) else {
        metrics.udp_flow(Side::Inbound, "denied");
        return refuse(&mut respond, StatusCode::FORBIDDEN);
    };
    let (_place, connecting) = match state.limits.stream(&peer_id.to_string(), GATEWAY_SERVICE) {
        Ok(places) => places,
        Err(limit) => {
            metrics.limit_refused(limit);
            metrics.udp_flow(Side::Inbound, "limit");
            return refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    drop(connecting);
    let socket = match connected(target, state.capture_mark()).await {
        Ok(s) => s,
        Err(e) => {
            metrics.udp_flow(Side::Inbound, "unreachable");
            warn!(peer_id = %peer_id, %target, error = %e, "UDP stream refused: cannot open a socket to the target");
            return refuse(&mut respond, StatusCode::BAD_GATEWAY);
        }
    };
    let ok = Response::builder()
        .status(StatusCode::OK)
        .header("capsule-protocol", "?1")
        .body(())
        .expect("static response");
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(peer_id = %peer_id, error = %e, "UDP stream ended before it was answered");
            return;
        }
    };
    metrics.udp_flow(Side::Inbound, "opened");
    state.sites.opened(metrics, site, Direction::From, Protocol::Udp);
    let _open = metrics.udp_flow_open(Side::Inbound);
    let carried = Carried::default();
    let (queue, outgoing) = mpsc::channel(QUEUE);
    let idle = idle_timeout(&applied);
    let end = tokio::select! {
        end = relay(send, request.into_body(), outgoing, &socket, idle, Side::Inbound, &state, &carried) => end,
        () = feed(&socket, &queue, Side::Inbound, &state) => End::LocalGone,
    };
    let (sent, received) = carried.totals();
    state.sites.ended(metrics, site, Direction::From, sent, received);
    debug!(peer_id = %peer_id, %target, end = %end, "UDP flow ended");
}

/// A UDP socket connected to `target`, with the agent's mark (so capture rules pass it by).
async fn connected(target: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(target);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket.bind(&any.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(target).await?;
    Ok(socket)
}

// ---- the near side: routed UDP handed over by the rules ----

/// The sockets routed UDP is handed to (TPROXY): one per address family, transparent, with the
/// original destination of each datagram.
pub fn bind_routed(port: u16, ipv6: bool) -> io::Result<Vec<UdpSocket>> {
    let mut out = Vec::new();
    let mut addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
    if ipv6 {
        addrs.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    }
    for addr in addrs {
        let socket = transparent(addr)?;
        let fd = std::os::fd::AsFd::as_fd(&socket);
        if addr.is_ipv4() {
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)?;
        } else {
            socket.set_only_v6(true)?;
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Ipv6OrigDstAddr, &true)?;
        }
        // A burst of new flows arrives faster than flows are set up: room for some thousands of
        // datagrams.
        let _ = crate::socket::force_receive_buffer(&(&socket).into(), ROUTED_RCVBUF);
        socket.bind(&addr.into())?;
        out.push(UdpSocket::from_std(socket.into())?);
    }
    Ok(out)
}

/// A non-blocking UDP socket that may bind an address of another host (IP_TRANSPARENT, which
/// needs CAP_NET_ADMIN) and shares its address with the flows' sockets.
fn transparent(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// One datagram, its source and the destination it was sent to.
fn receive(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    use nix::sys::socket::{
        recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage,
    };
    use std::os::fd::AsRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
        .map_err(io::Error::from)?;
    let source = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::V4(SocketAddrV4::from(*s)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::V6(SocketAddrV6::from(*s)))
                })
        })
        .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
    let mut original = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                original = Some(SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(sin))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                original = Some(SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(sin6))));
            }
            _ => {}
        }
    }
    let original = original.ok_or_else(|| io::Error::other("a datagram without its original destination"))?;
    Ok((
        msg.bytes,
        tapproof_audit::canonical(source),
        tapproof_audit::canonical(original),
    ))
}

/// A flow's way in: its queue, and which flow it is (so an ended flow removes only itself).
struct Entry {
    id: u64,
    queue: mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Flows {
    by_key: HashMap<(SocketAddr, SocketAddr), Entry>,
    per_source: HashMap<IpAddr, usize>,
    next_id: u64,
}

/// Which pool carries datagrams to a destination: a remote site's, or none.
pub type SiteOf = Arc<dyn Fn(SocketAddr) -> Option<Arc<Pool>> + Send + Sync>;

/// Serves the routed-UDP sockets until `shutdown`.
pub async fn serve_routed(
    sockets: Vec<UdpSocket>,
    site_of: SiteOf,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) {
    let flows = Arc::new(Mutex::new(Flows::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for socket in sockets {
        let (flows, site_of, state, shutdown) =
            (flows.clone(), site_of.clone(), state.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut buf = vec![0u8; MAX_PAYLOAD + 1];
            loop {
                let got = tokio::select! {
                    () = shutdown.cancelled() => return,
                    got = socket.async_io(Interest::READABLE, || receive(&socket, &mut buf)) => got,
                };
                let (n, source, destination) = match got {
                    Ok(got) => got,
                    Err(e) => {
                        debug!(error = %e, "routed UDP: unreadable datagram");
                        continue;
                    }
                };
                dispatch(
                    &flows,
                    &site_of,
                    &state,
                    source,
                    destination,
                    Bytes::copy_from_slice(&buf[..n]),
                );
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Puts one routed datagram on its flow, opening the flow when it is the first.
fn dispatch(
    flows: &Arc<Mutex<Flows>>,
    site_of: &SiteOf,
    state: &Arc<AgentState>,
    source: SocketAddr,
    destination: SocketAddr,
    datagram: Bytes,
) {
    let metrics = &state.metrics;
    let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
    let key = (source, destination);
    let datagram = match table.by_key.get(&key) {
        Some(entry) => match entry.queue.try_send(datagram) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                return metrics.udp_dropped(Side::Outbound, "queue_full")
            }
            // The flow just ended: this datagram opens the next one.
            Err(mpsc::error::TrySendError::Closed(d)) => d,
        },
        None => datagram,
    };
    if let Some(entry) = table.by_key.remove(&key) {
        drop(entry);
        release(&mut table, source.ip());
    }
    let Some(pool) = site_of(destination) else {
        metrics.udp_flow(Side::Outbound, "no_route");
        return metrics.udp_dropped(Side::Outbound, "no_route");
    };
    let from_source = table.per_source.get(&source.ip()).copied().unwrap_or(0);
    if from_source >= FLOWS_PER_SOURCE || table.by_key.len() >= FLOWS {
        metrics.udp_flow(Side::Outbound, "limit");
        metrics.udp_dropped(Side::Outbound, "flow_limit");
        if let Some(more) = state.refused_log.tick() {
            warn!(%source, flows = from_source, suppressed = more, "routed UDP: flow limit reached, datagrams of new flows dropped (one line per 10 s)");
        }
        return;
    }
    let (queue, outgoing) = mpsc::channel(QUEUE);
    let _ = queue.try_send(datagram);
    table.next_id += 1;
    let id = table.next_id;
    table.by_key.insert(
        key,
        Entry {
            id,
            queue: queue.clone(),
        },
    );
    *table.per_source.entry(source.ip()).or_default() += 1;
    drop(table);
    let (flows, state) = (flows.clone(), state.clone());
    tokio::spawn(async move {
        flow(pool, source, destination, queue, outgoing, &state).await;
        let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
        if table.by_key.get(&key).is_some_and(|e| e.id == id) {
            table.by_key.remove(&key);
            release(&mut table, source.ip());
        }
    });
}

fn release(table: &mut Flows, source: IpAddr) {
    if let Some(n) = table.per_source.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            table.per_source.remove(&source);
        }
    }
}

/// One routed flow: its answer socket, its stream to the remote site, the relay between them.
async fn flow(
    pool: Arc<Pool>,
    source: SocketAddr,
    destination: SocketAddr,
    queue: mpsc::Sender<Bytes>,
    outgoing: mpsc::Receiver<Bytes>,
    state: &Arc<AgentState>,
) {
    let metrics = &state.metrics;
    let outbound = pool.outbound();
    let site = outbound.site.as_deref().unwrap_or_default();
    // Bound to the destination the host sent to and connected to the host: its answers come
    // from that address, and the flow's next datagrams arrive here.
    let answer = match transparent(destination).and_then(|s| {
        s.bind(&destination.into())?;
        s.connect(&source.into())?;
        UdpSocket::from_std(s.into())
    }) {
        Ok(s) => s,
        Err(e) => {
            metrics.udp_flow(Side::Outbound, "failed");
            warn!(%source, %destination, error = %e, "routed UDP: cannot open the flow's answer socket");
            return;
        }
    };
    let wait = state.config.tunnel.connect_timeout + state.config.tunnel.handshake_timeout;
    let opened = match timeout(wait, open(&pool, source, destination)).await {
        Ok(r) => r,
        Err(_) => Err("no stream in time".to_owned()),
    };
    let (send, response) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            metrics.udp_flow(Side::Outbound, "no_tunnel");
            state.sites.refused(metrics, site, Direction::To);
            warn!(%source, %destination, error = %e, "routed UDP: no stream to the remote site; the flow's datagrams are dropped");
            return;
        }
    };
    let recv = match timeout(wait, response).await {
        Ok(Ok(r)) if r.status() == StatusCode::OK => r.into_body(),
        Ok(Ok(r)) => {
            metrics.udp_flow(Side::Outbound, "refused_by_peer");
            state.sites.refused(metrics, site, Direction::To);
            warn!(%source, %destination, status = %r.status(), "routed UDP: the remote gateway refused the flow");
            return;
        }
        Ok(Err(e)) => {
            metrics.udp_flow(Side::Outbound, "failed");
            warn!(%source, %destination, error = %e, "routed UDP: the flow's stream failed before an answer");
            return;
        }
        Err(_) => {
            metrics.udp_flow(Side::Outbound, "failed");
            warn!(%source, %destination, "routed UDP: the remote gateway did not answer the flow in time");
            return;
        }
    };
    metrics.udp_flow(Side::Outbound, "opened");
    state.sites.opened(metrics, site, Direction::To, Protocol::Udp);
    let _open = metrics.udp_flow_open(Side::Outbound);
    let carried = Carried::default();
    let idle = idle_timeout(&state.applied());
    let end = tokio::select! {
        end = relay(send, recv, outgoing, &answer, idle, Side::Outbound, state, &carried) => end,
        () = feed(&answer, &queue, Side::Outbound, state) => End::LocalGone,
    };
    let (sent, received) = carried.totals();
    state.sites.ended(metrics, site, Direction::To, sent, received);
    debug!(%source, %destination, end = %end, "routed UDP flow ended");
}

/// Opens a CONNECT-UDP stream to `destination` on the pool's tunnel (a second tunnel when the
/// first turns out gone).
async fn open(
    pool: &Pool,
    source: SocketAddr,
    destination: SocketAddr,
) -> Result<(SendStream<Bytes>, h2::client::ResponseFuture), String> {
    let mut last = String::new();
    for _ in 0..2 {
        let tunnel = pool.tunnel().await.map_err(|e| e.to_string())?;
        let mut sender = match tunnel.sender.clone().ready().await {
            Ok(s) => s,
            Err(e) => {
                tunnel.mark_dead();
                last = e.to_string();
                continue;
            }
        };
        // On a tunnel just made, the peer's SETTINGS (which offer extended CONNECT) may not
        // have been read yet.
        if !sender.is_extended_connect_protocol_enabled() {
            tunnel.settled().await;
        }
        if !sender.is_extended_connect_protocol_enabled() {
            return Err(
                "the remote gateway does not offer extended CONNECT (a tapproof without UDP support)".into(),
            );
        }
        let mut request = Request::builder()
            .method(http::Method::CONNECT)
            .uri(format!(
                "https://{}{}",
                tunnel.stats.peer_addr,
                path_for(destination)
            ))
            .header("capsule-protocol", "?1")
            .header(crate::gateway::SOURCE_HEADER, source.to_string())
            .body(())
            .map_err(|e| e.to_string())?;
        request
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static(PROTOCOL));
        match sender.send_request(request, false) {
            Ok((response, send)) => return Ok((send, response)),
            Err(e) => {
                tunnel.mark_dead();
                last = e.to_string();
            }
        }
    }
    Err(format!("tunnel unusable twice (last: {last})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsules_round_trip_however_the_bytes_are_split() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![],
            b"dns query".to_vec(),
            vec![7u8; 1200],
            vec![9u8; MAX_PAYLOAD],
        ];
        let mut wire = Vec::new();
        for p in &payloads {
            wire.extend_from_slice(&capsule(p));
        }
        // An unknown capsule type and a datagram of another context are skipped.
        wire.extend_from_slice(&[0x21, 2, 0xab, 0xcd]);
        wire.extend_from_slice(&[0x00, 3, 0x05, b'x', b'y']);
        wire.extend_from_slice(&capsule(b"last"));
        for split in [1usize, 3, 1000, wire.len()] {
            let mut c = Capsules::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(split) {
                c.push(chunk);
                while let Some(d) = c.next_datagram().unwrap() {
                    got.push(d.to_vec());
                }
            }
            let mut want = payloads.clone();
            want.push(b"last".to_vec());
            assert_eq!(got, want, "split every {split} bytes");
        }
    }

    #[test]
    fn an_oversized_capsule_is_an_error_before_it_is_buffered() {
        let mut c = Capsules::default();
        c.push(&[0x00, 0x80, 0x10, 0x00, 0x00]); // length 1 MiB
        assert_eq!(c.next_datagram(), Err(CapsuleError::TooLong(1 << 20)));
    }

    #[test]
    fn paths_name_an_address_and_a_port() {
        for t in ["10.2.0.5:53", "[fd72::2]:5353"] {
            let t: SocketAddr = t.parse().unwrap();
            assert_eq!(target_of(&path_for(t)), Ok(t));
        }
        assert_eq!(
            path_for("[fd72::2]:53".parse().unwrap()),
            "/.well-known/masque/udp/fd72%3A%3A2/53/"
        );
        assert!(target_of("/.well-known/masque/udp/db.example/53/").is_err());
        assert!(target_of("/.well-known/masque/udp/10.0.0.1/0/").is_err());
        assert!(target_of("/.well-known/masque/udp/10.0.0.1/53/extra/").is_err());
        assert!(target_of("/other/10.0.0.1/53/").is_err());
    }
}
