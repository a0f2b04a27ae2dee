//! Running `convoy-git` from a daemon: the request on its stdin, the reply from its stdout,
//! the helper in a process group of its own that is killed whole at the deadline.
//!
//! Why a process: libgit2 initialises OpenSSL and parses the system's CA bundle on first
//! use, and a fetch's buffers stay in the allocator afterwards. In a resident daemon that is
//! several MiB kept for good on every host; in a helper it is given back when the helper
//! exits. A process can also be killed: a fetch stuck in libgit2 (a server that stops
//! answering mid-pack) cannot be interrupted on a thread.

use crate::protocol::{GitError, Reply, Request};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The helper's file name; daemons find it beside their own executable.
pub const HELPER: &str = "convoy-git";
/// Overrides where the helper is (a path), for layouts where it is not beside the daemon.
pub const HELPER_ENV: &str = "CONVOY_GIT";

/// A reply larger than this is refused (a mirror's refs are far smaller).
const MAX_REPLY: u64 = 64 << 20;

/// Where the helper is: `$CONVOY_GIT`, else `convoy-git` beside the running executable.
pub fn helper_path() -> PathBuf {
    if let Some(path) = std::env::var_os(HELPER_ENV).filter(|p| !p.is_empty()) {
        return path.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(HELPER)))
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(HELPER))
}

/// The system's hashed CA directory, when the helper can be told to use it instead of the CA
/// bundle: libgit2 initialises OpenSSL with its default verify paths, which parses the whole
/// bundle file (`SSL_CERT_FILE`, ~140 certificates, ~70 ms here) in every helper before any
/// git work, while a hashed directory (`SSL_CERT_DIR`, kept by `update-ca-certificates` on
/// Debian) is consulted only for the issuer a server's certificate names. The same CAs are
/// trusted either way. `None` — the helper keeps OpenSSL's defaults — when `SSL_CERT_FILE` is
/// set (an operator's choice) or no hashed directory exists.
fn lazy_ca_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if std::env::var_os("SSL_CERT_FILE").is_some() {
            return None;
        }
        let dir = std::env::var_os("SSL_CERT_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs"));
        let hashed = std::fs::read_dir(&dir).ok()?.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // `<8 hex digits>.<n>`: what OpenSSL looks a CA up by.
            name.split_once('.').is_some_and(|(hash, n)| {
                hash.len() == 8
                    && hash.bytes().all(|b| b.is_ascii_hexdigit())
                    && n.parse::<u32>().is_ok()
            })
        });
        hashed.then_some(dir)
    })
    .clone()
}

/// Runs one request through the helper ([`helper_path`]). The helper and anything it started
/// are killed at `deadline`; dropping the future kills the helper too.
pub async fn run(request: &Request, deadline: Duration) -> Result<Reply, GitError> {
    run_with(&helper_path(), request, deadline).await
}

/// [`run`] with the helper at `path`.
pub async fn run_with(
    path: &Path,
    request: &Request,
    deadline: Duration,
) -> Result<Reply, GitError> {
    let op = request.op();
    let input = serde_json::to_vec(request)
        .map_err(|e| GitError::Helper(format!("encoding the {op} request: {e}")))?;
    let mut command = tokio::process::Command::new(path);
    // The daemon's own settings stay with it: `CONVOY_AMQP_URL` carries the broker password,
    // and the helper needs none of them. The rest (PATH, proxies, locale) it keeps.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONVOY_") {
            command.env_remove(name);
        }
    }
    if let Some(dir) = lazy_ca_dir() {
        command
            .env("SSL_CERT_FILE", "/dev/null")
            .env("SSL_CERT_DIR", dir);
    }
    // If the daemon dies without dropping the child (SIGKILL, the OOM killer, a watchdog
    // kill), the kernel kills the helper too: an orphan must not go on writing into a
    // mirror or a release directory that the restarted daemon is cleaning up. (The signal
    // follows the thread that spawned the helper: the daemons' runtime thread, which lives
    // as long as the daemon.)
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only makes two async-signal-safe system
    // calls (prctl, getppid) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died before the prctl took effect: do not start at all.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            GitError::Helper(format!(
                "cannot run {} for a {op}: {e} (it is installed beside the daemon; {HELPER_ENV} names another path)",
                path.display()
            ))
        })?;
    let pid = child.id();
    let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
    let work = async {
        let written = async {
            if let Some(mut stdin) = stdin {
                stdin.write_all(&input).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read = async {
            let mut out = Vec::new();
            if let Some(stdout) = stdout {
                stdout.take(MAX_REPLY).read_to_end(&mut out).await?;
            }
            Ok::<_, std::io::Error>(out)
        };
        let (written, read) = tokio::join!(written, read);
        let status = child.wait().await;
        (written, read, status)
    };
    let (written, read, status) = match tokio::time::timeout(deadline, work).await {
        Ok(done) => done,
        Err(_) => {
            // Not reaped yet, so the group id is still ours to signal.
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            let hint = match request {
                Request::Fetch { .. } => {
                    "the git server stopped answering, or the fetch needs longer: check the \
                     server, or raise fetch_timeout_s"
                }
                Request::Export { .. } => {
                    "the checkout from the mirror did not finish: check the disk under the \
                     releases directory and the mirror (`git fsck` in it)"
                }
            };
            return Err(GitError::Git(format!(
                "{op} killed at its deadline ({} s): {hint}",
                deadline.as_secs()
            )));
        }
    };
    let out = read.map_err(|e| GitError::Helper(format!("reading the {op} reply: {e}")))?;
    // A helper that wrote a reply has said what happened, whatever its exit status.
    if let Ok(reply) = serde_json::from_slice::<Reply>(&out) {
        return Ok(reply);
    }
    let status = status.map_err(|e| GitError::Helper(format!("waiting for the {op}: {e}")))?;
    let why = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "ended".to_owned(),
    };
    let write_note = match written {
        Err(e) => format!("; writing the request failed: {e}"),
        Ok(()) => String::new(),
    };
    Err(GitError::Helper(format!(
        "the {op} {why} without a reply{write_note}"
    )))
}
