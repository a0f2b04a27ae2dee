//! Running an app's hooks: no shell interpolation of message fields (context travels in
//! `CONVOY_*` variables), a fresh process group per hook, a timeout that kills the whole
//! group, the configured user, and a bounded tail of the combined output.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How much of a hook's output is kept for the result.
pub const TAIL_BYTES: usize = 8 * 1024;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How one hook run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRun {
    /// The exit status; `None` when killed by a signal or never started.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
    pub output_tail: String,
    /// Why it could not even start (missing program, bad user…).
    pub spawn_error: Option<String>,
}

impl HookRun {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// One line for logs and result errors.
    pub fn describe(&self, what: &str) -> String {
        if let Some(e) = &self.spawn_error {
            format!("{what} could not start: {e}")
        } else if self.timed_out {
            format!(
                "{what} timed out after {:?}; its process group was killed",
                self.duration
            )
        } else {
            match self.exit_code {
                Some(0) => format!("{what} succeeded"),
                Some(code) => format!("{what} exited with status {code}"),
                None => format!("{what} was killed by a signal"),
            }
        }
    }
}

/// Where and how a hook runs.
pub struct HookEnv<'a> {
    pub cwd: &'a Path,
    /// `CONVOY_*` context and the app's own variables.
    pub vars: &'a [(String, String)],
    pub user: Option<&'a User>,
    pub timeout: Duration,
    /// Told the process group id as soon as the hook started (the journal keeps it, so a
    /// restarted agent can kill a hook its predecessor left running).
    pub on_spawn: Option<&'a (dyn Fn(i32) + Sync)>,
}

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > TAIL_BYTES * 2 {
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }

    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(TAIL_BYTES);
        let mut slice = &self.bytes[start..];
        if start > 0
            && let Some(nl) = slice.iter().position(|b| *b == b'\n')
        {
            slice = &slice[nl + 1..];
        }
        String::from_utf8_lossy(slice).into_owned()
    }
}

/// Runs `argv` and waits for it, at most `env.timeout`.
pub async fn run(argv: &[String], env: &HookEnv<'_>) -> HookRun {
    let started = Instant::now();
    let failed = |e: String| HookRun {
        exit_code: None,
        timed_out: false,
        duration: started.elapsed(),
        output_tail: String::new(),
        spawn_error: Some(e),
    };
    let Some((program, args)) = argv.split_first() else {
        return failed("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(env.cwd)
        .env_clear()
        .env("PATH", PATH)
        .env("LANG", "C.UTF-8")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match env.user {
        Some(user) => {
            cmd.uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
        }
        None => {
            cmd.env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| "/".into()),
            );
        }
    }
    cmd.envs(env.vars.iter().map(|(k, v)| (k, v)));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("{program}: {e}")),
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    if let (Some(pgid), Some(on_spawn)) = (pgid, env.on_spawn) {
        on_spawn(pgid.as_raw());
    }
    let tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(pump(out, tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(pump(err, tail.clone())));
    }

    let (status, timed_out) = match tokio::time::timeout(env.timeout, child.wait()).await {
        Ok(status) => (status.ok(), false),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGTERM);
            }
            let status = match tokio::time::timeout(Duration::from_secs(3), child.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await.ok()
                }
            };
            (status, true)
        }
    };
    if timed_out && let Some(pgid) = pgid {
        // Children that ignored SIGTERM, or that the leader left behind; wait (bounded)
        // until the group is really gone, so nothing of it races the next step.
        let _ = killpg(pgid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while group_alive(pgid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // A background child may hold the pipes open: read what is there, then stop.
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_millis(500), reader)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let output_tail = tail.lock().map(|t| t.text()).unwrap_or_default();
    HookRun {
        exit_code: status.and_then(|s| s.code()),
        timed_out,
        duration: started.elapsed(),
        output_tail,
        spawn_error: None,
    }
}

/// Whether any process of the group still exists (zombies awaiting their reaper count as
/// gone: they run nothing).
fn group_alive(pgid: Pid) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // Fields after the command name: state, ppid, pgrp, …
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid.as_raw()) && state != "Z" && state != "X"
    })
}

async fn pump(mut from: impl AsyncReadExt + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path, timeout_ms: u64) -> HookEnv<'_> {
        HookEnv {
            cwd: dir,
            vars: &[],
            user: None,
            timeout: Duration::from_millis(timeout_ms),
            on_spawn: None,
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_codes_and_output_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let run = run(
            &sh("echo out; echo err >&2; exit 3"),
            &env(dir.path(), 5000),
        )
        .await;
        assert_eq!(run.exit_code, Some(3));
        assert!(!run.ok());
        assert!(run.output_tail.contains("out") && run.output_tail.contains("err"));
    }

    #[tokio::test]
    async fn context_arrives_as_variables_not_interpolation() {
        let dir = tempfile::tempdir().unwrap();
        let vars = [(
            "CONVOY_REF".to_owned(),
            "refs/tags/$(touch pwned)".to_owned(),
        )];
        let e = HookEnv {
            vars: &vars,
            ..env(dir.path(), 5000)
        };
        let run = run(&sh("printf '%s' \"$CONVOY_REF\""), &e).await;
        assert!(run.ok());
        assert_eq!(run.output_tail, "refs/tags/$(touch pwned)");
        assert!(!dir.path().join("pwned").exists());
    }

    #[tokio::test]
    async fn a_hanging_hook_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let run = run(&sh(&script), &env(dir.path(), 500)).await;
        assert!(run.timed_out);
        assert!(!run.ok());
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone (or a zombie about to be reaped by init).
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false);
        assert!(!alive, "child {pid} survived the timeout");
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let run = run(&["/nonexistent/deploy".to_owned()], &env(dir.path(), 1000)).await;
        assert!(run.describe("build").contains("/nonexistent/deploy"));
    }
}
