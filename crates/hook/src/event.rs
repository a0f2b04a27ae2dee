//! Turning git's `old new ref` lines into push events, with the repository at hand to tell
//! a force-push from a fast-forward and to list the commits.

use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{CommitSummary, PushChange, PushEvent, RefKind};
use git2::{Oid, Repository};

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

/// Builds the event for one ref update. `repo` (when the hook runs inside the repository)
/// tells forced from updated and supplies the commits, newest first, at most `max_commits`.
pub fn push_event(
    name: &Name,
    update: &RefUpdate,
    repo: Option<&Repository>,
    max_commits: usize,
    pusher: Option<String>,
) -> PushEvent {
    let change = if update.old.is_zero() {
        PushChange::Created
    } else if update.new.is_zero() {
        PushChange::Deleted
    } else if repo.is_some_and(|r| !is_ancestor(r, &update.old, &update.new)) {
        PushChange::Forced
    } else {
        PushChange::Updated
    };
    let (commits, truncated) = match (repo, change) {
        (Some(r), PushChange::Created | PushChange::Updated | PushChange::Forced) => {
            commits(r, update, max_commits)
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

fn is_ancestor(repo: &Repository, old: &Sha, new: &Sha) -> bool {
    let (Ok(old), Ok(new)) = (Oid::from_str(old.as_str()), Oid::from_str(new.as_str())) else {
        return true;
    };
    old == new || repo.graph_descendant_of(new, old).unwrap_or(true)
}

/// Commits reachable from `new` and not from `old` (for a created ref: not from any other
/// branch or tag), newest first.
fn commits(repo: &Repository, update: &RefUpdate, max: usize) -> (Vec<CommitSummary>, bool) {
    let walk = || -> Result<(Vec<CommitSummary>, bool), git2::Error> {
        let mut revwalk = repo.revwalk()?;
        revwalk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME)?;
        let new = Oid::from_str(update.new.as_str())?;
        let new = repo.find_object(new, None)?.peel_to_commit()?.id();
        revwalk.push(new)?;
        if update.old.is_zero() {
            for reference in repo.references()?.flatten() {
                if reference.name().ok() == Some(update.git_ref.as_str()) {
                    continue;
                }
                if let Ok(c) = reference.peel_to_commit() {
                    let _ = revwalk.hide(c.id());
                }
            }
        } else if let Ok(old) = Oid::from_str(update.old.as_str())
            && let Ok(old) = repo.find_object(old, None).and_then(|o| o.peel_to_commit())
        {
            revwalk.hide(old.id())?;
        }
        let mut out = Vec::new();
        let mut truncated = false;
        for oid in revwalk {
            let oid = oid?;
            if out.len() == max {
                truncated = true;
                break;
            }
            let commit = repo.find_commit(oid)?;
            let Ok(sha) = Sha::new(oid.to_string()) else {
                continue;
            };
            out.push(CommitSummary {
                sha,
                author: commit
                    .author()
                    .name()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect(),
                summary: commit
                    .summary()
                    .ok()
                    .flatten()
                    .unwrap_or("")
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        Ok((out, truncated))
    };
    walk().unwrap_or_default()
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
