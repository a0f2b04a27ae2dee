//! Exporting the exact signed commit from the host's own mirror into a release directory.
//!
//! The mirror is the bare repository convoy-fetcher keeps at `<mirror_dir>/<repo>.git`. The
//! signed ref must still resolve to the signed commit: a tag moved after signing is refused.
//! When the ref or commit is not there yet, the agent fetches once (anonymously, from the
//! mirror's `origin`) and looks again. Runs inside the `convoy-git` helper.

use crate::protocol::{GitError, Reply};
use convoy_message::names::{RefName, Sha};
use git2::{FetchOptions, Oid, Repository, build::CheckoutBuilder};
use std::path::{Path, PathBuf};

/// The helper's `export` request.
pub fn serve(mirror: &Path, git_ref: &RefName, commit: &Sha, dest: &Path) -> Reply {
    match export(mirror, git_ref, commit, dest) {
        Ok(fetched) => Reply::Exported { fetched },
        Err(e) => Reply::Failed(e),
    }
}

/// The mirror path of a repository.
pub fn mirror_path(mirror_dir: &Path, repo: &str) -> PathBuf {
    mirror_dir.join(format!("{repo}.git"))
}

/// Checks that `git_ref` resolves to `commit` (fetching once if needed), then writes the
/// commit's tree into `dest` (which must not exist yet).
pub fn export(
    mirror: &Path,
    git_ref: &RefName,
    commit: &Sha,
    dest: &Path,
) -> Result<bool, GitError> {
    if !mirror.exists() {
        return Err(GitError::NoMirror(mirror.to_owned()));
    }
    let repo = Repository::open_bare(mirror).map_err(git)?;
    let expected = Oid::from_str(commit.as_str()).map_err(git)?;
    let mut fetched = false;
    let found = match resolve(&repo, git_ref) {
        // A mirror merely behind (the fetcher has not caught up) gets one fetch before a
        // ref that resolves elsewhere is called moved.
        Some(oid) if oid == expected && repo.find_commit(oid).is_ok() => oid,
        _ => {
            fetch(&repo).map_err(git)?;
            fetched = true;
            resolve(&repo, git_ref).ok_or_else(|| GitError::RefMissing(git_ref.to_string()))?
        }
    };
    if found != expected {
        return Err(GitError::RefMoved {
            git_ref: git_ref.to_string(),
            expected: expected.to_string(),
            found: found.to_string(),
        });
    }
    let tree = repo
        .find_commit(expected)
        .and_then(|c| c.tree())
        .map_err(git)?;
    // A new directory, never an existing one (the protocol's contract: the agent removes a
    // leftover first). A forced checkout into existing files would mix two trees.
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| GitError::Git(format!("creating {}: {e}", parent.display())))?;
    }
    std::fs::create_dir(dest).map_err(|e| {
        GitError::Git(format!(
            "creating {}: {e} (an export goes into a new directory only)",
            dest.display()
        ))
    })?;
    let mut checkout = CheckoutBuilder::new();
    checkout.target_dir(dest).force().update_index(false);
    repo.checkout_tree(tree.as_object(), Some(&mut checkout))
        .map_err(git)?;
    Ok(fetched)
}

fn git(e: git2::Error) -> GitError {
    GitError::Git(e.message().to_owned())
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
