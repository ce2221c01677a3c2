//! Traffic keys updated on a schedule (TLS 1.3 KeyUpdate) for tunnels that live for months.
//!
//! [`Rekeying`] wraps an established TLS stream. Before it writes, it checks how many bytes it
//! wrote and how long ago since the last update; once either passes the [`KeySchedule`], it asks
//! rustls for a KeyUpdate (`update_requested`, so the peer answers with one for its own sending
//! direction too) and then writes. The KeyUpdate message goes out ahead of the data that made it
//! due, so no byte past the limit is sent under the old key. An idle tunnel sends nothing, so its
//! time-based update comes with its next write. rustls also updates keys on its own when a key
//! nears the cipher's confidentiality limit; this schedule is far below that.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// When a tunnel's sending keys are replaced: after `bytes` of payload or after `interval`,
/// whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySchedule {
    pub bytes: u64,
    pub interval: Duration,
}

/// What made an update due, for the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyUpdateReason {
    Bytes,
    Time,
}

impl KeyUpdateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::Time => "time",
        }
    }
}

/// A TLS stream whose sending keys can be refreshed: both ends of a tunnel.
pub trait RefreshKeys {
    fn refresh_traffic_keys(&mut self) -> Result<(), rustls::Error>;
}

impl<IO> RefreshKeys for tokio_rustls::client::TlsStream<IO> {
    fn refresh_traffic_keys(&mut self) -> Result<(), rustls::Error> {
        self.get_mut().1.refresh_traffic_keys()
    }
}

impl<IO> RefreshKeys for tokio_rustls::server::TlsStream<IO> {
    fn refresh_traffic_keys(&mut self) -> Result<(), rustls::Error> {
        self.get_mut().1.refresh_traffic_keys()
    }
}

/// Called once per update sent.
pub type OnKeyUpdate = Box<dyn Fn(KeyUpdateReason) + Send + Sync>;

/// An established TLS stream that updates its sending keys on a [`KeySchedule`].
pub struct Rekeying<S> {
    inner: S,
    schedule: KeySchedule,
    written: u64,
    since: Instant,
    on_update: OnKeyUpdate,
}

impl<S> Rekeying<S> {
    pub fn new(inner: S, schedule: KeySchedule, on_update: OnKeyUpdate) -> Self {
        Self {
            inner,
            schedule,
            written: 0,
            since: Instant::now(),
            on_update,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: RefreshKeys> Rekeying<S> {
    /// Queues a KeyUpdate ahead of the next write when one is due. A refusal by rustls (never
    /// expected once a TLS 1.3 handshake is done) fails the write: the tunnel closes rather than
    /// go on under a key past its schedule.
    fn update_if_due(&mut self) -> io::Result<()> {
        let reason = if self.written >= self.schedule.bytes {
            KeyUpdateReason::Bytes
        } else if self.since.elapsed() >= self.schedule.interval {
            KeyUpdateReason::Time
        } else {
            return Ok(());
        };
        self.inner
            .refresh_traffic_keys()
            .map_err(|e| io::Error::other(format!("TLS key update refused: {e}")))?;
        self.written = 0;
        self.since = Instant::now();
        (self.on_update)(reason);
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rekeying<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + RefreshKeys + Unpin> AsyncWrite for Rekeying<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.update_if_due()?;
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.update_if_due()?;
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
