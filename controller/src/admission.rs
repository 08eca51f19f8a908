//! What a peer that has not proved anything may hold: the accept loop of
//! the two TLS ports (agents' gRPC and the agent download).
//!
//! # Guarantees
//! - A TCP connection gets a place in the handshake queue before anything
//!   else: at most twice [`Limits::handshakes`] connections waiting or
//!   handshaking at once, at most [`Limits::per_ip_handshakes`] from one
//!   address; then it waits (first come, first served, at most
//!   [`HANDSHAKE_QUEUE_WAIT`]) for one of the [`Limits::handshakes`]
//!   handshake places (never more than a sixteenth of the open-file limit).
//!   A flood of peers that handshake and retry cannot starve an agent: it
//!   takes its turn. The handshake must finish within
//!   [`Limits::handshake`]; then both are given back.
//! - Connections from a node's address (the port's [`Known`] says which:
//!   the address a node that said hello holds, attested on EC2; and this
//!   machine's own) queue and handshake in a lane of their own, as large
//!   again, at most [`Limits::per_node`] at once per address: peers from
//!   any number of other hosts can fill theirs, never the nodes'. A node
//!   reconnecting after a controller restart or a network blip handshakes
//!   whatever they do.
//! - A connection whose client certificate is that of a live node (the
//!   port's [`Prover`] says which: the one issued to it, the node neither
//!   terminating nor revoked) is *proven*: it holds none of the tickets of
//!   unproven peers, so a flood of them never keeps an agent out, and lives
//!   as long as the agent; at most [`Limits::per_node`] at once per node.
//! - Every other connection, with no certificate or with another one of
//!   the cluster CA (a user's Dask credential, a terminated node's), is
//!   *unproven*: it takes an unproven ticket (at most
//!   [`Limits::unauthenticated`] at once, never more than a quarter of the
//!   open-file limit, at most [`Limits::per_ip`] from one address) and
//!   lives at most [`Limits::unauthenticated_lifetime`] from its accept (an
//!   enrollment or a download needs one exchange), then reads and writes
//!   fail and it is closed.
//! - Peers from `127.0.0.1` are processes of this machine (the local
//!   provider's nodes, the benchmark) and count against the totals only.
//!   No one address holds more than a quarter of the unproven places or
//!   of the handshake queue. Over a limit
//!   the connection is closed at once and counted
//!   (`ddisco_connections_refused_total`).
//! - Refusals are logged at most [`LOG_BURST`] times per [`LOG_WINDOW`];
//!   the rest are counted and summed up in the next line.

use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;

/// Bounds for peers, proven or not.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unproven connections at once, in all and per address.
    pub unauthenticated: usize,
    pub per_ip: u32,
    /// TLS handshakes under way at once (twice as many may wait), in all
    /// and (waiting or under way) per address.
    pub handshakes: usize,
    pub per_ip_handshakes: u32,
    pub handshake: Duration,
    pub unauthenticated_lifetime: Duration,
    /// Connections at once of one proven node (a reconnect may overlap the
    /// connection it replaces).
    pub per_node: u32,
}

impl Limits {
    /// These limits on a process that may hold `fd_limit` open files:
    /// unproven connections take at most a quarter of them, handshakes a
    /// sixteenth (and as many again waiting for one).
    pub fn within(self, fd_limit: u64) -> Limits {
        let part = |n: u64, min: usize| usize::try_from(fd_limit / n).unwrap_or(usize::MAX).max(min);
        let unauthenticated = self.unauthenticated.min(part(4, 16));
        let handshakes = self.handshakes.min(part(16, 8));
        // One address never holds more than a quarter of either.
        let quarter = |n: usize| u32::try_from(n / 4).unwrap_or(u32::MAX).max(1);
        Limits {
            unauthenticated,
            handshakes,
            per_ip: self.per_ip.min(quarter(unauthenticated)),
            per_ip_handshakes: self.per_ip_handshakes.min(quarter(handshakes * 2)),
            ..self
        }
    }

