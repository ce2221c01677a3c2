//! The README's two-host install, executed literally with the installed package: two network
//! namespaces are web-1 (10.0.0.1: control plane and agent) and db-1 (10.0.0.2: agent and the
//! "database", an echo service on 127.0.0.1:5432). Each host is a root shell in its own mount
//! namespace with its own `/etc/tapproof` and `/var/lib/tapproof` (fresh directories with the
//! owners and modes the package gave the real ones), and a `systemctl` that runs the package's
//! unit files (tests/walkthrough/systemctl). The README's `<!-- walkthrough: ... -->` comments say
//! which block runs where; a block that fails fails the test with its output. Afterwards an app
//! on web-1 reaches db-1's database through 127.0.0.1:15432, and `systemctl reload` keeps it so.
//!
//! Needs root and the package installed (`.ci/run` and, as root, `scripts/test.sh` build and
//! install it); skipped otherwise, except under CI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use tapproof_test_util::netns::{spawn_ready, Netns, TwoHosts};

const EXE: &str = env!("CARGO_BIN_EXE_tapproof");
const DONE: &str = "__walkthrough_block_done__";

/// What a README comment asks for.
#[derive(Debug, PartialEq)]
enum Step {
    /// The package is installed (by CI, before the test: it is one machine's /usr).
    Installed(String),
    /// Run the block on a host, retrying it for up to `retry` until it succeeds.
    Run {
        host: String,
        retry: Duration,
        script: String,
    },
    /// Copy a file from one host's working directory to another's.
    Copy {
        from: (String, String),
        to: (String, String),
    },
}

fn steps(readme: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(directive) = line
            .trim()
            .strip_prefix("<!-- walkthrough:")
            .and_then(|d| d.strip_suffix("-->"))
        else {
            continue;
        };
        let words: Vec<&str> = directive.split_whitespace().collect();
        let block = |lines: &mut std::str::Lines| -> String {
            let fence = lines.next().unwrap_or_default();
            assert_eq!(
                fence.trim(),
                "```sh",
                "a walkthrough comment is followed by a ```sh block"
            );
            let mut script = String::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    return script;
                }
                script.push_str(l);
                script.push('\n');
            }
            panic!("unterminated block after <!-- walkthrough:{directive}-->");
        };
        match words.as_slice() {
            ["installed"] => steps.push(Step::Installed(block(&mut lines))),
            ["copy", from, to] => {
                let split = |s: &str| {
                    let (h, p) = s.split_once(':').expect("copy HOST:PATH HOST:PATH");
                    (h.to_owned(), p.to_owned())
                };
                steps.push(Step::Copy {
                    from: split(from),
                    to: split(to),
                });
            }
            [host, rest @ ..] => {
                let mut retry = Duration::ZERO;
                for r in rest {
                    let secs = r
                        .strip_prefix("retry=")
                        .and_then(|s| s.strip_suffix('s'))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("unknown walkthrough option {r}"));
                    retry = Duration::from_secs(secs);
                }
                steps.push(Step::Run {
                    host: host.to_string(),
                    retry,
                    script: block(&mut lines),
                });
            }
            [] => panic!("empty walkthrough comment"),
        }
    }
    steps
}

/// One host: a root bash in the host's network namespace and its own mount namespace.
struct Host {
    name: String,
    /// `<test dir>/<host>`: etc/, var/ (bind-mounted over the real ones), home/ (the shell's
    /// working directory), run/ (the systemctl stand-in's PIDs and unit output).
    dir: PathBuf,
    shell: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    blocks: usize,
}

/// A fresh directory with the owner and mode of `like` (a directory the package made).
fn dir_like(path: &Path, like: &str) {
    let meta = std::fs::metadata(like).unwrap_or_else(|e| panic!("{like}: {e} (is the package installed?)"));
    std::fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o7777)).unwrap();
}

