//! The post-receive hook. It must never fail or stall a push: every wait is inside the
//! budget, anything unconfirmed is spooled, no child process holds the hook's stdout or
//! stderr (git ≥ 2.36 waits for them to close: the short `git` calls in [`crate::event`]
//! have their output captured and end first), and the exit status is always 0.

use crate::config::Config;
use crate::event::{parse_line, push_event};
use crate::spool::Spool;
use convoy_bus::{Bus, Outgoing, Publisher, Retry};
use convoy_message::names::Name;
use convoy_message::{Body, Message};
use std::path::Path;
use std::time::{Duration, Instant};

/// What happened to the events of one push.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub published: usize,
    pub spooled: usize,
    /// Lines that were not `old new ref` (reported, skipped).
    pub skipped: Vec<String>,
}

/// The repository's convoy name: configured, or the directory name without `.git`.
pub fn repo_name(
    config: &Config,
    override_name: Option<&str>,
    git_dir: &Path,
) -> Result<Name, String> {
    let raw = override_name
        .map(str::to_owned)
        .or_else(|| config.repo.clone())
        .or_else(|| {
            let dir = std::fs::canonicalize(git_dir).unwrap_or_else(|_| git_dir.to_owned());
            let name = dir.file_name()?.to_string_lossy().into_owned();
            let name = if name == ".git" {
                dir.parent()?.file_name()?.to_string_lossy().into_owned()
            } else {
                name
            };
            Some(name.trim_end_matches(".git").to_owned())
        })
        .ok_or("cannot tell the repository's name; pass --repo")?;
    Name::new(raw).map_err(|e| format!("{e}; pass --repo with a valid name"))
}

/// Publishes one event per line within the budget; spools what is not confirmed in time.
pub async fn run(config: &Config, name: &Name, input: &str, git_dir: &Path) -> Outcome {
    let started = Instant::now();
    let budget = Duration::from_millis(config.budget_ms);
    let mut outcome = Outcome::default();
    let repo = git_dir.join("objects").is_dir().then_some(git_dir);
    let pusher = ["GL_USERNAME", "GITEA_PUSHER_NAME", "REMOTE_USER", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let from = format!("hook@{}", host.trim());
    let mut messages = Vec::new();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        match parse_line(line) {
            Ok(update) => {
                let event = push_event(name, &update, repo, config.max_commits, pusher.clone());
                messages.push(Message::new(from.clone(), Body::Push(event)));
            }
            Err(e) => outcome.skipped.push(e.to_string()),
        }
    }
    let spool = Spool::open(&config.spool_dir).ok();
    let publisher = Bus::new(config.bus_config(), format!("convoy-hook@{}", host.trim()))
        .ok()
        .map(Publisher::new);
    // Older spooled events go first: a newer event must not overtake them.
    let mut blocked = match (&spool, &publisher) {
        (Some(spool), Some(p)) if !spool.is_empty() => {
            let left = budget.saturating_sub(started.elapsed());
            let deadline = std::time::Instant::now() + left;
            spool.drain(p, left, Some(deadline)).await.is_err() || !spool.is_empty()
        }
        _ => false,
    };
    for message in messages {
        let left = budget.saturating_sub(started.elapsed());
        if !blocked && let Some(p) = &publisher {
            let sent = match Outgoing::message(&message) {
                Ok(out) => p.publish(&out, Retry::within(left)).await.is_ok(),
                Err(_) => false,
            };
            if sent {
                outcome.published += 1;
                continue;
            }
            blocked = true;
        }
        let spooled = match (&spool, message.encode()) {
            (Some(spool), Ok(bytes)) => spool.put(&bytes, message.id).is_ok(),
            _ => false,
        };
        if spooled {
            outcome.spooled += 1;
        } else {
            eprintln!(
                "convoy: could not publish or spool the push event for {}; check {}",
                message_ref(&message),
                config.spool_dir.display()
            );
        }
    }
    outcome
}

fn message_ref(message: &Message) -> String {
    match &message.body {
        Body::Push(p) => p.git_ref.to_string(),
        _ => message.id.to_string(),
    }
}
