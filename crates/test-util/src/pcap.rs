//! Just enough of the classic pcap format (Ethernet, IPv4, TCP) to pull TCP payloads out of a
//! tcpdump capture, reassemble one direction of a connection, and read the key-exchange group
//! from a TLS 1.3 ServerHello.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub payload: Vec<u8>,
}

fn u16be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32be(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The Ethernet frames of a classic pcap file, in capture order. Panics on a file that is not
/// pcap/Ethernet.
fn frames(file: &[u8]) -> Vec<&[u8]> {
    let magic = u32::from_le_bytes(file[0..4].try_into().expect("pcap header"));
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => panic!("not a pcap file (magic {m:08x})"),
    };
    let rd32 = |at: usize| -> Option<u32> {
        let b: [u8; 4] = file.get(at..at + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    assert_eq!(rd32(20), Some(1), "capture link type must be Ethernet");
    let mut out = Vec::new();
    let mut at = 24;
    while let Some(caplen) = rd32(at + 8) {
        let start = at + 16;
        let Some(frame) = file.get(start..start + caplen as usize) else {
            break;
        };
        at = start + caplen as usize;
        out.push(frame);
    }
    out
}

/// TCP segments with a payload, in capture order. Panics on a file that is not pcap/Ethernet.
pub fn tcp_segments(file: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    for frame in frames(file) {
        if u16be(frame, 12) != Some(0x0800) {
            continue;
        }
        let ipv4 = &frame[14..];
        let Some(&vihl) = ipv4.first() else { continue };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ipv4.get(9) != Some(&6) {
            continue;
        }
        let Some(total) = u16be(ipv4, 2) else { continue };
        let src_ip = Ipv4Addr::new(ipv4[12], ipv4[13], ipv4[14], ipv4[15]);
        let dst_ip = Ipv4Addr::new(ipv4[16], ipv4[17], ipv4[18], ipv4[19]);
        let Some(tcp) = ipv4.get(ihl..(total as usize).min(ipv4.len())) else {
            continue;
        };
        let (Some(sport), Some(dport), Some(seq)) = (u16be(tcp, 0), u16be(tcp, 2), u32be(tcp, 4)) else {
            continue;
        };
        let off = ((tcp.get(12).copied().unwrap_or(0) >> 4) as usize) * 4;
        let payload = tcp.get(off..).unwrap_or_default();
        if payload.is_empty() {
            continue;
        }
        out.push(Segment {
            src: SocketAddrV4::new(src_ip, sport),
            dst: SocketAddrV4::new(dst_ip, dport),
            seq,
            payload: payload.to_vec(),
        });
    }
    out
}

/// The IP protocol number of every IPv4 packet in the capture, in order (6 TCP, 17 UDP, 1
/// ICMP, ...). Panics on a file that is not pcap/Ethernet.
pub fn ipv4_protocols(file: &[u8]) -> Vec<u8> {
    frames(file)
        .into_iter()
        .filter(|f| u16be(f, 12) == Some(0x0800))
        .filter_map(|f| f.get(14 + 9).copied())
        .collect()
}

/// The bytes sent by `src` on its connection(s) to port `dst_port`... as one stream, in sequence
/// order with retransmissions dropped (good enough on a clean veth).
pub fn stream_from(segments: &[Segment], src_port: u16) -> Vec<u8> {
    let mut by_seq = BTreeMap::new();
    for s in segments.iter().filter(|s| s.src.port() == src_port) {
        by_seq.entry(s.seq).or_insert_with(|| s.payload.clone());
    }
    by_seq.into_values().flatten().collect()
}

/// Whether `needle` appears anywhere in any payload of the capture, or in the raw file.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A hello's extensions: (type, data).
type Extensions<'a> = Vec<(u16, &'a [u8])>;

/// The body and extensions of the first handshake message of `stream` (one TLS connection's
/// bytes from one side) when it is of type `kind` (1 ClientHello, 2 ServerHello): the cipher
/// suite(s) and the (type, data) of each extension.
fn hello(stream: &[u8], kind: u8) -> Option<(Vec<u16>, Extensions<'_>)> {
    // TLS record: type 22 (handshake), version, length; then the handshake message.
    if *stream.first()? != 22 {
        return None;
    }
    let len = u16be(stream, 3)? as usize;
    let hs = stream.get(5..5 + len)?;
    if *hs.first()? != kind {
        return None;
    }
    let body = hs.get(4..)?;
    let mut at = 2 + 32; // legacy_version, random
    let sid_len = *body.get(at)? as usize;
    at += 1 + sid_len;
    let suites = if kind == 1 {
        let n = u16be(body, at)? as usize;
        let list = (0..n / 2)
            .map(|i| u16be(body, at + 2 + 2 * i))
            .collect::<Option<Vec<_>>>()?;
        at += 2 + n;
        let compression = *body.get(at)? as usize;
        at += 1 + compression;
        list
    } else {
        let suite = u16be(body, at)?;
        at += 2 + 1; // cipher suite, compression
        vec![suite]
    };
    let ext_len = u16be(body, at)? as usize;
    at += 2;
    let end = at + ext_len;
    let mut extensions = Vec::new();
    while at + 4 <= end {
        let ty = u16be(body, at)?;
        let len = u16be(body, at + 2)? as usize;
        extensions.push((ty, body.get(at + 4..at + 4 + len)?));
        at += 4 + len;
    }
    Some((suites, extensions))
}

/// The named group of the key_share in the first TLS ServerHello of `stream`.
pub fn server_hello_group(stream: &[u8]) -> Option<u16> {
    let (_, extensions) = hello(stream, 2)?;
    let (_, data) = extensions.into_iter().find(|(ty, _)| *ty == 0x0033)?;
    u16be(data, 0)
}

/// The cipher suite the first TLS ServerHello of `stream` chose.
pub fn server_hello_cipher(stream: &[u8]) -> Option<u16> {
    hello(stream, 2)?.0.first().copied()
}

/// What the first TLS ClientHello of `stream` offers: its cipher suites, its supported groups
/// and its signature algorithms.
pub fn client_hello_offers(stream: &[u8]) -> Option<(Vec<u16>, Vec<u16>, Vec<u16>)> {
    let (suites, extensions) = hello(stream, 1)?;
    let list = |ty: u16| -> Vec<u16> {
        extensions
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, d)| {
                let n = u16be(d, 0).unwrap_or(0) as usize;
                (0..n / 2).filter_map(|i| u16be(d, 2 + 2 * i)).collect()
            })
            .unwrap_or_default()
    };
    Some((suites, list(0x000a), list(0x000d)))
}

/// IANA code point of X25519MLKEM768.
pub const X25519MLKEM768: u16 = 0x11ec;
/// IANA code point of ML-KEM-1024 (a named group).
pub const MLKEM1024: u16 = 0x0202;
/// IANA code point of TLS_AES_256_GCM_SHA384.
pub const TLS_AES_256_GCM_SHA384: u16 = 0x1302;
/// IANA code point of the ML-DSA-87 signature scheme.
pub const ML_DSA_87: u16 = 0x0906;
