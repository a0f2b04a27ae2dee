//! Test support shared by convoy's integration tests. Everything here is real: a real
//! RabbitMQ (the shared one on 127.0.0.1:5672, or a private node a test may kill), real
//! `git`, real processes.
//!
//! # Layout
//!
//! - [`bus`]: [`TestBus`], a unique exchange per test on the shared broker, queues deleted on
//!   drop; [`Tap`], a throwaway queue that records what was published.
//! - [`broker`]: [`BrokerNode`], a private RabbitMQ node to stop, kill and restart.
//! - [`git`]: repositories made with the git CLI in temp dirs.
//! - [`https`]: [`GitHttpsServer`], git over HTTPS with Basic auth; [`TestCa`], a throwaway CA.
//! - [`process`]: [`Daemon`], a spawned binary with its log, killed on drop.
//! - [`wait_until`]: polling with a deadline, never a bare sleep.

pub mod broker;
pub mod bus;
pub mod git;
pub mod https;
pub mod process;

pub use broker::BrokerNode;
pub use bus::{Tap, TestBus};
pub use https::{GitHttpsServer, TestCa};
pub use process::Daemon;

use std::time::Duration;

/// A name no other test (or earlier run) uses: `<prefix>-<pid>-<random>`.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}-{}", std::process::id(), &id[..8])
}

/// The shared broker tests use, `CONVOY_TEST_AMQP_URL` or guest on 127.0.0.1:5672.
pub fn shared_amqp_url() -> String {
    std::env::var("CONVOY_TEST_AMQP_URL")
        .unwrap_or_else(|_| convoy_bus::DEFAULT_AMQP_URL.to_owned())
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released), and one no other test process
/// was given in the last ten minutes. Tests run as parallel processes that each pick ports
/// and bind them later (a private broker, seconds after): without the reservation, two
/// picked the same port, and a TLS test once reached another test's plain AMQP listener
/// ("received corrupt message of type InvalidContentType"). Reservations are files named
/// after the port in `$TMPDIR/convoy-test-ports`, made with `O_EXCL`.
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("convoy-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let mut port = 0;
    for _ in 0..50 {
        port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        let mark = dir.join(port.to_string());
        let stale = std::fs::metadata(&mark)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if stale {
            let _ = std::fs::remove_file(&mark);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&mark)
        {
            Ok(_) => return port,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // No reservations possible (a read-only temp dir): the bare pick.
            Err(_) => return port,
        }
    }
    port
}

/// The path of a binary of another workspace package (`CARGO_BIN_EXE_*` only names the
/// package's own). `cargo test --workspace` (what `scripts/test` runs) builds every package's
/// binaries before any test starts, so they are fresh; when a test is run alone and the binary
/// is missing, it is built here (`cargo build -p`, which resolves features differently and so
/// is not done when the binary exists: after changing another crate, run the workspace's tests
/// or build it first). Under any other profile (`cargo bench -p …` builds only its own
/// package's binaries) the binary is built once per process, so a benchmark never measures a
/// stale build of another crate.
pub fn workspace_bin(package: &str, name: &str) -> std::path::PathBuf {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    // target/<profile>/deps/<test binary> → target/<profile>/<name>
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.parent()).map(|d| d.to_path_buf()))
        .unwrap_or_else(|| "target/debug".into());
    let path = dir.join(name);
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let fresh = if profile == "debug" {
        path.exists()
    } else {
        built.contains(name)
    };
    if fresh {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", name]);
    if profile != "debug" {
        // `bench` is cargo's name for the profile whose output directory is `release`.
        let profile = if profile == "release" {
            "bench"
        } else {
            &profile
        };
        cmd.args(["--profile", profile]);
    }
    match cmd.status() {
        Ok(s) if s.success() => {
            built.insert(name.to_owned());
            path
        }
        other => panic!("building {name} for the test failed: {other:?}"),
    }
}
