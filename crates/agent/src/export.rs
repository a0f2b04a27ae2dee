//! Exporting the exact signed commit from the host's own mirror into a release directory.
//!
//! The mirror is the bare repository convoy-fetcher keeps at `<mirror_dir>/<repo>.git`. The
//! signed ref must still resolve to the signed commit: a tag moved after signing is refused.
//! When the ref or commit is not there yet, the agent fetches once (anonymously, from the
//! mirror's `origin`) and looks again.

use convoy_message::names::{RefName, Sha};
use git2::{FetchOptions, Oid, Repository, build::CheckoutBuilder};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no mirror at {0} (is convoy-fetcher configured for this repository?)")]
    NoMirror(PathBuf),
    #[error(
        "{git_ref} resolves to {found} in the mirror, not to the signed commit {expected}; refusing (a tag moved after signing?)"
    )]
    RefMoved {
        git_ref: String,
        expected: String,
        found: String,
    },
    #[error("{0} is not in the mirror, even after a fetch")]
    RefMissing(String),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error(transparent)]
    Ownership(#[from] crate::ownership::OwnershipError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ExportError {
    /// True when the command was refused for what it asked, not failed by the host.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ExportError::RefMoved { .. } | ExportError::RefMissing(_)
        )
    }
}

/// The mirror path of a repository.
pub fn mirror_path(mirror_dir: &Path, repo: &str) -> PathBuf {
    mirror_dir.join(format!("{repo}.git"))
}

/// Checks that `git_ref` resolves to `commit` (fetching once if needed), then writes the
/// commit's tree into `dest` (which must not exist yet). Blocking: run on a blocking thread.
pub fn export(
    mirror: &Path,
    git_ref: &RefName,
    commit: &Sha,
    dest: &Path,
) -> Result<bool, ExportError> {
    if !mirror.exists() {
        return Err(ExportError::NoMirror(mirror.to_owned()));
    }
    let repo = Repository::open_bare(mirror)?;
    let expected = Oid::from_str(commit.as_str())?;
    let mut fetched = false;
    let found = match resolve(&repo, git_ref) {
        // A mirror merely behind (the fetcher has not caught up) gets one fetch before a
        // ref that resolves elsewhere is called moved.
        Some(oid) if oid == expected && repo.find_commit(oid).is_ok() => oid,
        _ => {
            fetch(&repo)?;
            fetched = true;
            resolve(&repo, git_ref).ok_or_else(|| ExportError::RefMissing(git_ref.to_string()))?
        }
    };
    if found != expected {
        return Err(ExportError::RefMoved {
            git_ref: git_ref.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        });
    }
    let tree = repo.find_commit(expected)?.tree()?;
    std::fs::create_dir_all(dest).map_err(|source| ExportError::Io {
        path: dest.to_owned(),
        source,
    })?;
    let mut checkout = CheckoutBuilder::new();
    checkout.target_dir(dest).force().update_index(false);
    repo.checkout_tree(tree.as_object(), Some(&mut checkout))?;
    Ok(fetched)
}

fn resolve(repo: &Repository, git_ref: &RefName) -> Option<Oid> {
    let reference = repo.find_reference(git_ref.as_str()).ok()?;
    reference.peel_to_commit().ok().map(|c| c.id())
}

fn fetch(repo: &Repository) -> Result<(), git2::Error> {
    let mut remote = repo.find_remote("origin")?;
    // Bounded: the app's lock is held meanwhile.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.transfer_progress(|_| std::time::Instant::now() < deadline);
    callbacks.sideband_progress(|_| std::time::Instant::now() < deadline);
    let mut options = FetchOptions::new();
    options
        .prune(git2::FetchPrune::On)
        .remote_callbacks(callbacks);
    remote.fetch(
        &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
        Some(&mut options),
        None,
    )
}
