//! Loopback services and blocking clients for tests: an echo server on its own thread and
//! runtime (so tests can block freely), and round trips checked by SHA-256.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Echoes each connection until the client half-closes, then closes its own write side.
    pub fn start() -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    loop {
                        let Ok((mut tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let (mut r, mut w) = tcp.split();
                            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                                let _ = w.shutdown().await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        Self {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Sends `payload`, half-closes, and returns everything read back until EOF (giving up after 60 s
/// without a byte).
pub fn round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    round_trip_within(addr, payload, std::time::Duration::from_secs(60))
}

/// `round_trip`, giving up after `quiet` without a byte (a lossy link's TCP may back off longer).
pub fn round_trip_within(
    addr: SocketAddr,
    payload: &[u8],
    quiet: std::time::Duration,
) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(quiet))?;
    let mut writer = tcp.try_clone()?;
    let payload = payload.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let mut reader = tcp;
    reader.read_to_end(&mut back)?;
    sender.join().expect("writer thread")?;
    Ok(back)
}

/// A legitimate client looping through the tunnel until stopped: (ok, failed).
pub struct Legit {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Legit {
    pub fn start(app: SocketAddr) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match round_trip(app, b"legitimate request") {
                        Ok(v) if v == b"legitimate request" => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Round trips through `app` until one comes back whole, for at most `within`; panics with
/// `what` and the last error otherwise. Returns how long it took.
pub fn wait_for_round_trip(app: SocketAddr, payload: &[u8], within: Duration, what: &str) -> Duration {
    let started = std::time::Instant::now();
    loop {
        match round_trip(app, payload) {
            Ok(v) if v == payload => return started.elapsed(),
            other => assert!(started.elapsed() < within, "{what}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
