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

/// rustls asks the socket for one record (at most about 16 KiB, often 4 KiB) per read. Reading
/// the tunnel socket through this much buffer turns a burst of records into one syscall, which
/// matters more than the extra copy: on loopback the kernel's share of the CPU is about 70%.
pub const TUNNEL_READ_BUFFER: usize = 256 * 1024;

/// The tunnel socket as the TLS layer reads it (writes pass straight through).
pub fn buffered(tcp: TcpStream) -> tokio::io::BufReader<ShortReadDrains> {
    tokio::io::BufReader::with_capacity(TUNNEL_READ_BUFFER, ShortReadDrains(tcp))
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

/// A TCP stream whose reads stop at a short read (see [`read_draining`]).
pub struct ShortReadDrains(pub TcpStream);

impl AsyncRead for ShortReadDrains {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = &self.get_mut().0;
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

impl AsyncWrite for ShortReadDrains {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// TCP_NODELAY (the tunnel batches writes itself), keepalive and a user timeout. Failures are
/// logged, not fatal: the tunnel still works, only dead-peer detection is slower.
pub fn tune_tunnel(tcp: &TcpStream) {
    let sock = SockRef::from(tcp);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let result = tcp
        .set_nodelay(true)
        .and_then(|()| sock.set_tcp_keepalive(&keepalive))
        .and_then(|()| sock.set_tcp_user_timeout(Some(USER_TIMEOUT)));
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set tunnel socket options");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tunnel_sockets_get_keepalive_and_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        tune_tunnel(&tcp);
        let sock = SockRef::from(&tcp);
        assert!(tcp.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }
}
