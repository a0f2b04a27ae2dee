//! Exporting the exact signed commit from the host's own mirror into a release directory,
//! through the `convoy-git` helper (libgit2 in a process of its own: see `convoy_git`), then
//! linking the shared paths and handing the release to the app's user.
//!
//! The mirror is the bare repository convoy-fetcher keeps at `<mirror_dir>/<repo>.git`. The
//! signed ref must still resolve to the signed commit: a tag moved after signing is refused.
//! When the ref or commit is not there yet, the helper fetches once (anonymously, from the
//! mirror's `origin`) and looks again.

use crate::ownership::{self, Owner};
use convoy_git::{GitError, Reply, Request};
use convoy_message::names::{RefName, ReleaseId, Sha};
use convoy_release::AppRoot;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest an export may take, a fetch from the mirror's origin included; the helper is
/// killed after it (the app's lock is held meanwhile).
pub const EXPORT_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Ownership(#[from] ownership::OwnershipError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ExportError {
    /// True when the command was refused for what it asked, not failed by the host.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ExportError::Git(e) if e.is_refusal())
    }
}

/// The mirror path of a repository.
pub fn mirror_path(mirror_dir: &Path, repo: &str) -> PathBuf {
    mirror_dir.join(format!("{repo}.git"))
}

/// What one release is made from.
pub struct Source {
    pub mirror: PathBuf,
    pub git_ref: RefName,
    pub commit: Sha,
}

/// The export step: the commit's tree into `releases/<id>/`, the shared paths linked in,
/// and — when the app has a `user` and the agent is root — the new release and the shared
/// directories the agent made handed to that user, so that hooks running as the user can
/// write into their own release. Returns whether the mirror was fetched first.
pub async fn export_release(
    source: Source,
    root: &AppRoot,
    id: &ReleaseId,
    shared: &[String],
    user: Option<&str>,
) -> Result<bool, ExportError> {
    // An unknown user fails the deploy before anything is written.
    let owner = Owner::for_app(user)?;
    let request = Request::Export {
        mirror: source.mirror,
        git_ref: source.git_ref,
        commit: source.commit,
        dest: root.release_dir(id),
    };
    let fetched = match convoy_git::client::run(&request, EXPORT_DEADLINE).await? {
        Reply::Exported { fetched } => fetched,
        Reply::Failed(e) => return Err(e.into()),
        other => {
            return Err(GitError::Helper(format!("answered an export with {other:?}")).into());
        }
    };
    let (root, id, shared) = (root.clone(), id.clone(), shared.to_vec());
    let release = root.release_dir(&id);
    tokio::task::spawn_blocking(move || {
        if let Some(owner) = &owner {
            ownership::make_shared_dirs(&root, &shared, owner)?;
        }
        root.link_shared(&id, &shared)
            .map_err(|e| ExportError::Io {
                path: root.release_dir(&id),
                source: std::io::Error::other(e.to_string()),
            })?;
        if let Some(owner) = &owner {
            ownership::hand_over_release(&root, &id, owner)?;
        }
        Ok(fetched)
    })
    .await
    .unwrap_or_else(|e| {
        Err(ExportError::Io {
            path: release,
            source: std::io::Error::other(e.to_string()),
        })
    })
}
