//! A frame-level HTTP/2 client over real TLS, for attacks no well-behaved client (the h2 crate)
//! will send: rapid reset, CONTINUATION floods, HPACK bombs, empty-DATA, SETTINGS and PING floods,
//! a peer that never reads. Frames are written by hand (RFC 9113 section 4.1: a 9-byte header);
//! header blocks use HPACK literals without Huffman coding (RFC 7541 section 6.2), which every
//! decoder must accept. What comes back is read by a task that records it, or not read at all.

use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

type Tls = tapproof_tls::ClientStream;

/// What the server sent, as far as the reader has got.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The GOAWAY error code, if the server sent one.
    pub goaway: Option<u32>,
    /// Streams the server answered with HEADERS.
    pub answered: Vec<u32>,
    /// RST_STREAM error codes per stream.
    pub resets: HashMap<u32, u32>,
    /// DATA bytes per stream.
    pub data: HashMap<u32, Vec<u8>>,
    pub pings_acked: u64,
    pub settings_acked: u64,
    /// WINDOW_UPDATE increments per stream (0: the connection).
    pub window_updates: HashMap<u32, u64>,
    /// The connection ended (EOF or error), and how.
    pub closed: Option<String>,
}

pub struct RawH2 {
    write: WriteHalf<Tls>,
    /// The server's SETTINGS_INITIAL_WINDOW_SIZE (a stream's send window at its start).
    initial_window: u64,
    /// DATA bytes sent, per stream and in total.
    sent: HashMap<u32, u64>,
    sent_total: u64,
    read: Option<ReadHalf<Tls>>,
    pub seen: Arc<Mutex<Seen>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// A frame: 9-byte header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(9 + payload.len());
    let len = payload.len() as u32;
    b.put_u8((len >> 16) as u8);
    b.put_u16(len as u16);
    b.put_u8(kind);
    b.put_u8(flags);
    b.put_u32(stream & 0x7fff_ffff);
    b.put_slice(payload);
    b.to_vec()
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A header field as a literal without indexing (new name).
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value);
}

/// A header field as a literal with incremental indexing (it enters the dynamic table at 62).
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_str(out, name.as_bytes());
    hpack_str(out, value);
}

/// A reference to entry `index` of the static or dynamic table.
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

/// The header block of a tunnel CONNECT request for `service`.
pub fn connect_block(service: &str) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, ":method", b"CONNECT");
    literal(&mut b, ":authority", service.as_bytes());
    b
}

