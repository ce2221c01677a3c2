//! The helpers the namespace tests and bench/ rely on, run as processes: the echo server answers
//! a one-shot client with exactly its bytes (half-close carried), and the relay carries the same
//! through itself. (Being an integration test also makes `cargo test --workspace` build the
//! binary the other crates' tests run.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof-bench");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a helper that prints `listening ADDR` and returns it with that address.
fn listening(args: &[&str]) -> (Killed, String) {
    let mut child = Command::new(EXE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .to_owned();
    (Killed(child), addr)
}

fn send(to: &str, data: &str) -> String {
    let out = Command::new(EXE)
        .args(["send", "--connect", to, "--data", data])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn echo_and_relay_carry_every_byte() {
    let (_echo, echo) = listening(&["echo-server", "--listen", "127.0.0.1:0"]);
    assert_eq!(send(&echo, "through the echo"), "through the echo\n");
    let (_relay, relay) = listening(&["relay", "--listen", "127.0.0.1:0", "--to", &echo]);
    assert_eq!(send(&relay, "through the relay"), "through the relay\n");
}
