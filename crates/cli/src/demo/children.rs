//! The demo's processes: each in a process group of its own (so a Ctrl-C in the terminal
//! reaches only the demo, which then stops them in order), output to a log file, and all
//! stopped — SIGTERM to the group, SIGKILL after a grace period — when the demo ends, by
//! whatever path.

use anyhow::Context;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// One process the demo started.
struct Running {
    name: String,
    child: Child,
    log: PathBuf,
    /// Stopped after the others (the broker: daemons say goodbye to it first).
    last: bool,
}

/// Every process the demo started.
pub struct Children {
    running: Vec<Running>,
    log_dir: PathBuf,
}

impl Children {
    pub fn new(log_dir: &Path) -> Self {
        Self {
            running: Vec::new(),
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// The log file of `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Starts `cmd` (its environment is what the caller set: see [`clean_command`]) in a
    /// process group of its own, output to `<log_dir>/<name>.log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
        self.spawn_inner(name, &mut cmd, false)
    }

    /// Like [`Children::spawn`], stopped after everything else.
    pub fn spawn_last(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
        self.spawn_inner(name, &mut cmd, true)
    }

    fn spawn_inner(&mut self, name: &str, cmd: &mut Command, last: bool) -> anyhow::Result<()> {
        let log = self.log_path(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        self.running.push(Running {
            name: name.to_owned(),
            child,
            log,
            last,
        });
        Ok(())
    }

    /// Fails, naming it and showing the end of its log, if a process has exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for r in &mut self.running {
            if let Ok(Some(status)) = r.child.try_wait() {
                anyhow::bail!(
                    "{} stopped unexpectedly ({status}); the end of {}:\n{}",
                    r.name,
                    r.log.display(),
                    tail(&r.log, 15)
                );
            }
        }
        Ok(())
    }

    /// Stops everything: SIGTERM to each process group, up to `grace` for them to exit
    /// (less once `hurry` says so), then SIGKILL; the processes marked `last` after the
    /// others.
    pub fn stop_all(&mut self, grace: Duration, hurry: &dyn Fn() -> bool) {
        let (last, first): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.last);
        for group in [first, last] {
            stop(group, grace, hurry);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(3), &|| false);
    }
}

fn stop(mut group: Vec<Running>, grace: Duration, hurry: &dyn Fn() -> bool) {
    for r in &group {
        let _ = killpg(pgid(&r.child), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !hurry() {
        group.retain_mut(|r| !matches!(r.child.try_wait(), Ok(Some(_))));
        if group.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in &mut group {
        let _ = killpg(pgid(&r.child), Signal::SIGKILL);
        let _ = kill(pgid(&r.child), Signal::SIGKILL);
        let _ = r.child.wait();
    }
}

fn pgid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32)
}

/// A command with a clean environment: `PATH`, `HOME`, `LANG`, `TZ` and nothing of the
/// caller's `CONVOY_*` settings (the demo's daemons get exactly what the demo gives them).
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for key in ["PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("CONVOY_LOG", "info,lapin=error")
        .env("NO_COLOR", "1");
    cmd
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Signals that end the demo: the first asks it to stop cleanly, a second one to hurry.
#[derive(Clone)]
pub struct Interrupt {
    count: Arc<AtomicU8>,
}

impl Interrupt {
    /// Catches SIGINT, SIGTERM and SIGHUP on a thread of its own and counts them. Caught
    /// signals go back to their default action in the programs the demo starts (exec resets
    /// handlers), unlike a blocked signal mask, which children would inherit.
    pub fn install() -> anyhow::Result<Self> {
        let count = Arc::new(AtomicU8::new(0));
        let seen = count.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(Err("cannot start the signal thread's runtime".to_owned()));
                return;
            };
            rt.block_on(async move {
                let kinds = [
                    (SignalKind::interrupt(), "SIGINT"),
                    (SignalKind::terminate(), "SIGTERM"),
                    (SignalKind::hangup(), "SIGHUP"),
                ];
                let mut streams = Vec::new();
                for (kind, name) in kinds {
                    match signal(kind) {
                        Ok(s) => streams.push((s, name)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("cannot catch {name}: {e}")));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                let [(int, a), (term, b), (hup, c)] = &mut streams[..] else {
                    return;
                };
                loop {
                    let name = tokio::select! {
                        _ = int.recv() => *a,
                        _ = term.recv() => *b,
                        _ = hup.recv() => *c,
                    };
                    let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        eprintln!("\nconvoy demo: {name}: stopping the fleet (again to hurry)");
                    }
                }
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { count }),
            Ok(Err(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => Err(anyhow::anyhow!("the signal thread did not start")),
        }
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Whether a second signal asked to hurry.
    pub fn hurry(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 1
    }

    /// An error if a stop was asked for (to end waits with `?`).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.requested() {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    /// Sleeps up to `d`, waking early on a stop request.
    pub fn sleep(&self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check()?;
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
        self.check()
    }
}

/// The demo was asked to stop (Ctrl-C): not a failure.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}
