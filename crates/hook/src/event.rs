//! Turning git's `old new ref` lines into push events, with the repository at hand to tell
//! a force-push from a fast-forward and to list the commits.

use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{CommitSummary, PushChange, PushEvent, RefKind};
use std::path::Path;
use std::process::{Command, Stdio};

/// Why a line of hook input could not become an event.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("expected `<old> <new> <ref>`, got {0:?}")]
    Shape(String),
    #[error("{0}")]
    Name(#[from] convoy_message::names::NameError),
}

/// One parsed line of post-receive input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefUpdate {
    pub old: Sha,
    pub new: Sha,
    pub git_ref: RefName,
}

pub fn parse_line(line: &str) -> Result<RefUpdate, LineError> {
    let mut parts = line.split_whitespace();
    let (Some(old), Some(new), Some(git_ref), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(LineError::Shape(line.chars().take(200).collect()));
    };
    Ok(RefUpdate {
        old: Sha::new(old)?,
        new: Sha::new(new)?,
        git_ref: RefName::new(git_ref)?,
    })
}

/// Builds the event for one ref update. `git_dir` (when the hook runs beside the
/// repository) tells forced from updated and supplies the commits, newest first, at most
/// `max_commits`.
///
/// The git CLI answers these two questions: linking libgit2 into the hook would cost every
/// push its TLS initialisation (it loads the whole CA bundle, ~50 ms) for nothing.
pub fn push_event(
    name: &Name,
    update: &RefUpdate,
    git_dir: Option<&Path>,
    max_commits: usize,
    pusher: Option<String>,
) -> PushEvent {
    let change = if update.old.is_zero() {
        PushChange::Created
    } else if update.new.is_zero() {
        PushChange::Deleted
    } else if git_dir.is_some_and(|d| !is_ancestor(d, &update.old, &update.new)) {
        PushChange::Forced
    } else {
        PushChange::Updated
    };
    let (commits, truncated) = match (git_dir, change) {
        (Some(d), PushChange::Created | PushChange::Updated | PushChange::Forced) => {
            commits(d, update, max_commits)
        }
        _ => (Vec::new(), false),
    };
    PushEvent {
        repo: name.clone(),
        ref_kind: RefKind::of(&update.git_ref),
        git_ref: update.git_ref.clone(),
        old: update.old.clone(),
        new: update.new.clone(),
        change,
        commits,
        truncated,
        pusher,
    }
}

/// `git` with the hook's repository, no user config, output captured (never the hook's
/// own stdout or stderr: git waits for those to close).
fn git(git_dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("--git-dir")
        .arg(git_dir)
        .args(["-c", "log.showSignature=false"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

fn is_ancestor(git_dir: &Path, old: &Sha, new: &Sha) -> bool {
    let status = git(git_dir)
        .args(["merge-base", "--is-ancestor", old.as_str(), new.as_str()])
        .status();
    // 1 means "not an ancestor"; anything else unexpected is not called a force-push.
    !matches!(status.map(|s| s.code()), Ok(Some(1)))
}

/// Commits reachable from `new` and not from `old` (for a created ref: not from any other
/// branch or tag), newest first.
fn commits(git_dir: &Path, update: &RefUpdate, max: usize) -> (Vec<CommitSummary>, bool) {
    let mut cmd = git(git_dir);
    cmd.args([
        "log",
        "--format=%H%x1f%an%x1f%s",
        &format!("--max-count={}", max + 1),
    ])
    .arg(update.new.as_str())
    .arg("--not");
    if update.old.is_zero() {
        // Not `--all`: it includes HEAD, which usually is the very ref just created.
        // `--exclude` takes the name without refs/heads/ or refs/tags/ and applies to the
        // next pattern only.
        for (prefix, pattern) in [("refs/heads/", "--branches"), ("refs/tags/", "--tags")] {
            if let Some(name) = update.git_ref.as_str().strip_prefix(prefix) {
                cmd.arg(format!("--exclude={name}"));
            }
            cmd.arg(pattern);
        }
    } else {
        cmd.arg(update.old.as_str());
    }
    cmd.arg("--");
    let Ok(out) = cmd.output() else {
        return (Vec::new(), false);
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut commits: Vec<CommitSummary> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split('\u{1f}');
            Some(CommitSummary {
                sha: Sha::new(f.next()?).ok()?,
                author: f.next().unwrap_or("").chars().take(200).collect(),
                summary: f.next().unwrap_or("").chars().take(500).collect(),
            })
        })
        .collect();
    let truncated = commits.len() > max;
    commits.truncate(max);
    (commits, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_validated() {
        let z = "0".repeat(40);
        let a = "a".repeat(40);
        assert!(parse_line(&format!("{z} {a} refs/heads/main")).is_ok());
        assert!(parse_line(&format!("{z} {a}")).is_err());
        assert!(parse_line(&format!("{z} {a} refs/heads/../x")).is_err());
        assert!(parse_line(&format!("{z} nothex refs/heads/main")).is_err());
    }

    #[test]
    fn created_and_deleted_without_a_repository() {
        let name = Name::new("web").unwrap();
        let z = "0".repeat(40);
        let a = "a".repeat(40);
        let created = parse_line(&format!("{z} {a} refs/tags/v1")).unwrap();
        let e = push_event(&name, &created, None, 10, None);
        assert_eq!(e.change, PushChange::Created);
        assert_eq!(e.ref_kind, RefKind::Tag);
        let deleted = parse_line(&format!("{a} {z} refs/heads/x")).unwrap();
        assert_eq!(
            push_event(&name, &deleted, None, 10, None).change,
            PushChange::Deleted
        );
    }
}
