//! Helpers shared by the end-to-end tests: locating the workspace's binaries and the test
//! virtualenv's Python, starting real processes, and cleaning them up.

pub mod consortium;
pub mod loadgen;
pub mod metrics_check;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Every file below `dir`, recursively (for scans of what a process wrote).
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of this workspace, built next to the test executable (`cargo test --workspace`
/// builds every package's binaries before it runs any test).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary of this crate (the load
    // generator) is in target/<profile> itself.
    let parent = exe.parent().expect("an executable is in a directory");
    let dir = if parent.ends_with("deps") {
        parent.parent().expect("target/<profile>/deps has a parent")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// The Python of the test virtualenv (`TUTELA_PYTHON`, else `.venv/bin/python` in the repository),
/// which the README's test command sets up with the packages in tests/python/requirements.txt.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TUTELA_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run ./scripts/test.sh, which creates the test virtualenv",
        p.display()
    );
    p
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free loopback port (bound then released; the tests bind it again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr} after {timeout:?}");
}

/// A child process that is killed when the guard is dropped, so a failing test leaves no
/// server running.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends a signal (e.g. `HUP`, `KILL`) with the system's `kill` command.
    pub fn signal(&self, sig: &str) {
        run_ok(
            Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(self.pid().to_string()),
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the log file `path` holds `needle` at least `count` times, and returns the log;
/// fails the test naming the file after `timeout`.
pub fn wait_for_log(path: &Path, needle: &str, count: usize, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.matches(needle).count() >= count {
            return log;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} not {count} time(s) in {} after {timeout:?}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The events of `action` in the audit database `db` (SQLite file), read with
/// `tutela audit log --database-url ... --json`, oldest first.
pub fn audit_events(db: &Path, action: &str) -> Vec<serde_json::Value> {
    let url = format!("sqlite://{}", db.display());
    let out = run_ok(Command::new(bin("tutela")).args([
        "audit",
        "log",
        "--database-url",
        &url,
        "--action",
        action,
        "--json",
    ]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON event per line"))
        .collect()
}
