//! Joins one app TCP connection to one HTTP/2 stream, both ways, with half-close carried through:
//! EOF from the app becomes END_STREAM, END_STREAM from the peer becomes a TCP shutdown of the
//! write side. Flow control gives backpressure: capacity is released to the peer only after the
//! bytes were written to the app.

use crate::metrics::{BytesLabels, Flow, Metrics, ServiceLabels, Side, SideLabel};
use crate::state::TunnelStats;
use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::io;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read from the app per syscall.
pub const READ_BUFFER: usize = 64 * 1024;

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Splices one stream and keeps the stream counters (metrics and the tunnel's own) for its lifetime.
pub async fn carry(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    side: Side,
    service: &str,
    metrics: &Metrics,
    tunnel: &TunnelStats,
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
    let result = splice(tcp, send, recv, side, metrics, tunnel).await;
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
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    side: Side,
    metrics: &Metrics,
    tunnel: &TunnelStats,
) -> io::Result<()> {
    let (mut app_read, mut app_write) = tcp.into_split();
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

    let up = async {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        loop {
            if buf.capacity() < READ_BUFFER / 4 {
                buf.reserve(READ_BUFFER);
            }
            let n = app_read.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_error)?;
                return Ok::<_, io::Error>(());
            }
            let mut chunk = buf.split().freeze();
            to_tunnel.inc_by(n as u64);
            tunnel.bytes_app_to_tunnel.fetch_add(n as u64, Ordering::Relaxed);
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
        while let Some(data) = recv.data().await {
            let data = data.map_err(h2_error)?;
            app_write.write_all(&data).await?;
            to_app.inc_by(data.len() as u64);
            tunnel
                .bytes_tunnel_to_app
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            recv.flow_control()
                .release_capacity(data.len())
                .map_err(h2_error)?;
        }
        app_write.shutdown().await?;
        Ok::<_, io::Error>(())
    };

    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    result
}
