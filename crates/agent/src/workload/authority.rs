//! gRPC clients built on gRPC core (Python, C++, Ruby, C#) and grpc-java send the socket path,
//! percent-encoded, as the `:authority` of requests over a Unix socket (`%2Frun%2Ftapproof%2F...`).
//! That is not a valid authority, and h2 (under tonic) resets every such stream with
//! PROTOCOL_ERROR (hyperium/h2#487, grpc/grpc#38142), so py-spiffe could never talk to us.
//!
//! This sits between the socket and the HTTP/2 server: it passes every frame through, except
//! header blocks, which it decodes (HPACK, with the client's table) and encodes again (with a
//! table of its own that the server's decoder mirrors) with an invalid `:authority` replaced by
//! `localhost`. Nothing else in a request changes, and the authority is not used for anything
//! here. Frames from the server to the client are copied untouched.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame we forward: the server's default SETTINGS_MAX_FRAME_SIZE; it refuses larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block we decode (a Workload API request needs a few hundred bytes).
const MAX_BLOCK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not HTTP/2 (no connection preface)")]
    NoPreface,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("header block does not decode")]
    BadHeaders,
    #[error("CONTINUATION frame where none was expected, or another frame inside a header block")]
    BadContinuation,
}

/// A header block whose END_HEADERS has not come yet: stream id, the END_STREAM flag and
/// PRIORITY fields of its HEADERS frame, the fragments so far.
type OpenBlock = (u32, u8, Option<[u8; 5]>, Vec<u8>);

/// Copies the client's frames to the server, rewriting header blocks, until either side ends.
pub async fn client_to_server<R, W>(mut from: R, mut to: W) -> Result<(), RewriteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(RewriteError::NoPreface);
    }
    to.write_all(PREFACE).await?;
    let mut decoder = loona_hpack::Decoder::new();
    let mut encoder = loona_hpack::Encoder::new();
    let mut block: Option<OpenBlock> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(RewriteError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match kind {
            HEADERS if block.is_none() => {
                let mut body = &payload[..];
                if flags & PADDED != 0 {
                    let pad = *body.first().ok_or(RewriteError::BadHeaders)? as usize;
                    body = body
                        .get(1..body.len().checked_sub(pad).ok_or(RewriteError::BadHeaders)?)
                        .ok_or(RewriteError::BadHeaders)?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let p: [u8; 5] = body
                        .get(..5)
                        .ok_or(RewriteError::BadHeaders)?
                        .try_into()
                        .map_err(|_| RewriteError::BadHeaders)?;
                    body = &body[5..];
                    Some(p)
                } else {
                    None
                };
                block = Some((stream, flags & END_STREAM, priority, body.to_vec()));
            }
            CONTINUATION if matches!(&block, Some((s, ..)) if *s == stream) => {
                if let Some((.., fragments)) = block.as_mut() {
                    fragments.extend_from_slice(&payload);
                }
            }
            HEADERS | CONTINUATION => return Err(RewriteError::BadContinuation),
            _ if block.is_some() => return Err(RewriteError::BadContinuation),
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        }
        if block.as_ref().is_some_and(|(.., f)| f.len() > MAX_BLOCK) {
            return Err(RewriteError::TooLarge(MAX_BLOCK));
        }
        if flags & END_HEADERS == 0 {
            continue;
        }
        let Some((stream, end_stream, priority, fragments)) = block.take() else {
            continue;
        };
        let headers = decoder.decode(&fragments).map_err(|_| RewriteError::BadHeaders)?;
        let encoded = encoder.encode(headers.iter().map(|(n, v)| {
            if n == b":authority" && http::uri::Authority::try_from(v.as_slice()).is_err() {
                (&n[..], &b"localhost"[..])
            } else {
                (&n[..], &v[..])
            }
        }));
        write_block(&mut to, stream, end_stream, priority, &encoded).await?;
    }
}