    /// The agents' port: enrollments are one short exchange each.
    pub const GRPC: Limits = Limits {
        unauthenticated: 2048,
        per_ip: 512,
        handshakes: 512,
        per_ip_handshakes: 128,
        handshake: Duration::from_secs(10),
        unauthenticated_lifetime: Duration::from_secs(30),
        per_node: 4,
    };
    /// The download port: a few MiB per node, possibly over a slow link.
    pub const DOWNLOAD: Limits = Limits {
        unauthenticated: 1024,
        per_ip: 256,
        handshakes: 256,
        per_ip_handshakes: 64,
        handshake: Duration::from_secs(10),
        unauthenticated_lifetime: Duration::from_secs(300),
        per_node: 0,
    };
}

/// This machine's own default source address (`127.0.0.1`, `::1`): the
/// local provider's agents and the benchmark connect from it, counted
/// against the totals only. Other loopback addresses count per address
/// like any host's (tests stand in for other hosts with them).
fn own_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == std::net::Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(std::net::Ipv4Addr::LOCALHOST)
        }
    }
}

/// Longest a connection waits for a handshake place.
pub const HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Says which live node a client certificate (DER) speaks for, if any.
pub type Prover = Arc<dyn Fn(&[u8]) -> Option<String> + Send + Sync>;

/// Says whether an address is a node's (its handshakes take the nodes'
/// lane).
pub type Known = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// The handshake lane of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// From a node's address.
    Nodes,
    Others,
}

/// One lane's handshake places and queue.
struct HandshakeLane {
    handshaking: Arc<Semaphore>,
    /// Connections waiting for a handshake place or handshaking.
    queued: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl HandshakeLane {
    fn new(places: usize) -> HandshakeLane {
        HandshakeLane {
            handshaking: Arc::new(Semaphore::new(places)),
            queued: Arc::new(Semaphore::new(places * 2)),
            per_ip: Arc::default(),
        }
    }
}

/// Counts connections: handshakes, unproven ones, proven ones per node.
pub struct Gate {
    name: &'static str,
    limits: Limits,
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    others: HandshakeLane,
    nodes: HandshakeLane,
    per_node: Arc<Mutex<HashMap<String, u32>>>,
    prover: Option<Prover>,
    known: Option<Known>,
    metrics: Arc<Metrics>,
    log: RateLimitedLog,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("name", &self.name).field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// One count in a map of counts, given back when dropped.
#[derive(Debug)]
struct Count<K: Eq + Hash + Clone> {
    key: K,
    map: Arc<Mutex<HashMap<K, u32>>>,
}

impl<K: Eq + Hash + Clone> Count<K> {
    /// One more for `key`, unless it has `max` already.
    fn take(map: &Arc<Mutex<HashMap<K, u32>>>, key: K, max: u32) -> Option<Count<K>> {
        let mut m = map.lock();
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                m.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Count { key, map: map.clone() })
    }
}

impl<K: Eq + Hash + Clone> Drop for Count<K> {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Held while a connection counts against a limit.
#[derive(Debug)]
pub struct Ticket {
    _permit: Option<OwnedSemaphorePermit>,
    /// Counted per address (not for loopback peers).
    _ip: Option<Count<IpAddr>>,
    /// Counted per proven node.
    _node: Option<Count<String>>,
}

impl Gate {
    pub fn new(name: &'static str, limits: Limits, metrics: Arc<Metrics>) -> Gate {
        Gate {
            name,
            limits,
            total: Arc::new(Semaphore::new(limits.unauthenticated)),
            per_ip: Arc::default(),
            others: HandshakeLane::new(limits.handshakes),
            nodes: HandshakeLane::new(limits.handshakes),
            per_node: Arc::default(),
            prover: None,
            known: None,
            metrics,
            log: RateLimitedLog::default(),
        }
    }

    /// Connections whose certificate `prover` accepts are proven.
    pub fn with_prover(mut self, prover: Prover) -> Gate {
        self.prover = Some(prover);
        self
    }

    /// Connections from the addresses `known` names take the nodes' lane.
    pub fn with_known(mut self, known: Known) -> Gate {
        self.known = Some(known);
        self
    }

