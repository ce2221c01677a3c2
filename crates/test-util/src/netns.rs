//! Network namespaces joined by a veth pair: two "hosts" and the "fibre" between them. Every name
//! carries the test process's PID so parallel runs cannot collide, and everything is deleted on
//! drop. Addresses live only inside these namespaces.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Self {
        // A leftover from a crashed run with a recycled PID: remove it first.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec <name>`, to put before a command.
    pub fn prefix(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Two namespaces, `a` at `10.250.<n>.1/24` and `b` at `10.250.<n>.2/24`, joined by a veth pair.
pub struct TwoHosts {
    pub a: Netns,
    pub b: Netns,
    pub a_if: String,
    pub b_if: String,
    pub a_ip: String,
    pub b_ip: String,
}

impl TwoHosts {
    pub fn new(tag: &str) -> Self {
        let subnet = 1 + std::process::id() % 250;
        Self::with_addresses(tag, &format!("10.250.{subnet}.1"), &format!("10.250.{subnet}.2"))
    }

    /// Two namespaces at `a_ip/24` and `b_ip/24` (addresses that exist only inside them, so a
    /// test can use the README's 10.0.0.1 and 10.0.0.2).
    pub fn with_addresses(tag: &str, a_ip: &str, b_ip: &str) -> Self {
        let pid = std::process::id();
        let a = Netns::create(format!("tp-{tag}-{pid}-a"));
        let b = Netns::create(format!("tp-{tag}-{pid}-b"));
        // Interface names are limited to 15 bytes.
        let a_if = format!("tpa{}", pid % 1_000_000);
        let b_if = format!("tpb{}", pid % 1_000_000);
        let (a_ip, b_ip) = (a_ip.to_owned(), b_ip.to_owned());
        ip(&[
            "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns", &b.name,
        ]);
        a.exec_ok(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &a_if]);
        b.exec_ok(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &b_if]);
        a.exec_ok(&["ip", "link", "set", &a_if, "up"]);
        b.exec_ok(&["ip", "link", "set", &b_if, "up"]);
        Self {
            a,
            b,
            a_if,
            b_if,
            a_ip,
            b_ip,
        }
    }
}

/// A background process (in a namespace or not), killed by PID and reaped on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `args` in `ns` and waits for its first stdout line to start with `ready` (the line is
/// returned with the process).
pub fn spawn_ready(ns: &Netns, args: &[&str], ready: &str) -> (Background, String) {
    use std::io::BufRead;
    let mut child = ns.spawn(args);
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("spawn pipes stdout"))
        .read_line(&mut line)
        .expect("read the first line");
    let bg = Background(child);
    assert!(line.starts_with(ready), "{args:?} in {}: {line:?}", ns.name);
    (bg, line.trim_end().to_owned())
}

/// A capture of `iface` in `ns`, written to `file`, stopped by SIGINT (which flushes it).
pub struct Tcpdump {
    child: Option<Child>,
    file: std::path::PathBuf,
}

impl Tcpdump {
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> Self {
        let file_path = file.to_owned();
        // -Z root: keep privileges so tcpdump can write into the test's private temp dir.
        let mut child = ns
            .command(&[
                "tcpdump",
                "--immediate-mode",
                "-i",
                iface,
                "-U",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
                file.to_str().unwrap(),
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "tcpdump exited before capturing"
            );
            assert!(Instant::now() < deadline, "tcpdump did not start");
        }
        Self {
            child: Some(child),
            file: file_path,
        }
    }

    /// Waits until packets reached the file (the capture is asynchronous), then stops.
    pub fn stop(mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0) <= 24 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
