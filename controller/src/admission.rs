//! What a peer that has not proved anything may hold: the accept loop of
//! the two TLS ports (agents' gRPC and the agent download).
//!
//! # Guarantees
//! - A TCP connection gets a ticket before anything else: at most
//!   [`Limits::unauthenticated`] connections without a client certificate
//!   at once (and never more than a quarter of the open-file limit), at
//!   most [`Limits::per_ip`] of them from one address. Loopback peers are
//!   processes of this machine (the local provider's nodes, the benchmark)
//!   and count against the total only. Over a limit the connection is
//!   closed at once and counted (`ddisco_connections_refused_total`).
//! - The TLS handshake must finish within [`Limits::handshake`].
//! - A connection that presented no client certificate lives at most
//!   [`Limits::unauthenticated_lifetime`] (an enrollment or a download
//!   needs one exchange), then reads and writes fail and it is closed.
//! - A connection with a certificate of the cluster CA (rustls verified the
//!   chain) gives its ticket back: an agent's session lives as long as the
//!   agent. Which node it may speak for is `grpc`'s business.
//! - Refusals are logged at most [`LOG_BURST`] times per [`LOG_WINDOW`];
//!   the rest are counted and summed up in the next line.

use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;

/// Bounds for peers without a client certificate.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub unauthenticated: usize,
    pub per_ip: u32,
    pub handshake: Duration,
    pub unauthenticated_lifetime: Duration,
}

impl Limits {
    /// These limits on a process that may hold `fd_limit` open files: the
    /// connections without a certificate take at most a quarter of them.
    pub fn within(self, fd_limit: u64) -> Limits {
        let quarter = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX).max(16);
        Limits { unauthenticated: self.unauthenticated.min(quarter), ..self }
    }

    /// The agents' port: enrollments are one short exchange each.
    pub const GRPC: Limits = Limits {
        unauthenticated: 2048,
        per_ip: 512,
        handshake: Duration::from_secs(10),
        unauthenticated_lifetime: Duration::from_secs(30),
    };
    /// The download port: a few MiB per node, possibly over a slow link.
    pub const DOWNLOAD: Limits = Limits {
        unauthenticated: 1024,
        per_ip: 256,
        handshake: Duration::from_secs(10),
        unauthenticated_lifetime: Duration::from_secs(300),
    };
}

/// Counts the connections without a certificate, in all and per address.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    limits: Limits,
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    metrics: Arc<Metrics>,
    log: RateLimitedLog,
}

/// Held while a connection counts against the limits.
#[derive(Debug)]
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    /// Counted per address (not for loopback peers).
    ip: Option<IpAddr>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(ip) = self.ip else { return };
        let mut m = self.per_ip.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

impl Gate {
    pub fn new(name: &'static str, limits: Limits, metrics: Arc<Metrics>) -> Gate {
        Gate {
            name,
            limits,
            total: Arc::new(Semaphore::new(limits.unauthenticated)),
            per_ip: Arc::default(),
            metrics,
            log: RateLimitedLog::default(),
        }
    }

    /// A ticket for a new connection from `ip`, if the limits allow one.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, &'static str> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many connections without a certificate")?;
        if ip.is_loopback() {
            return Ok(Ticket { _permit: permit, ip: None, per_ip: self.per_ip.clone() });
        }
        let mut m = self.per_ip.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= self.limits.per_ip {
            return Err("too many connections without a certificate from this address");
        }
        *n += 1;
        Ok(Ticket { _permit: permit, ip: Some(ip), per_ip: self.per_ip.clone() })
    }

    /// Connections without a certificate now open.
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
    /// Until it proves itself (a client certificate), it holds a ticket
    /// and has a deadline.
    _ticket: Option<Ticket>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    /// Whether the peer presented a certificate the verifier accepted.
    pub fn authenticated(&self) -> bool {
        self.inner.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty())
    }

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
            let ticket = match gate.admit(peer.ip()) {
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
                let mut g = Guarded { inner: Box::new(tls), _ticket: Some(ticket), deadline: None };
                if g.authenticated() {
                    g._ticket = None;
                } else {
                    let left = gate.limits.unauthenticated_lifetime.saturating_sub(started.elapsed());
                    g.deadline = Some(Box::pin(tokio::time::sleep(left)));
                }
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
        // Loopback peers count against the total only.
        let g = Gate::new("test", limits, Arc::default());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let _l: Vec<Ticket> = (0..3).map(|_| g.admit(lo).unwrap()).collect();
        assert!(g.admit(lo).is_err(), "the total still holds");
        assert_eq!(Limits::GRPC.within(1024).unauthenticated, 256);
        assert_eq!(Limits::GRPC.within(1 << 20).unauthenticated, Limits::GRPC.unauthenticated);
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
