//! The kernel's view of TCP: sockets from /proc/net/tcp and tcp6, and which process holds each
//! (by the socket inode in /proc/PID/fd). Everything unreadable is counted, not fatal: without
//! root the scan still sees every socket, but only the processes of the calling user.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    Listen,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    pub inode: u64,
    pub uid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub name: String,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub sockets: Vec<Socket>,
    /// Socket inode -> the process holding it.
    pub owners: HashMap<u64, Process>,
    /// What could not be read, for the report's "not seen" section.
    pub blind_spots: Vec<String>,
    /// Processes whose descriptors could not be listed (another user's, without root).
    pub unreadable_processes: usize,
    /// Lines of /proc/net/tcp* that did not parse.
    pub malformed_lines: usize,
}

/// Parses `0100007F:1F90` (little-endian words, as the kernel prints them).
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_le_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            // IPv4-mapped addresses are IPv4 peers on a dual-stack socket.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One line of /proc/net/tcp (without the header).
pub fn parse_line(line: &str) -> Option<Socket> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    let state = match f[3] {
        "01" => TcpState::Established,
        "0A" => TcpState::Listen,
        s if s.len() == 2 && u8::from_str_radix(s, 16).is_ok() => TcpState::Other,
        _ => return None,
    };
    Some(Socket {
        local: parse_addr(f[1])?,
        remote: parse_addr(f[2])?,
        state,
        uid: f[7].parse().ok()?,
        inode: f[9].parse().ok()?,
    })
}

/// Reads the sockets and their owners under `proc_root` (normally /proc).
pub fn scan(proc_root: &Path) -> Scan {
    let mut out = Scan::default();
    for table in ["net/tcp", "net/tcp6"] {
        let path = proc_root.join(table);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().skip(1) {
                    match parse_line(line) {
                        Some(s) => out.sockets.push(s),
                        None => out.malformed_lines += 1,
                    }
                }
            }
            Err(e) if table == "net/tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out
                .blind_spots
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }
    if out.malformed_lines > 0 {
        out.blind_spots.push(format!(
            "{} lines of /proc/net/tcp* did not parse and were skipped",
            out.malformed_lines
        ));
    }
    let wanted: std::collections::HashSet<u64> = out.sockets.iter().map(|s| s.inode).collect();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        out.blind_spots.push(format!(
            "cannot list {}: no process is named",
            proc_root.display()
        ));
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let dir: PathBuf = entry.path();
        // A process may exit mid-scan: every read below may fail, and that is not an error.
        let fds = match std::fs::read_dir(dir.join("fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                out.unreadable_processes += 1;
                continue;
            }
            Err(_) => continue,
        };
        let name = std::fs::read_to_string(dir.join("comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) {
                out.owners.entry(inode).or_insert_with(|| Process {
                    pid,
                    name: name.clone(),
                });
            }
        }
    }
    if out.unreadable_processes > 0 {
        out.blind_spots.push(format!(
            "{} processes of other users could not be inspected (run as root to name the owners of their sockets)",
            out.unreadable_processes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0201A8C0:D431 0101A8C0:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 23456 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 34567 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000201A8C0:0050 0000000000000000FFFF00000301A8C0:C350 01 00000000:00000000 00:00000000 00000000     0        0 45678 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_kernel_lines() {
        let listen = parse_line(TCP.lines().nth(1).unwrap()).unwrap();
        assert_eq!(listen.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(listen.state, TcpState::Listen);
        let est = parse_line(TCP.lines().nth(2).unwrap()).unwrap();
        assert_eq!(est.local, "192.168.1.2:54321".parse().unwrap());
        assert_eq!(est.remote, "192.168.1.1:8080".parse().unwrap());
        assert_eq!(
            (est.state, est.uid, est.inode),
            (TcpState::Established, 1000, 23456)
        );
        let any6 = parse_line(TCP6.lines().nth(1).unwrap()).unwrap();
        assert_eq!(any6.local, "[::]:80".parse().unwrap());
        let mapped = parse_line(TCP6.lines().nth(2).unwrap()).unwrap();
        assert_eq!(mapped.remote, "192.168.1.3:50000".parse().unwrap());
    }

    #[test]
    fn garbage_lines_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("net")).unwrap();
        let broken = format!("{TCP}   2: ZZZZ not a socket line\n   3: 0100007F:1F90\n");
        std::fs::write(dir.path().join("net/tcp"), broken).unwrap();
        let scan = scan(dir.path());
        assert_eq!(scan.sockets.len(), 2);
        assert_eq!(scan.malformed_lines, 2);
        assert!(scan.blind_spots.iter().any(|b| b.contains("did not parse")));
    }

    #[test]
    fn missing_proc_is_a_blind_spot() {
        let dir = tempfile::tempdir().unwrap();
        let scan = scan(&dir.path().join("nope"));
        assert!(scan.sockets.is_empty());
        assert!(scan.blind_spots.iter().any(|b| b.contains("cannot read")));
    }
}