    /// The lane of a connection from `ip`: the nodes' for a node's address
    /// and this machine's own.
    pub fn lane(&self, ip: IpAddr) -> Lane {
        match &self.known {
            Some(known) if own_address(ip) || known(ip) => Lane::Nodes,
            _ => Lane::Others,
        }
    }

    fn counted(
        sem: &Arc<Semaphore>,
        map: &Arc<Mutex<HashMap<IpAddr, u32>>>,
        ip: IpAddr,
        max: u32,
        why: (&'static str, &'static str),
    ) -> Result<Ticket, &'static str> {
        let permit = sem.clone().try_acquire_owned().map_err(|_| why.0)?;
        let ip = if own_address(ip) { None } else { Some(Count::take(map, ip, max).ok_or(why.1)?) };
        Ok(Ticket { _permit: Some(permit), _ip: ip, _node: None })
    }

    /// An unproven ticket for a connection from `ip`, if the limits allow.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, &'static str> {
        Self::counted(
            &self.total,
            &self.per_ip,
            ip,
            self.limits.per_ip,
            (
                "too many connections without a node's certificate",
                "too many connections without a node's certificate from this address",
            ),
        )
    }

    /// A place in the handshake queue of `lane` for a new connection from
    /// `ip`.
    pub fn admit_handshake(&self, ip: IpAddr, lane: Lane) -> Result<Ticket, &'static str> {
        match lane {
            Lane::Others => Self::counted(
                &self.others.queued,
                &self.others.per_ip,
                ip,
                self.limits.per_ip_handshakes,
                (
                    "too many connections waiting for a TLS handshake",
                    "too many connections waiting for a TLS handshake from this address",
                ),
            ),
            Lane::Nodes => Self::counted(
                &self.nodes.queued,
                &self.nodes.per_ip,
                ip,
                self.limits.per_node.max(1),
                (
                    "too many connections from nodes' addresses waiting for a TLS handshake",
                    "too many connections from this node's address waiting for a TLS handshake",
                ),
            ),
        }
    }

    /// A handshake place of `lane`, in turn, if one comes within the
    /// queue's wait.
    pub async fn handshake_place(&self, lane: Lane) -> Option<OwnedSemaphorePermit> {
        let sem = match lane {
            Lane::Nodes => &self.nodes.handshaking,
            Lane::Others => &self.others.handshaking,
        };
        tokio::time::timeout(HANDSHAKE_QUEUE_WAIT, sem.clone().acquire_owned()).await.ok()?.ok()
    }

    /// A ticket for a connection of the proven node `node`.
    pub fn admit_proven(&self, node: String) -> Result<Ticket, &'static str> {
        let n = Count::take(&self.per_node, node, self.limits.per_node)
            .ok_or("too many connections with one node's certificate")?;
        Ok(Ticket { _permit: None, _ip: None, _node: Some(n) })
    }

    /// The live node a client certificate speaks for, if any.
    pub fn prove(&self, certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<String> {
        let cert = certs?.first()?;
        (self.prover.as_ref()?)(cert.as_ref())
    }

    /// Unproven connections now open.
    pub fn open(&self) -> usize {
        self.limits.unauthenticated - self.total.available_permits()
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        Metrics::inc(&self.metrics.connections_refused);
        self.log.warn(|| format!("{}: connection from {peer} closed: {why}", self.name));
    }
}

