//! Socket options for tunnel connections (the ones that cross a network).
//!
//! A peer host that vanishes without a FIN (power loss, a cut link) would otherwise leave a pooled
//! tunnel looking alive for the kernel's full retransmission timeout (about 15 minutes), and every
//! app connection in that time would be sent into it. Keepalive probes find an idle dead peer in
//! about a minute; TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged.

use socket2::{SockRef, TcpKeepalive};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 3;
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);
/// Unsent bytes a tunnel socket holds before it stops taking more (TCP_NOTSENT_LOWAT): what the
/// kernel has not sent yet is out of HTTP/2's reach, so a bulk stream could park megabytes there
/// ahead of every other stream's next frame. Measured in bench/ (sites: p99 under bulk).
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// rustls asks the socket for one record (at most about 16 KiB, often 4 KiB) per read. Reading
/// the tunnel socket through this much buffer turns a burst of records into one syscall, which
/// matters more than the extra copy: on loopback the kernel's share of the CPU is about 70%.
pub const TUNNEL_READ_BUFFER: usize = 256 * 1024;

/// Records from several streams are gathered into one send of at most this many bytes.
pub const TUNNEL_WRITE_BATCH: usize = 256 * 1024;
/// A write at least this large, with nothing gathered before it, goes straight to the socket
/// (bulk transfer: copying it would cost more than the syscall it could save).
const DIRECT_WRITE: usize = 64 * 1024;

/// The tunnel socket as the TLS layer sees it: buffered reads, gathered writes.
pub fn buffered(tcp: TcpStream) -> tokio::io::BufReader<TunnelIo> {
    tokio::io::BufReader::with_capacity(TUNNEL_READ_BUFFER, TunnelIo::new(tcp))
}

