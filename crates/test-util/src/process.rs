//! Real `tapproof agent` processes: started with a config written to disk, waited on through the
//! ready file the agent writes once every listener is bound, killed by PID when dropped.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The command prefix every test process starts under: a soft open-file limit of 1,024 (the
/// hard limit stays), what a fresh install gets.
pub const FRESH_FD_LIMIT: [&str; 2] = ["prlimit", "--nofile=1024:"];

/// The soft and hard open-file limits of process `pid`.
pub fn fd_limits(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (v[0], v[1])
}

/// Resident memory of a process, in KiB (VmRSS).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Descriptors process `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub struct AgentProcess {
    pub name: String,
    /// The config file it was started with (a reload test rewrites it).
    pub config_path: PathBuf,
    child: Child,
    log: PathBuf,
    ready: Value,
}

/// The `[identity]` section for paths written by `TestPki`.
pub fn identity_section(id: &crate::pki::IdentityPaths) -> String {
    format!(
        "[identity]\ncert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\nreload_interval = \"200ms\"\n",
        id.cert.display(),
        id.key.display(),
        id.bundle.display()
    )
}

impl AgentProcess {
    /// Writes `config` to `<dir>/<name>.toml` and starts the agent; panics with the agent's log if
    /// it exits or does not become ready.
    pub fn start(exe: &str, dir: &Path, name: &str, config: &str) -> Self {
        Self::start_with(exe, dir, name, config, &[])
    }

    /// Like `start`, with a command prefix (e.g. `ip netns exec NS`).
    pub fn start_with(exe: &str, dir: &Path, name: &str, config: &str, prefix: &[&str]) -> Self {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let ready_file = dir.join(format!("{name}.ready.json"));
        let _ = std::fs::remove_file(&ready_file);
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).unwrap();
        // Started with a soft limit of 1,024 open files, as a shell or a unit without
        // LimitNOFILE gives a fresh install (the agent raises it itself).
        let mut argv: Vec<&str> = prefix.to_vec();
        argv.extend(FRESH_FD_LIMIT);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).arg(exe);
        cmd.arg("agent")
            .arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("--log-level")
            .arg("debug,h2=info,rustls=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut child = cmd.spawn().expect("start tapproof agent");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                if let Ok(ready) = serde_json::from_str(&text) {
                    return Self {
                        config_path,
                        name: name.into(),
                        child,
                        log,
                        ready,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "agent {name} exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {name} not ready in 30 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn addr(&self, pointer: &str) -> SocketAddr {
        self.ready
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no {pointer} in ready file"))
            .parse()
            .unwrap()
    }

    pub fn admin(&self) -> SocketAddr {
        self.addr("/admin")
    }

    pub fn tunnel(&self) -> SocketAddr {
        self.addr("/tunnel")
    }

    pub fn outbound(&self, index: usize) -> SocketAddr {
        self.addr(&format!("/outbound/{index}/listen"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin endpoint; returns (status code, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin(), path)
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"` pairs).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.admin_get("/v1/status").1).unwrap()
    }

    /// Polls `cond` on the metrics text until it holds (panics with the log after `within`).
    pub fn wait_for(&self, what: &str, within: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGTERM, then waits for exit.
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        self.terminate_ref(within)
    }

    /// Like `terminate`, for a process held in a struct field.
    pub fn terminate_ref(&mut self, within: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit in {within:?}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name && labels.iter().all(|want| series.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A blocking HTTP/1.0 GET (the admin endpoint is plain HTTP on loopback).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// Runs a `tapproof` subcommand to completion; returns (exit code, stdout, stderr).
pub fn run_tapproof(exe: &str, args: &[&str]) -> (i32, String, String) {
    run_tapproof_in(&[], exe, args)
}

/// Like `run_tapproof`, after a command prefix (e.g. `ip netns exec NS`).
pub fn run_tapproof_in(prefix: &[&str], exe: &str, args: &[&str]) -> (i32, String, String) {
    let mut argv = prefix.to_vec();
    argv.push(exe);
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
