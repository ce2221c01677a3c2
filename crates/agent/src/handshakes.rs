//! Per-handshake records (the evidence that a link was encrypted, with what, between whom): every
//! tunnel handshake this agent accepted, dialled or refused yields one `HandshakeRecord`. They are
//! kept bounded in memory (`MAX_RECORDS`, the oldest go first and are counted) and, with
//! `[control]`, appended to `<data_dir>/handshakes.jsonl` (0600; at `MAX_FILE_BYTES` it becomes
//! `handshakes.1.jsonl`, replacing the one before, so the disk holds at most twice that). The
//! coverage report ships the records the server has not acknowledged yet (`coverage.rs`); a
//! restarted agent reloads the newest file and ships it again (the server keeps the first copy).

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tapproof_audit::HandshakeRecord;
use tracing::warn;

/// Records kept in memory awaiting shipment (about 0.5 KB each).
pub const MAX_RECORDS: usize = 20_000;
/// The live file's size before it rotates.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
const FILE: &str = "handshakes.jsonl";
const ROTATED: &str = "handshakes.1.jsonl";

pub struct HandshakeLog {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Not yet acknowledged by the server, oldest first.
    pending: VecDeque<HandshakeRecord>,
    seq: u64,
    /// Records dropped unshipped because `pending` was full.
    dropped: u64,
    file: Option<LogFile>,
}

struct LogFile {
    dir: PathBuf,
    out: std::fs::File,
    bytes: u64,
}

impl HandshakeLog {
    /// A log in memory only (no `[control]`: nobody to ship to; `GET /v1/status` still counts).
    pub fn in_memory() -> Self {
        Self::with(None, VecDeque::new())
    }

    /// A log kept in `dir` too; the records of the newest file are loaded to be shipped (again).
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(FILE);
        let mut pending = VecDeque::new();
        if let Ok(f) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(f).lines() {
                // A torn last line (a crash mid-write) is skipped, not fatal.
                if let Ok(r) = serde_json::from_str::<HandshakeRecord>(&line?) {
                    if pending.len() == MAX_RECORDS {
                        pending.pop_front();
                    }
                    pending.push_back(r);
                }
            }
        }
        let out = open_private(&path)?;
        let bytes = out.metadata()?.len();
        Ok(Self::with(
            Some(LogFile {
                dir: dir.to_owned(),
                out,
                bytes,
            }),
            pending,
        ))
    }

    fn with(file: Option<LogFile>, pending: VecDeque<HandshakeRecord>) -> Self {
        let seq = pending.back().map_or(0, |r| r.seq + 1);
        Self {
            inner: Mutex::new(Inner {
                pending,
                seq,
                dropped: 0,
                file,
            }),
        }
    }

    /// Keeps one record: stamps its time and sequence number, appends it to the file.
    pub fn record(&self, mut r: HandshakeRecord) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        r.seq = inner.seq;
        inner.seq += 1;
        if let Some(file) = &mut inner.file {
            if let Err(e) = file.append(&r) {
                warn!(error = %e, dir = %file.dir.display(), "handshake records: cannot write to disk (kept in memory)");
            }
        }
        if inner.pending.len() == MAX_RECORDS {
            inner.pending.pop_front();
            inner.dropped += 1;
        }
        inner.pending.push_back(r);
    }

    /// The oldest records not yet shipped, at most `max`.
    pub fn unshipped(&self, max: usize) -> Vec<HandshakeRecord> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pending.iter().take(max).cloned().collect()
    }

    /// The server stored `sent` (the oldest `sent` records of `unshipped`): they leave memory.
    pub fn shipped(&self, sent: &[HandshakeRecord]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for r in sent {
            if inner
                .pending
                .front()
                .is_some_and(|p| p.seq == r.seq && p.at_ms == r.at_ms)
            {
                inner.pending.pop_front();
            }
        }
    }

    /// Records waiting to be shipped, and those dropped unshipped since start.
    pub fn counts(&self) -> (usize, u64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.pending.len(), inner.dropped)
    }
}

impl LogFile {
    fn append(&mut self, r: &HandshakeRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.bytes + line.len() as u64 > MAX_FILE_BYTES {
            std::fs::rename(self.dir.join(FILE), self.dir.join(ROTATED))?;
            self.out = open_private(&self.dir.join(FILE))?;
            self.bytes = 0;
        }
        self.out.write_all(&line)?;
        self.bytes += line.len() as u64;
        Ok(())
    }
}

/// Opens `path` for appending, created 0600 (the records map who talks to whom).
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(side: &str) -> HandshakeRecord {
        HandshakeRecord {
            side: side.into(),
            outcome: "ok".into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_survive_a_restart_until_shipped_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = HandshakeLog::open(dir.path()).unwrap();
        log.record(record("inbound"));
        log.record(record("outbound"));
        let sent = log.unshipped(1);
        assert_eq!(sent.len(), 1);
        log.shipped(&sent);
        assert_eq!(log.counts(), (1, 0));
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(log);
        // A torn last line, as a crash mid-write leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap()
            .write_all(b"{\"at_ms\":1,")
            .unwrap();
        let again = HandshakeLog::open(dir.path()).unwrap();
        // Both records come back (the server keeps the first copy of the one already shipped),
        // and numbering goes on after them.
        let back = again.unshipped(10);
        assert_eq!(back.len(), 2);
        again.record(record("inbound"));
        assert_eq!(again.unshipped(10)[2].seq, back[1].seq + 1);
    }

    #[test]
    fn the_file_rotates_and_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = HandshakeLog::open(dir.path()).unwrap();
        let big = HandshakeRecord {
            reason: Some("x".repeat(100_000)),
            ..record("inbound")
        };
        for _ in 0..100 {
            log.record(big.clone());
        }
        let live = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        let rotated = std::fs::metadata(dir.path().join(ROTATED)).unwrap().len();
        assert!(
            live <= MAX_FILE_BYTES && rotated <= MAX_FILE_BYTES,
            "{live} {rotated}"
        );
        let mem = HandshakeLog::in_memory();
        for _ in 0..MAX_RECORDS + 5 {
            mem.record(record("outbound"));
        }
        assert_eq!(mem.counts(), (MAX_RECORDS, 5));
        assert_eq!(mem.unshipped(1)[0].seq, 5, "the oldest went first");
    }
}