impl Host {
    fn start(name: &str, ns: &Netns, root: &Path, shim: &Path) -> Self {
        let dir = root.join(name);
        dir_like(&dir.join("etc"), "/etc/tapproof");
        dir_like(&dir.join("var"), "/var/lib/tapproof");
        dir_like(&dir.join("var/agent"), "/var/lib/tapproof/agent");
        dir_like(&dir.join("var/server"), "/var/lib/tapproof/server");
        for d in ["home", "run", "bin"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(shim, dir.join("bin/systemctl")).unwrap();
        let mut shell = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["bash", "--noprofile", "--norc"])
            .current_dir(dir.join("home"))
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.join("bin").display()),
            )
            .env("HOME", dir.join("home"))
            .env("WALKTHROUGH_RUN", dir.join("run"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the host shell");
        let stdin = shell.stdin.take().unwrap();
        let stdout = BufReader::new(shell.stdout.take().unwrap());
        let mut host = Self {
            name: name.to_owned(),
            dir,
            shell,
            stdin,
            stdout,
            blocks: 0,
        };
        let d = host.dir.display().to_string();
        host.run(&format!(
            "mount --bind {d}/etc /etc/tapproof\nmount --bind {d}/var /var/lib/tapproof\n"
        ))
        .unwrap_or_else(|out| panic!("{name}: cannot mount its own directories:\n{out}"));
        host
    }

    /// Runs `script` (`set -euo pipefail`) in this host's shell; its output, or on failure the
    /// exit code and output.
    fn run(&mut self, script: &str) -> Result<String, String> {
        self.blocks += 1;
        let file = self.dir.join("run").join(format!("block-{}.sh", self.blocks));
        let log = file.with_extension("log");
        std::fs::write(&file, format!("set -euo pipefail\n{script}")).unwrap();
        writeln!(
            self.stdin,
            "bash {} >{} 2>&1; echo \"{DONE} $?\"",
            file.display(),
            log.display()
        )
        .unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "{}: the host shell ended", self.name);
            if let Some(code) = line.trim().strip_prefix(DONE) {
                let out = std::fs::read_to_string(&log).unwrap_or_default();
                return match code.trim() {
                    "0" => Ok(out),
                    c => Err(format!("exit {c}\n{out}")),
                };
            }
        }
    }

    /// The PIDs the systemctl stand-in started (the units' main processes).
    fn unit_pids(&self) -> Vec<(String, i32)> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir(self.dir.join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pid") {
                if let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                {
                    pids.push((path.file_stem().unwrap().to_string_lossy().into_owned(), pid));
                }
            }
        }
        pids
    }

    fn unit_log(&self, unit: &str) -> String {
        std::fs::read_to_string(self.dir.join("run").join(format!("{unit}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for (unit, _) in self.unit_pids() {
            all.push_str(&format!("--- {} {unit}:\n{}\n", self.name, self.unit_log(&unit)));
        }
        all
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Every unit process by the PID the stand-in recorded, then the shell.
        for (_, pid) in self.unit_pids() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..100 {
                if nix::sys::signal::kill(pid, None).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "tapproof"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
}

#[test]
fn the_readme_two_host_install_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let steps = steps(&readme);
    let hosts_named: Vec<&str> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Run { host, .. } => Some(host.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        hosts_named.contains(&"web-1") && hosts_named.contains(&"db-1"),
        "the README's walkthrough lost its blocks: {steps:?}"
    );
    if !tapproof_test_util::is_root() || !package_installed() {
        assert!(
            !tapproof_test_util::in_ci(),
            "CI must run the walkthrough as root with the package installed (.ci/run installs it)"
        );
        eprintln!("skipping: needs root and the tapproof package (cargo deb -p tapproof; apt-get install ./target/debian/tapproof_*.deb)");
        return;
    }

    let net = TwoHosts::with_addresses("walk", "10.0.0.1", "10.0.0.2");
    let root = tempfile::Builder::new()
        .prefix("tapproof-walkthrough-")
        .tempdir()
        .unwrap();
    let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/walkthrough/systemctl");
    // db-1's database: an echo service on its loopback.
    let _database = spawn_ready(
        &net.b,
        &[
            &tapproof_test_util::bench_exe(EXE),
            "echo-server",
            "--listen",
            "127.0.0.1:5432",
        ],
        "listening",
    );
    let mut web = Host::start("web-1", &net.a, root.path(), &shim);
    let mut db = Host::start("db-1", &net.b, root.path(), &shim);

    for step in &steps {
        match step {
            Step::Installed(script) => {
                assert!(script.contains("apt-get install"), "{script}");
                for unit in ["tapproof-agent.service", "tapproof-server.service"] {
                    assert!(
                        Path::new("/lib/systemd/system").join(unit).exists(),
                        "{unit} not installed"
                    );
                }
                let user = Command::new("id").args(["-u", "tapproof"]).output().unwrap();
                assert!(user.status.success(), "the package made no tapproof user");
                let etc = std::fs::metadata("/etc/tapproof").unwrap();
                assert_eq!(etc.mode() & 0o7777, 0o750);
                assert_eq!(etc.uid(), 0);
                for d in ["/var/lib/tapproof/agent", "/var/lib/tapproof/server"] {
                    assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o7777, 0o700, "{d}");
                }
            }
            Step::Copy { from, to } => {
                let host_dir = |h: &str| root.path().join(h).join("home");
                std::fs::copy(host_dir(&from.0).join(&from.1), host_dir(&to.0).join(&to.1))
                    .unwrap_or_else(|e| panic!("copy {from:?} to {to:?}: {e}"));
            }
            Step::Run { host, retry, script } => {
                let h = match host.as_str() {
                    "web-1" => &mut web,
                    "db-1" => &mut db,
                    other => panic!("the README names a host the test does not have: {other}"),
                };
                let deadline = Instant::now() + *retry;
                loop {
                    match h.run(script) {
                        Ok(out) => {
                            eprintln!("[{host}] ok:\n{script}{out}");
                            break;
                        }
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        Err(e) => panic!(
                            "[{host}] README block failed:\n{script}\n{e}\n{}{}",
                            web.logs(),
                            db.logs()
                        ),
                    }
                }
            }
        }
    }

    // What the steps left behind: the token and the agent's key are tapproof's, 0600.
    for h in [&web, &db] {
        for f in ["etc/join-token", "var/agent/node.key"] {
            let path = h.dir.join(f);
            let meta =
                std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), h.logs()));
            assert_eq!(meta.mode() & 0o777, 0o600, "{}", path.display());
        }
    }

    // An app on web-1 reaches the database on db-1 through the tunnel, found in the directory.
    let bench = tapproof_test_util::bench_exe(EXE);
    let send = |data: &str| {
        net.a
            .command(&[&bench, "send", "--connect", "127.0.0.1:15432", "--data", data])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while send("through the tunnel").as_deref() != Some("through the tunnel") {
        assert!(
            Instant::now() < deadline,
            "web-1 cannot reach db-1's database through 127.0.0.1:15432\n{}{}",
            web.logs(),
            db.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = web.run("tapproof status").unwrap();
    assert!(status.contains("spiffe://example.org/node/web-1"), "{status}");
    assert!(
        status.contains("spiffe://example.org/node/db-1"),
        "the tunnel to db-1 is listed: {status}"
    );

    // `systemctl reload` is a SIGHUP: the agents re-read their configs and keep serving.
    for h in [&mut web, &mut db] {
        h.run("systemctl reload tapproof-agent").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(web.unit_log("tapproof-agent").contains("config reloaded")
        && db.unit_log("tapproof-agent").contains("config reloaded"))
    {
        assert!(
            Instant::now() < deadline,
            "no reload logged\n{}{}",
            web.logs(),
            db.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        web.run("systemctl is-active tapproof-agent").is_ok(),
        "{}",
        web.logs()
    );
    assert_eq!(send("after the reload").as_deref(), Some("after the reload"));

    for h in [&mut web, &mut db] {
        h.run("systemctl stop tapproof-agent").unwrap();
    }
    web.run("systemctl stop tapproof-server").unwrap();
    assert!(
        web.unit_log("tapproof-server").contains("control plane stopped"),
        "{}",
        web.logs()
    );
}