/// A TLS connection that passed the gate.
pub struct Guarded {
    /// Boxed: the connection task's future holds this in several of its
    /// states, and rustls' connection state is large (measured: 3 KiB more
    /// per held agent unboxed).
    inner: Box<TlsStream<TcpStream>>,
    /// Proven: counted for its node; unproven: an unproven ticket.
    _ticket: Ticket,
    /// Unproven connections have a deadline.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn lifetime_over() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "connection without a certificate lived too long")
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// tonic reads the peer's address and certificates from here
/// (`Request::remote_addr`, `Request::peer_certs`).
impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts on `listener` through `gate`, handshakes with `tls`, and yields
/// the connections that passed, until the listener fails or the receiver
/// is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
) -> mpsc::Receiver<std::io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    gate.log.warn(|| format!("{}: accept failed: {e}", gate.name));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let lane = gate.lane(peer.ip());
            let handshake = match gate.admit_handshake(peer.ip(), lane) {
                Ok(t) => t,
                Err(why) => {
                    gate.refused(peer, why);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, gate, tx) = (acceptor.clone(), gate.clone(), tx.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let Some(place) = gate.handshake_place(lane).await else {
                    return gate.refused(peer, "no TLS handshake place came free in time");
                };
                let tls = match tokio::time::timeout(gate.limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "{}: TLS handshake failed: {e}", gate.name);
                        return;
                    }
                    Err(_) => {
                        gate.refused(peer, "TLS handshake not finished in time");
                        return;
                    }
                };
                drop((place, handshake));
                let proven = gate.prove(tls.get_ref().1.peer_certificates());
                let (ticket, deadline) = match proven {
                    Some(node) => match gate.admit_proven(node) {
                        Ok(t) => (t, None),
                        Err(why) => return gate.refused(peer, why),
                    },
                    None => match gate.admit(peer.ip()) {
                        Ok(t) => {
                            let left = gate.limits.unauthenticated_lifetime.saturating_sub(started.elapsed());
                            (t, Some(Box::pin(tokio::time::sleep(left))))
                        }
                        Err(why) => return gate.refused(peer, why),
                    },
                };
                let g = Guarded { inner: Box::new(tls), _ticket: ticket, deadline };
                let _ = tx.send(Ok(g)).await;
            });
        }
    });
    rx
}

/// How many refusal lines may be logged per window.
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// A warning that an unauthenticated peer can cause, logged at most
/// [`LOG_BURST`] times per [`LOG_WINDOW`]; the number left out is told in
/// the next line logged.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    state: Mutex<LogWindow>,
}

#[derive(Debug, Default)]
struct LogWindow {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Logs `line()` (built only when logged) unless over budget.
    pub fn warn(&self, line: impl FnOnce() -> String) {
        if let Some(left_out) = self.admit(Instant::now()) {
            let line = line();
            if left_out > 0 {
                tracing::warn!("{line} ({left_out} similar lines left out)");
            } else {
                tracing::warn!("{line}");
            }
        }
    }