impl RawH2 {
    /// TLS to `addr` as `identity`, the connection preface and an empty SETTINGS frame; waits for
    /// the server's SETTINGS and acknowledges it. The reader runs when `read` is true; otherwise
    /// nothing is read after the handshake (a peer that stops reading).
    pub async fn connect(
        addr: SocketAddr,
        identity: &crate::pki::IdentityPaths,
        td: &tapproof_identity::TrustDomain,
        server: tapproof_identity::SpiffeId,
        read: bool,
    ) -> anyhow::Result<Self> {
        let files = tapproof_tls::IdentityFiles {
            cert: identity.cert.clone(),
            key: identity.key.clone(),
            bundle: identity.bundle.clone(),
        };
        let material = tapproof_tls::Material::load(&files, td)?;
        let tls =
            tapproof_tls::ClientTls::new(&material, server, tapproof_tls::CryptoPolicy::PreferPostQuantum)?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let stream = tapproof_tls::connect(&tls, tcp, addr).await?;
        let (mut r, mut w) = tokio::io::split(stream);
        w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        w.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        // The server's SETTINGS comes first (RFC 9113 section 3.4).
        let (kind, flags, _, settings) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut r))
            .await??
            .ok_or_else(|| anyhow::anyhow!("connection closed before the server's SETTINGS"))?;
        anyhow::ensure!(
            kind == SETTINGS && flags & ACK == 0,
            "first frame was type {kind}"
        );
        let mut initial_window = 65_535;
        for s in settings.chunks_exact(6) {
            if u16::from_be_bytes([s[0], s[1]]) == 0x4 {
                initial_window = u32::from_be_bytes(s[2..6].try_into().unwrap()) as u64;
            }
        }
        w.write_all(&frame(SETTINGS, ACK, 0, &[])).await?;
        let mut me = Self {
            write: w,
            initial_window,
            sent: HashMap::new(),
            sent_total: 0,
            read: Some(r),
            seen: Arc::default(),
            reader: None,
        };
        if read {
            me.start_reading();
        }
        Ok(me)
    }

    /// Starts the reader (if it is not running): every frame is recorded in `seen`; the
    /// server's own SETTINGS and PINGs are not answered.
    pub fn start_reading(&mut self) {
        let Some(mut r) = self.read.take() else {
            return;
        };
        let seen = self.seen.clone();
        self.reader = Some(tokio::spawn(async move {
            loop {
                match read_frame(&mut r).await {
                    Ok(Some((kind, flags, stream, payload))) => {
                        let mut s = seen.lock().unwrap();
                        match kind {
                            HEADERS => s.answered.push(stream),
                            DATA => s.data.entry(stream).or_default().extend_from_slice(&payload),
                            RST_STREAM if payload.len() == 4 => {
                                s.resets
                                    .insert(stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
                            }
                            GOAWAY if payload.len() >= 8 => {
                                s.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                            }
                            PING if flags & ACK != 0 => s.pings_acked += 1,
                            SETTINGS if flags & ACK != 0 => s.settings_acked += 1,
                            WINDOW_UPDATE if payload.len() == 4 => {
                                let inc = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                                *s.window_updates.entry(stream).or_default() += inc as u64;
                            }
                            _ => {}
                        }
                    }
                    Ok(None) => {
                        seen.lock().unwrap().closed = Some("end of stream".into());
                        return;
                    }
                    Err(e) => {
                        seen.lock().unwrap().closed = Some(e.to_string());
                        return;
                    }
                }
            }
        }));
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.write.flush().await
    }

    /// HEADERS for a CONNECT to `service` on `stream` (odd, increasing).
    pub fn open(stream: u32, service: &str) -> Vec<u8> {
        frame(HEADERS, END_HEADERS, stream, &connect_block(service))
    }

    pub fn snapshot(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `check` holds for what was seen, or `limit` passes; returns whether it held.
    pub async fn wait_for(&self, limit: Duration, check: impl Fn(&Seen) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if check(&self.seen.lock().unwrap()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check(&self.seen.lock().unwrap())
    }

    /// Sends up to `total` bytes of DATA on `stream` in frames of `chunk`, as flow control allows
    /// (a well-behaved sender: the connection window starts at 65,535, a stream's at the
    /// server's initial window, both grow by the WINDOW_UPDATEs the reader saw); stops when no
    /// window opens for `stall`. Returns the bytes sent.
    pub async fn send_data(&mut self, stream: u32, total: u64, chunk: usize, stall: Duration) -> u64 {
        let mut done = 0;
        let mut waited = tokio::time::Instant::now();
        while done < total {
            let (conn_up, stream_up) = {
                let s = self.seen.lock().unwrap();
                (
                    s.window_updates.get(&0).copied().unwrap_or(0),
                    s.window_updates.get(&stream).copied().unwrap_or(0),
                )
            };
            let sent_stream = self.sent.get(&stream).copied().unwrap_or(0);
            let room = (65_535 + conn_up)
                .saturating_sub(self.sent_total)
                .min((self.initial_window + stream_up).saturating_sub(sent_stream))
                .min(chunk as u64)
                .min(total - done);
            if room == 0 {
                if waited.elapsed() > stall {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let f = frame(DATA, 0, stream, &vec![b'd'; room as usize]);
            match tokio::time::timeout(stall, write_all(&mut self.write, &f)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
            *self.sent.entry(stream).or_default() += room;
            self.sent_total += room;
            done += room;
            waited = tokio::time::Instant::now();
        }
        done
    }

    /// Writes `frames` until it has written them all or the write stalls for `stall` (the
    /// server stopped reading); returns how many bytes went out.
    pub async fn send_until_stalled(
        &mut self,
        frames: impl Iterator<Item = Vec<u8>>,
        stall: Duration,
    ) -> usize {
        let mut sent = 0;
        for f in frames {
            match tokio::time::timeout(stall, write_all(&mut self.write, &f)).await {
                Ok(Ok(())) => sent += f.len(),
                _ => break,
            }
        }
        sent
    }
}

impl Drop for RawH2 {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> std::io::Result<()> {
    w.write_all(b).await
}

/// One frame, or None at a clean end of stream.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(u8, u8, u32, Vec<u8>)>> {
    let mut head = [0u8; 9];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[3], head[4], stream, payload)))
}
