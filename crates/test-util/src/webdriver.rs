//! Just enough of the W3C WebDriver protocol to drive Debian's chromium through chromedriver:
//! start a headless session, open a page, run a script, take a screenshot. chromedriver and the
//! browser it starts are stopped when the `Browser` is dropped.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

/// The chromium and chromedriver executables, if installed.
pub fn find() -> Option<(String, String)> {
    let which = |names: &[&str]| {
        names.iter().find_map(|n| {
            ["/usr/bin", "/usr/local/bin", "/snap/bin"]
                .iter()
                .map(|d| format!("{d}/{n}"))
                .find(|p| std::path::Path::new(p).exists())
        })
    };
    Some((
        which(&["chromium", "chromium-browser"])?,
        which(&["chromedriver"])?,
    ))
}

/// One HTTP/1.1 exchange with chromedriver (it answers with Content-Length).
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut tcp = TcpStream::connect(addr).expect("connect to chromedriver");
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly Content-Length bytes (chromedriver may keep the connection).
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "chromedriver closed before answering {method} {path}");
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("chromedriver answered without Content-Length: {head}"));
    while raw.len() < head_end + 4 + length {
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "chromedriver closed mid-answer");
        raw.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&raw[head_end + 4..head_end + 4 + length]).to_string();
    serde_json::from_str(&rest).unwrap_or_else(|e| panic!("chromedriver answered {head}: {rest} ({e})"))
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless chromium session.
    pub fn start(chromium: &str, chromedriver: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut browser = Self {
            driver,
            addr,
            session: String::new(),
        };
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1500"]
            }
        }}});
        let v = call(addr, "POST", "/session", Some(&caps));
        browser.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        browser
    }

    pub fn open(&self, url: &str) {
        let v = call(
            self.addr,
            "POST",
            &format!("/session/{}/url", self.session),
            Some(&json!({ "url": url })),
        );
        assert!(v["value"].is_null(), "navigate to {url}: {v}");
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub fn run(&self, script: &str) -> Value {
        let v = call(
            self.addr,
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(&json!({ "script": script, "args": [] })),
        );
        v["value"].clone()
    }

    /// Waits until `script` returns something other than null.
    pub fn wait_for(&self, script: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.run(script);
            if !v.is_null() {
                return v;
            }
            assert!(Instant::now() < deadline, "page never satisfied: {script}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let v = call(
            self.addr,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        );
        base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().expect("base64 screenshot"))
            .expect("valid base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(|| {
                call(self.addr, "DELETE", &format!("/session/{}", self.session), None)
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