/// One header block as HEADERS (then CONTINUATION frames when it does not fit one frame).
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    stream: u32,
    end_stream: u8,
    priority: Option<[u8; 5]>,
    encoded: &[u8],
) -> std::io::Result<()> {
    let mut first = Vec::with_capacity(encoded.len() + 5);
    if let Some(p) = priority {
        first.extend_from_slice(&p);
    }
    let room = MAX_FRAME - first.len();
    let (now, mut rest) = encoded.split_at(encoded.len().min(room));
    first.extend_from_slice(now);
    let mut flags = end_stream | if priority.is_some() { PRIORITY } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame(to, HEADERS, flags, stream, &first).await?;
    while !rest.is_empty() {
        let (now, later) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = later;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame(to, CONTINUATION, flags, stream, now).await?;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = (payload.len() as u32).to_be_bytes();
    let id = stream.to_be_bytes();
    to.write_all(&[len[1], len[2], len[3], kind, flags, id[0], id[1], id[2], id[3]])
        .await?;
    to.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let id = stream.to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, id[0], id[1], id[2], id[3]];
        f.extend_from_slice(payload);
        f
    }

    /// What comes out for `input`, decoded back into header lists per HEADERS block.
    async fn through(input: Vec<u8>) -> (Vec<Vec<(Vec<u8>, Vec<u8>)>>, Vec<u8>) {
        let (mut out, into) = tokio::io::duplex(1 << 20);
        client_to_server(&input[..], into).await.unwrap();
        let mut bytes = Vec::new();
        out.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(&bytes[..24], PREFACE);
        let mut decoder = loona_hpack::Decoder::new();
        let (mut blocks, mut other, mut at) = (Vec::new(), Vec::new(), 24);
        let mut pending = Vec::new();
        while at < bytes.len() {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
            let payload = &bytes[at + 9..at + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                pending.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&pending).unwrap());
                    pending.clear();
                }
            } else {
                other.extend_from_slice(&bytes[at..at + 9 + len]);
            }
            at += 9 + len;
        }
        (blocks, other)
    }

    #[tokio::test]
    async fn an_invalid_authority_becomes_localhost_and_nothing_else_changes() {
        let mut client = loona_hpack::Encoder::new();
        let request = |authority: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (b":scheme", b"http"),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b":authority", authority),
                (b"workload.spiffe.io", b"true"),
            ]
        };
        let mut input = PREFACE.to_vec();
        let settings = frame(0x4, 0, 0, &[]);
        input.extend_from_slice(&settings);
        // The first block split over HEADERS (padded) and a CONTINUATION.
        let first = client.encode(request(b"%2Frun%2Ftapproof%2Fworkload.sock"));
        let mut padded = vec![3u8];
        padded.extend_from_slice(&first[..4]);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend_from_slice(&frame(HEADERS, PADDED, 1, &padded));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, &first[4..]));
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        input.extend_from_slice(&data);
        // The second uses the client's dynamic table; a valid authority stays.
        let second = client.encode(request(b"%2Frun%2Ftapproof%2Fworkload.sock"));
        input.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let third = client.encode(request(b"localhost:1234"));
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 5, &third));

        let (blocks, other) = through(input).await;
        assert_eq!(blocks.len(), 3);
        let authority =
            |b: &Vec<(Vec<u8>, Vec<u8>)>| b.iter().find(|(n, _)| n == b":authority").unwrap().1.clone();
        assert_eq!(authority(&blocks[0]), b"localhost");
        assert_eq!(authority(&blocks[1]), b"localhost");
        assert_eq!(authority(&blocks[2]), b"localhost:1234");
        for b in &blocks {
            assert_eq!(b.len(), 5);
            assert!(b.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
        }
        assert_eq!(other, [settings, data].concat(), "other frames pass unchanged");
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        let (_out, into) = tokio::io::duplex(1024);
        assert!(matches!(
            client_to_server(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], into).await,
            Err(RewriteError::NoPreface)
        ));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, b"x"));
        let (_out, into) = tokio::io::duplex(1024);
        assert!(matches!(
            client_to_server(&input[..], into).await,
            Err(RewriteError::BadContinuation)
        ));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
        let (_out, into) = tokio::io::duplex(1024);
        assert!(matches!(
            client_to_server(&input[..], into).await,
            Err(RewriteError::BadHeaders)
        ));
    }
}