    /// `Some(lines left out before)` when a line may be logged at `now`.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock();
        if w.start.is_none_or(|s| now.duration_since(s) >= LOG_WINDOW) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= LOG_BURST {
            w.suppressed += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_bounded_in_all_and_per_address_and_come_back() {
        let limits = Limits { unauthenticated: 3, per_ip: 2, ..Limits::GRPC };
        let g = Gate::new("test", limits, Arc::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = g.admit(a).unwrap();
        let _t2 = g.admit(a).unwrap();
        assert!(g.admit(a).is_err(), "third from one address");
        let _t3 = g.admit(b).unwrap();
        assert!(g.admit(b).is_err(), "fourth in all");
        assert_eq!(g.open(), 3);
        drop(t1);
        assert_eq!(g.open(), 2);
        assert!(g.admit(a).is_ok(), "a ticket given back is available again");
        // This machine's own address counts against the total only.
        let g = Gate::new("test", limits, Arc::default());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let _l: Vec<Ticket> = (0..3).map(|_| g.admit(lo).unwrap()).collect();
        assert!(g.admit(lo).is_err(), "the total still holds");
        assert_eq!(Limits::GRPC.within(1024).unauthenticated, 256);
        assert_eq!(Limits::GRPC.within(1 << 20).unauthenticated, Limits::GRPC.unauthenticated);
        // One address holds at most a quarter of the places and the queue.
        let small = Limits::GRPC.within(256);
        assert_eq!((small.unauthenticated, small.per_ip), (64, 16));
        assert_eq!((small.handshakes, small.per_ip_handshakes), (16, 8));
        // Other loopback addresses count per address (they stand in for
        // other hosts); 127.0.0.1 is this machine's own.
        let g = Gate::new("test", Limits { per_ip: 1, ..limits }, Arc::default());
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let _o = g.admit(other).unwrap();
        assert!(g.admit(other).is_err());
        assert!(g.admit(lo).is_ok());
    }

    #[test]
    fn proven_nodes_hold_no_unproven_ticket_and_are_bounded_per_node() {
        let limits = Limits { unauthenticated: 2, per_ip: 2, handshakes: 2, per_node: 2, ..Limits::GRPC };
        let g = Gate::new("test", limits, Arc::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // The unproven pool is full ...
        let _u: Vec<Ticket> = (0..2).map(|_| g.admit(a).unwrap()).collect();
        assert!(g.admit(a).is_err());
        // ... and proven nodes still come in, each up to its own bound.
        let n1 = g.admit_proven("slave-0001".into()).unwrap();
        let _n2 = g.admit_proven("slave-0001".into()).unwrap();
        assert!(g.admit_proven("slave-0001".into()).is_err(), "a third with one node's certificate");
        let _m = g.admit_proven("master-0002".into()).unwrap();
        drop(n1);
        assert!(g.admit_proven("slave-0001".into()).is_ok(), "a count given back is available again");
        // Handshakes have their own bound: twice the places may queue.
        let h: Vec<Ticket> = (0..4).map(|_| g.admit_handshake(a, Lane::Others).unwrap()).collect();
        assert!(g.admit_handshake(a, Lane::Others).is_err());
        drop(h);
        assert!(g.admit_handshake(a, Lane::Others).is_ok());
        assert_eq!(Limits::GRPC.within(1024).handshakes, 64);
        // Without a prover nothing is proven.
        let cert = rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3]);
        assert_eq!(g.prove(Some(std::slice::from_ref(&cert))), None);
        let g = g.with_prover(Arc::new(|der: &[u8]| (der == [1, 2, 3]).then(|| "slave-0001".to_string())));
        assert_eq!(g.prove(Some(std::slice::from_ref(&cert))).as_deref(), Some("slave-0001"));
        assert_eq!(g.prove(None), None);
    }

    #[tokio::test]
    async fn peers_of_any_number_of_hosts_never_fill_the_nodes_handshake_lane() {
        let limits = Limits { handshakes: 2, per_ip_handshakes: 1, per_node: 2, ..Limits::GRPC };
        let node: IpAddr = "10.0.0.7".parse().unwrap();
        let g = Gate::new("test", limits, Arc::default()).with_known(Arc::new(move |ip| ip == node));
        assert_eq!(g.lane(node), Lane::Nodes);
        assert_eq!(g.lane("127.0.0.1".parse().unwrap()), Lane::Nodes, "this machine's own");
        assert_eq!(g.lane("10.0.0.8".parse().unwrap()), Lane::Others);
        // Four other hosts fill the others' queue and hold its places.
        let others: Vec<IpAddr> = (1..=4).map(|i| IpAddr::from([192, 0, 2, i])).collect();
        let queued: Vec<Ticket> =
            others.iter().map(|ip| g.admit_handshake(*ip, g.lane(*ip)).unwrap()).collect();
        assert!(g.admit_handshake(IpAddr::from([192, 0, 2, 9]), Lane::Others).is_err(), "queue full");
        let held = [g.handshake_place(Lane::Others).await, g.handshake_place(Lane::Others).await];
        assert!(held.iter().all(Option::is_some));
        // The node still queues and gets a place at once, up to its bound.
        let t1 = g.admit_handshake(node, g.lane(node)).expect("the node's lane is its own");
        let _t2 = g.admit_handshake(node, g.lane(node)).unwrap();
        assert!(g.admit_handshake(node, Lane::Nodes).is_err(), "a third from one node's address");
        let place = tokio::time::timeout(Duration::from_millis(100), g.handshake_place(Lane::Nodes)).await;
        assert!(matches!(place, Ok(Some(_))), "the node waited for the others' places");
        drop((t1, queued));
        // Without a `Known`, every address is another's.
        let plain = Gate::new("test", limits, Arc::default());
        assert_eq!(plain.lane(node), Lane::Others);
    }

    #[test]
    fn refusal_lines_are_limited_per_window_and_the_rest_counted() {
        let log = RateLimitedLog::default();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(log.admit(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(log.admit(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(log.admit(t0 + LOG_WINDOW), Some(5), "the next window tells how many were left out");
        assert_eq!(log.admit(t0 + LOG_WINDOW), Some(0));
    }
}