/// Reads once from `tcp` with `read`; a read that returned fewer than `want` bytes emptied the
/// socket's receive queue, so the socket is marked not readable as if the next read had failed
/// with EAGAIN. That saves one syscall per wake-up: half of all reads in request/response
/// traffic were that EAGAIN. No wake-up is lost: tokio clears readiness only if no new readiness
/// event arrived since the one taken before the read.
pub fn read_draining(
    tcp: &TcpStream,
    want: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let result = tcp.try_io(Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < want {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => result,
    }
}

/// A tunnel's TCP stream. Reads stop at a short read (see [`read_draining`]).
///
/// Writes are gathered until a flush, and the first flush with data waiting yields once to the
/// runtime before it sends. Why: when an app connection's task hands data to h2, tokio runs the
/// woken connection task next (its LIFO slot), so h2 flushed after every stream and a tunnel
/// carrying 16 busy request/response connections made one send per message. Yielding lets the
/// other ready streams add their frames first, and one send carries them all (the loopback
/// strace showed ~1 tunnel send per request before). The wait is one pass of the run queue, no
/// timer. Ordering is kept: a direct write happens only with nothing gathered.
pub struct TunnelIo {
    tcp: TcpStream,
    out: Vec<u8>,
    yielded: bool,
}

impl TunnelIo {
    pub fn new(tcp: TcpStream) -> Self {
        TunnelIo {
            tcp,
            out: Vec::new(),
            yielded: false,
        }
    }

    /// Sends everything gathered.
    fn poll_send_gathered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        if self.out.capacity() > TUNNEL_WRITE_BATCH {
            self.out = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `bufs`: gathered, or straight to the socket when large with nothing gathered before
    /// (after sending what is gathered when the batch would overflow).
    fn poll_gather(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.out.len() + len > TUNNEL_WRITE_BATCH {
            ready!(self.poll_send_gathered(cx))?;
        }
        if self.out.is_empty() && len >= DIRECT_WRITE {
            return Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        }
        bufs.iter().for_each(|b| self.out.extend_from_slice(b));
        Poll::Ready(Ok(len))
    }
}

impl Drop for TunnelIo {
    /// Bytes still gathered when the socket goes (the alert of a failed handshake: tokio-rustls
    /// writes it and drops the stream without a flush) get one non-blocking send before the close.
    fn drop(&mut self) {
        if !self.out.is_empty() {
            let _ = self.tcp.try_write(&self.out);
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.get_mut().tcp;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            match read_draining(tcp, want, || tcp.try_read(unfilled)) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_gather(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.out.is_empty() && !this.yielded {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_gathered(cx))?;
        this.yielded = false;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_gathered(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Sets TCP_NODELAY on a listening socket: Linux copies it to every accepted socket, which saves
/// a setsockopt per app connection (request/response apps must not wait for Nagle).
/// Connects to `addr` from a socket carrying `mark` (SO_MARK) when given: with capture on, the
/// agent's own connections are marked so that the capture rules let them pass.
pub async fn connect(addr: std::net::SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    SockRef::from(&socket).set_mark(mark)?;
    socket.connect(addr).await
}

pub fn nodelay_inherited(listener: &tokio::net::TcpListener) {
    if let Err(e) = SockRef::from(listener).set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a listener");
    }
}

/// Sets a socket's receive buffer to `bytes`: SO_RCVBUFFORCE (allowed with CAP_NET_ADMIN, which
/// capture needs anyway), else SO_RCVBUF (capped by net.core.rmem_max). Either stops the
/// kernel's autotuning of that socket.
pub fn force_receive_buffer(sock: &SockRef<'_>, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsFd;
    nix::sys::socket::setsockopt(&sock.as_fd(), nix::sys::socket::sockopt::RcvBufForce, &bytes)
        .or_else(|_| sock.set_recv_buffer_size(bytes))
}

/// TCP_NODELAY (the tunnel batches writes itself), keepalive, a user timeout, the unsent-bytes
/// limit and `tunnel.receive_buffer` (0: autotuning). Failures are logged, not fatal: the tunnel
/// still works, only dead-peer detection is slower or the queues longer.
pub fn tune_tunnel(tcp: &TcpStream, receive_buffer: u32) {
    let sock = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let result = tcp
        .set_nodelay(true)
        .and_then(|()| sock.set_tcp_keepalive(&keepalive))
        .and_then(|()| sock.set_tcp_user_timeout(Some(USER_TIMEOUT)))
        .and_then(|()| sock.set_tcp_notsent_lowat(NOTSENT_LOWAT))
        .and_then(|()| match receive_buffer {
            0 => Ok(()),
            n => force_receive_buffer(&sock, n as usize),
        });
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set tunnel socket options");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TunnelIo and the socket at the other end of its connection.
    async fn tunnel_io_and_peer() -> (TunnelIo, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (TunnelIo::new(tcp), peer)
    }

    /// Small writes are gathered, a large one after them keeps its place, a flush sends all,
    /// shutdown sends what is left and then the FIN.
    #[tokio::test]
    async fn gathered_writes_arrive_whole_and_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut io, mut peer) = tunnel_io_and_peer().await;
        let big = vec![7u8; 3 * DIRECT_WRITE];
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two ").await.unwrap();
        assert!(!io.out.is_empty(), "small writes wait for the flush");
        io.write_all(&big).await.unwrap();
        io.flush().await.unwrap();
        assert!(io.out.is_empty());
        let mut got = vec![0u8; 8 + big.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], b"one two ");
        assert!(got[8..].iter().all(|b| *b == 7));
        io.write_all(b"last").await.unwrap();
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");
    }

    /// A write that is never flushed still leaves when the stream is dropped (a handshake alert).
    #[tokio::test]
    async fn gathered_bytes_leave_when_the_stream_is_dropped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut io, mut peer) = tunnel_io_and_peer().await;
        io.write_all(b"alert").await.unwrap();
        drop(io);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"alert");
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodelay_inherited(&listener);
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn tunnel_sockets_get_keepalive_and_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let autotuned = SockRef::from(&tcp).recv_buffer_size().unwrap();
        tune_tunnel(&tcp, 0);
        let sock = SockRef::from(&tcp);
        assert_eq!(
            sock.recv_buffer_size().unwrap(),
            autotuned,
            "0 leaves the receive buffer to the kernel"
        );
        assert!(tcp.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
    }

    /// `tunnel.receive_buffer` reaches the socket (Linux reports twice the size asked, its
    /// bookkeeping share included; without CAP_NET_ADMIN net.core.rmem_max caps it).
    #[tokio::test]
    async fn tunnel_receive_buffer_is_set_when_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune_tunnel(&tcp, 100_000);
        let got = SockRef::from(&tcp).recv_buffer_size().unwrap();
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Forced (root), or as much as rmem_max lets an unprivileged process ask for.
        assert!(
            got == 200_000 || got == 2 * rmem_max.min(100_000),
            "receive buffer {got}"
        );
    }
}
