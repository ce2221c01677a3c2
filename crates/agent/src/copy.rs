//! Joins one app TCP connection to one HTTP/2 stream, both ways, with half-close carried through:
//! EOF from the app becomes END_STREAM, END_STREAM from the peer becomes a TCP shutdown of the
//! write side. Flow control gives backpressure: capacity is released to the peer only after the
//! bytes were written to the app.
//!
//! An idle connection holds no read buffer: one is taken only once the socket is readable and
//! handed on (as `Bytes`) with the data, so 10,000 idle app connections cost kilobytes each, not
//! 64 KiB each. The receiving half may still be on its way (the outbound sends the app's first
//! bytes before the peer has answered the CONNECT, saving a round trip per app connection).

use crate::metrics::{BytesLabels, Flow, Metrics, ServiceLabels, Side, SideLabel};
use crate::socket::read_draining;
use crate::state::TunnelStats;
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes read from the app per syscall while it streams.
pub const READ_BUFFER: usize = 64 * 1024;
/// Bytes read per syscall after a short read (request/response traffic).
pub const SMALL_READ: usize = 16 * 1024;

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Payload bytes one stream carried: from the app into the tunnel (`up`) and back (`down`).
#[derive(Debug, Default)]
pub struct Carried {
    pub up: std::sync::atomic::AtomicU64,
    pub down: std::sync::atomic::AtomicU64,
}

impl Carried {
    pub fn totals(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }
}

/// Splices one stream and keeps the stream counters (metrics and the tunnel's own) for its lifetime.
/// `recv` resolves to the peer's half of the stream; an error from it ends the stream like any other.
/// `carried` counts this stream's bytes (a site gateway reports them per site).
#[allow(clippy::too_many_arguments)]
pub async fn carry(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: impl Future<Output = io::Result<RecvStream>>,
    side: Side,
    service: &str,
    metrics: &Metrics,
    tunnel: &TunnelStats,
    carried: &Carried,
) -> io::Result<()> {
    metrics
        .streams
        .get_or_create(&ServiceLabels {
            side,
            service: service.to_owned(),
        })
        .inc();
    let open = metrics.streams_open.get_or_create(&SideLabel { side }).clone();
    open.inc();
    tunnel.streams_total.fetch_add(1, Ordering::Relaxed);
    tunnel.streams_open.fetch_add(1, Ordering::Relaxed);
    let result = splice(tcp, send, recv, side, metrics, tunnel, carried).await;
    tunnel.streams_open.fetch_sub(1, Ordering::Relaxed);
    open.dec();
    if result.is_err() {
        metrics.stream_failed(side, "reset");
    }
    result
}

/// Carries bytes until both directions have ended. On an error in either direction the stream
/// is reset and the app connection dropped, so neither side waits on a dead peer.
async fn splice(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    recv: impl Future<Output = io::Result<RecvStream>>,
    side: Side,
    metrics: &Metrics,
    tunnel: &TunnelStats,
    carried: &Carried,
) -> io::Result<()> {
    // Borrowed halves: tokio's owned write half sends shutdown(SHUT_WR) when dropped, one
    // syscall per connection that the close right after makes redundant.
    let (app_read, mut app_write) = tcp.split();
    let to_tunnel = metrics
        .bytes
        .get_or_create(&BytesLabels {
            side,
            flow: Flow::AppToTunnel,
        })
        .clone();
    let to_app = metrics
        .bytes
        .get_or_create(&BytesLabels {
            side,
            flow: Flow::TunnelToApp,
        })
        .clone();

    let app_done = std::sync::atomic::AtomicBool::new(false);
    let up = async {
        let mut buf = BytesMut::new();
        let mut want = SMALL_READ;
        loop {
            app_read.readable().await?;
            if buf.capacity() < want / 4 {
                buf.reserve(want);
            }
            let spare = buf.capacity() - buf.len();
            let n = match read_draining(app_read.as_ref(), spare, || app_read.try_read_buf(&mut buf)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_error)?;
                app_done.store(true, Ordering::Relaxed);
                return Ok::<_, io::Error>(());
            }
            let mut chunk = buf.split().freeze();
            if n >= want / 2 {
                // Streaming: read big and keep the rest of the buffer for the next read.
                want = READ_BUFFER;
            } else {
                // Request/response or going idle: let the buffer go with the data.
                want = SMALL_READ;
                buf = BytesMut::new();
            }
            to_tunnel.inc_by(n as u64);
            tunnel.bytes_app_to_tunnel.fetch_add(n as u64, Ordering::Relaxed);
            carried.up.fetch_add(n as u64, Ordering::Relaxed);
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed by peer"))?
                    .map_err(h2_error)?;
                let part = chunk.split_to(granted.min(chunk.len()));
                send.send_data(part, false).map_err(h2_error)?;
            }
        }
    };

    let down = async {
        let mut recv = recv.await?;
        while let Some(data) = recv.data().await {
            let data = data.map_err(h2_error)?;
            app_write.write_all(&data).await?;
            to_app.inc_by(data.len() as u64);
            tunnel
                .bytes_tunnel_to_app
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            carried.down.fetch_add(data.len() as u64, Ordering::Relaxed);
            recv.flow_control()
                .release_capacity(data.len())
                .map_err(h2_error)?;
        }
        // Half-close toward the app, unless the app already sent its EOF: then the socket is
        // closed right after this (which sends the FIN) and a shutdown would be one more syscall.
        if !app_done.load(Ordering::Relaxed) {
            app_write.shutdown().await?;
        }
        Ok::<_, io::Error>(())
    };

    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
        // A cut stream (the peer agent died, the tunnel broke, the far side reset) reaches the
        // app as a reset, not a FIN: a close-delimited protocol must not take a truncated
        // response for a complete one.
        if let Err(e) = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO)) {
            tracing::debug!(error = %e, "cannot set SO_LINGER 0 on a cut app connection");
        }
    }
    result
}
