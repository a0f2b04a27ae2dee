//! `convoy-git`: does one git operation for convoy-fetcher or convoy-agent and exits. Reads
//! one JSON request on stdin and writes one JSON reply on stdout (see
//! `convoy_git::protocol`); not meant to be run by hand, though it can be:
//!
//! ```sh
//! echo '{"op":"fetch","mirror":"/tmp/web.git","repo":{"url":"https://…"},"timeout_s":60}' | convoy-git
//! ```

use convoy_git::protocol::{GitError, Reply, Request};
use convoy_git::{export, mirror};
use std::io::{Read, Write};
use std::process::ExitCode;

/// The longest request accepted (a request is a few hundred bytes).
const MAX_REQUEST: u64 = 1 << 20;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--version" | "-V") => {
            println!("convoy-git {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(_) => {
            eprintln!(
                "convoy-git does one git operation for convoy-fetcher or convoy-agent: it reads a \
                 JSON request on stdin and answers on stdout, and takes no arguments but --version"
            );
            return ExitCode::from(64);
        }
    }
    let mut input = Vec::new();
    let reply = match std::io::stdin().take(MAX_REQUEST).read_to_end(&mut input) {
        Err(e) => Reply::Failed(GitError::Helper(format!("reading the request: {e}"))),
        Ok(_) => match serde_json::from_slice::<Request>(&input) {
            Err(e) => Reply::Failed(GitError::Helper(format!(
                "not a request convoy-git understands: {e}"
            ))),
            Ok(Request::Fetch {
                mirror,
                repo,
                timeout_s,
            }) => mirror::serve(&mirror, &repo, timeout_s),
            Ok(Request::Export {
                mirror,
                git_ref,
                commit,
                dest,
            }) => export::serve(&mirror, &git_ref, &commit, &dest),
        },
    };
    let text = match serde_json::to_string(&reply) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("convoy-git: encoding the reply: {e}");
            return ExitCode::from(70);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(74);
    }
    match reply {
        Reply::Failed(_) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}
