//! Shared by the fetcher's integration tests: a real `convoy-fetcher` process and its reports.
// Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, FetchReport, Message, PushChange, PushEvent, RefKind};
use convoy_testkit::{Daemon, Tap, TestBus};
use std::path::Path;
use std::time::Duration;

/// Starts a fetcher for `host` with the config `toml` (and `env` on top of the bus's), and a
/// tap on that host's reports about the repo `web`, bound before the fetcher starts so its
/// catch-up report is caught.
pub async fn start_fetcher(
    tb: &TestBus,
    dir: &Path,
    host: &str,
    toml: &str,
    env: &[(String, String)],
) -> anyhow::Result<(Daemon, Tap)> {
    let tap = tb.tap(&[&format!("fetch.web.{host}")]).await?;
    let path = dir.join(format!("{host}.toml"));
    std::fs::write(&path, toml)?;
    tb.track(format!("{}.fetcher.{host}", tb.exchange));
    let mut all_env = tb.env();
    all_env.extend_from_slice(env);
    // The fetcher runs convoy-git (beside it) for each fetch.
    convoy_testkit::workspace_bin("convoy-git", "convoy-git");
    let daemon = Daemon::spawn(
        host,
        Path::new(env!("CARGO_BIN_EXE_convoy-fetcher")),
        &["--config", &path.to_string_lossy()],
        &all_env,
        dir,
    )?;
    Ok((daemon, tap))
}

pub async fn next_report(tap: &mut Tap, timeout: Duration) -> anyhow::Result<FetchReport> {
    match tap.next(timeout).await?.message()?.body {
        Body::Fetch(r) => Ok(r),
        other => anyhow::bail!("not a fetch report: {other:?}"),
    }
}

/// A push event for `refs/heads/main` of `web`, now at `sha`.
pub fn push_event(sha: &str) -> anyhow::Result<Message> {
    Ok(Message::new(
        "hook@test",
        Body::Push(PushEvent {
            repo: Name::new("web")?,
            git_ref: RefName::new("refs/heads/main")?,
            ref_kind: RefKind::Branch,
            old: Sha::zero(),
            new: Sha::new(sha)?,
            change: PushChange::Updated,
            commits: vec![],
            truncated: false,
            pusher: None,
        }),
    ))
}
