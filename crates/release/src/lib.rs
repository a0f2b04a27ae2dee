//! One app's releases on one host, on disk:
//!
//! ```text
//! ROOT/releases/<release-id>/            one exported commit each
//! ROOT/releases/<release-id>/.convoy-release.json   written last: the release is complete
//! ROOT/current  -> releases/<release-id>  what runs (switched with rename(2))
//! ROOT/previous -> releases/<release-id>  what ran before (the rollback target)
//! ROOT/shared/                            kept across releases, linked into each
//! ```
//!
//! `current` only ever points to a complete release: a release gets its marker after it was
//! exported and built, and the switch is a new symlink renamed over the old one, followed by
//! an fsync of ROOT, so a crash at any instant leaves either the old or the new target.
#![forbid(unsafe_code)]

use chrono::{DateTime, Utc};
use convoy_message::AppRelease;
use convoy_message::names::{RefName, ReleaseId, Sha};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;

/// The marker file that makes a release directory complete.
pub const MARKER: &str = ".convoy-release.json";

/// What the marker records about a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub release: ReleaseId,
    pub commit: Sha,
    #[serde(rename = "ref")]
    pub git_ref: RefName,
    pub command_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// Layout errors, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} points to {target:?}, which is not releases/<id>; fix it by hand (see docs/host.md)"
    )]
    StrangeLink { path: PathBuf, target: PathBuf },
    #[error("shared path {0:?} must be relative, without '..'")]
    BadSharedPath(String),
    #[error(
        "shared path {entry:?}: {path} in the release is a symbolic link (from the commit); \
         a shared path must not lead out of the release through one: remove the link from \
         the repository or change `shared`"
    )]
    SharedThroughLink { entry: String, path: PathBuf },
    #[error(
        "shared path {entry:?}: {path} is a symbolic link owned by uid {uid}, not root: it is \
         not followed (the app's user could point it anywhere); replace it with a directory, \
         or make it root's if an operator put it there"
    )]
    SharedDirIsLink {
        entry: String,
        path: PathBuf,
        uid: u32,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An app root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRoot {
    root: PathBuf,
}

impl AppRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("releases")
    }

    pub fn release_dir(&self, id: &ReleaseId) -> PathBuf {
        self.releases_dir().join(id.as_str())
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.root.join("shared")
    }

    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    pub fn previous_link(&self) -> PathBuf {
        self.root.join("previous")
    }

    /// Creates ROOT, ROOT/releases and ROOT/shared if missing.
    pub fn ensure_layout(&self) -> Result<(), LayoutError> {
        for dir in [self.root.clone(), self.releases_dir(), self.shared_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// The release `current` points to, if any.
    pub fn current(&self) -> Result<Option<ReleaseId>, LayoutError> {
        self.read_link(&self.current_link())
    }

    /// The release `previous` points to, if any.
    pub fn previous(&self) -> Result<Option<ReleaseId>, LayoutError> {
        self.read_link(&self.previous_link())
    }

    fn read_link(&self, link: &Path) -> Result<Option<ReleaseId>, LayoutError> {
        let target = match fs::read_link(link) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(link)(e)),
        };
        let strange = || LayoutError::StrangeLink {
            path: link.to_owned(),
            target: target.clone(),
        };
        let mut parts = target.components();
        if parts.next() != Some(Component::Normal("releases".as_ref())) {
            return Err(strange());
        }
        let Some(Component::Normal(name)) = parts.next() else {
            return Err(strange());
        };
        if parts.next().is_some() {
            return Err(strange());
        }
        let id = name.to_str().and_then(|n| ReleaseId::new(n).ok());
        id.map(Some).ok_or_else(strange)
    }

    /// Points `current` at `id` atomically: a new relative symlink, rename(2) over the old
    /// one, fsync of ROOT.
    pub fn switch_current(&self, id: &ReleaseId) -> Result<(), LayoutError> {
        self.replace_link(&self.current_link(), Some(id))
    }

    /// Points `previous` at `id` (or removes it), atomically.
    pub fn set_previous(&self, id: Option<&ReleaseId>) -> Result<(), LayoutError> {
        self.replace_link(&self.previous_link(), id)
    }

    fn replace_link(&self, link: &Path, id: Option<&ReleaseId>) -> Result<(), LayoutError> {
        match id {
            Some(id) => {
                let tmp = self.root.join(format!(
                    ".{}.tmp-{}",
                    file_name(link),
                    Uuid::new_v4().simple()
                ));
                let target = Path::new("releases").join(id.as_str());
                std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
                if let Err(e) = fs::rename(&tmp, link) {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err(link)(e));
                }
            }
            None => match fs::remove_file(link) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(link)(e)),
            },
        }
        fsync_dir(&self.root)
    }

    /// Writes the marker that makes release `info.release` complete — once the release's
    /// own files are on disk: a power cut must not leave a marked release whose files are
    /// empty (exports and builds write without syncing; one `syncfs` of the release's
    /// filesystem then covers them all, cheaper than a sync per file).
    pub fn mark_complete(&self, info: &ReleaseInfo) -> Result<(), LayoutError> {
        let dir = self.release_dir(&info.release);
        fs::File::open(&dir)
            .and_then(|d| nix::unistd::syncfs(&d).map_err(io::Error::from))
            .map_err(io_err(&dir))?;
        let bytes = serde_json::to_vec_pretty(info).unwrap_or_default();
        write_atomic(&dir.join(MARKER), &bytes)
    }

    /// The marker of a release, if it is complete.
    /// The release directory may belong to the app's user, who could put a FIFO, a link
    /// or a huge file in the marker's place: it is opened without following links or
    /// blocking, and read only if it is a small regular file.
    pub fn info(&self, id: &ReleaseId) -> Option<ReleaseInfo> {
        use nix::fcntl::OFlag;
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        const MAX_MARKER_BYTES: u64 = 64 * 1024;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(self.release_dir(id).join(MARKER))
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() > MAX_MARKER_BYTES {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(MAX_MARKER_BYTES).read_to_end(&mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn is_complete(&self, id: &ReleaseId) -> bool {
        self.info(id).is_some()
    }

    /// Every release directory, oldest first (by marker time, then directory time).
    pub fn releases(&self) -> Result<Vec<ReleaseId>, LayoutError> {
        let dir = self.releases_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut found: Vec<(DateTime<Utc>, ReleaseId)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let id = ReleaseId::new(e.file_name().to_str()?).ok()?;
                let when = self.info(&id).map(|i| i.created_at).unwrap_or_else(|| {
                    e.metadata()
                        .and_then(|m| m.modified())
                        .map(DateTime::<Utc>::from)
                        .unwrap_or_default()
                });
                Some((when, id))
            })
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, id)| id).collect())
    }

    /// Removes releases beyond the newest `keep` complete ones, and incomplete leftovers;
    /// never `current`, `previous` or `protect`. Returns what it removed.
    pub fn prune(
        &self,
        keep: usize,
        protect: &[&ReleaseId],
    ) -> Result<Vec<ReleaseId>, LayoutError> {
        let current = self.current()?;
        let previous = self.previous()?;
        let all = self.releases()?;
        let complete: Vec<&ReleaseId> = all.iter().filter(|r| self.is_complete(r)).collect();
        let keep_from = complete.len().saturating_sub(keep);
        let kept: Vec<&ReleaseId> = complete[keep_from..].to_vec();
        let mut removed = Vec::new();
        for id in &all {
            let safe = Some(id) == current.as_ref()
                || Some(id) == previous.as_ref()
                || protect.contains(&id)
                || kept.contains(&id);
            if !safe {
                let dir = self.release_dir(id);
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
                removed.push(id.clone());
            }
        }
        Ok(removed)
    }

    /// Removes one release directory (a failed or abandoned export).
    pub fn remove_release(&self, id: &ReleaseId) -> Result<(), LayoutError> {
        let dir = self.release_dir(id);
        if self.current()?.as_ref() == Some(id) || self.previous()?.as_ref() == Some(id) {
            return Err(LayoutError::Io {
                path: dir,
                source: io::Error::other("refusing to remove the current or previous release"),
            });
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }

    /// Replaces each shared path in a release by a symlink into ROOT/shared, creating the
    /// shared side (as a directory when the path ends with `/`, else its parent) if missing.
    pub fn link_shared(&self, id: &ReleaseId, shared: &[String]) -> Result<(), LayoutError> {
        let release = self.release_dir(id);
        if !shared.is_empty() {
            let top = self.shared_dir();
            fs::create_dir_all(&top).map_err(io_err(&top))?;
        }
        for entry in shared {
            let rel = check_shared_path(entry)?;
            let in_shared = self.shared_dir().join(&rel);
            // Directories under shared/ may belong to the app's user, who could put a link
            // where a directory was: a link is followed only if root (an operator: say
            // `shared/log -> /var/log/shop`) or this process made it; anyone else's would
            // make root create directories wherever it leads.
            let dirs: Vec<_> = rel.components().collect();
            let dirs = if entry.ends_with('/') {
                &dirs[..]
            } else {
                &dirs[..dirs.len().saturating_sub(1)]
            };
            let mut dir = self.shared_dir();
            use std::os::unix::fs::MetadataExt;
            for c in dirs {
                dir.push(c);
                match fs::symlink_metadata(&dir) {
                    Ok(m) if m.file_type().is_symlink() && !trusted_owner(m.uid()) => {
                        return Err(LayoutError::SharedDirIsLink {
                            entry: entry.clone(),
                            path: dir,
                            uid: m.uid(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => fs::create_dir(&dir).map_err(io_err(&dir))?,
                }
            }
            let in_release = release.join(&rel);
            // The release holds what the commit holds: a directory of it may be a symbolic
            // link anywhere (`config -> /etc`). Walk the parents without following links, or
            // root would replace files outside the release.
            let mut parent = release.clone();
            let components: Vec<_> = rel.components().collect();
            for c in &components[..components.len().saturating_sub(1)] {
                parent.push(c);
                match fs::symlink_metadata(&parent) {
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(LayoutError::SharedThroughLink {
                            entry: entry.clone(),
                            path: parent,
                        });
                    }
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => fs::remove_file(&parent).map_err(io_err(&parent))?,
                    Err(_) => {}
                }
                if !parent.exists() {
                    fs::create_dir(&parent).map_err(io_err(&parent))?;
                }
            }
            match fs::symlink_metadata(&in_release) {
                Ok(m) if m.is_dir() => {
                    fs::remove_dir_all(&in_release).map_err(io_err(&in_release))?
                }
                Ok(_) => fs::remove_file(&in_release).map_err(io_err(&in_release))?,
                Err(_) => {}
            }
            std::os::unix::fs::symlink(&in_shared, &in_release).map_err(io_err(&in_release))?;
        }
        Ok(())
    }

    /// Current and previous release and the commit of current, as reported on the bus.
    pub fn state(&self) -> AppRelease {
        let current = self.current().ok().flatten();
        let commit = current
            .as_ref()
            .and_then(|c| self.info(c))
            .map(|i| i.commit);
        AppRelease {
            previous: self.previous().ok().flatten(),
            current,
            commit,
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A shared path from config: relative, no `..`, no empty path.
pub fn check_shared_path(entry: &str) -> Result<PathBuf, LayoutError> {
    let p = Path::new(entry.trim_end_matches('/'));
    let ok = !entry.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.components().next().is_some();
    if ok {
        Ok(p.to_owned())
    } else {
        Err(LayoutError::BadSharedPath(entry.to_owned()))
    }
}

/// Writes a file so that readers see the old or the new content, never a part: temp file,
/// fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name(path),
        Uuid::new_v4().simple()
    ));
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    fsync_dir(dir)
}

/// Whose symbolic links under `shared/` are followed: root's (an operator's) and this
/// process's own.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// fsync(2) of a directory, making renames and creations in it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), LayoutError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    fn make(root: &AppRoot, id: &str, minute: u32) {
        let id = rid(id);
        fs::create_dir_all(root.release_dir(&id)).unwrap();
        root.mark_complete(&ReleaseInfo {
            release: id,
            commit: Sha::new("a".repeat(40)).unwrap(),
            git_ref: RefName::new("refs/tags/v1").unwrap(),
            command_id: Uuid::new_v4(),
            created_at: DateTime::from_timestamp(1_700_000_000 + i64::from(minute) * 60, 0)
                .unwrap(),
        })
        .unwrap();
    }

    #[test]
    fn switch_is_a_relative_symlink_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        assert_eq!(root.current().unwrap(), None);
        make(&root, "r1", 1);
        root.switch_current(&rid("r1")).unwrap();
        assert_eq!(
            fs::read_link(root.current_link()).unwrap(),
            Path::new("releases/r1")
        );
        assert_eq!(root.current().unwrap(), Some(rid("r1")));
        make(&root, "r2", 2);
        root.set_previous(Some(&rid("r1"))).unwrap();
        root.switch_current(&rid("r2")).unwrap();
        assert_eq!(root.state().current, Some(rid("r2")));
        assert_eq!(root.state().previous, Some(rid("r1")));
        // No temp links left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn a_link_pointing_elsewhere_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        std::os::unix::fs::symlink("/etc", root.current_link()).unwrap();
        assert!(matches!(
            root.current(),
            Err(LayoutError::StrangeLink { .. })
        ));
    }

    #[test]
    fn prune_keeps_the_newest_and_never_current_or_previous() {
        let dir = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        for (i, id) in ["r1", "r2", "r3", "r4", "r5"].iter().enumerate() {
            make(&root, id, i as u32);
        }
        fs::create_dir_all(root.release_dir(&rid("partial"))).unwrap();
        root.switch_current(&rid("r1")).unwrap(); // an old release is current
        root.set_previous(Some(&rid("r2"))).unwrap();
        let mut removed = root.prune(2, &[]).unwrap();
        removed.sort();
        assert_eq!(removed, vec![rid("partial"), rid("r3")]);
        assert_eq!(
            root.releases().unwrap(),
            vec![rid("r1"), rid("r2"), rid("r4"), rid("r5")]
        );
    }

    #[test]
    fn shared_paths_are_linked_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        make(&root, "r1", 1);
        fs::create_dir_all(root.release_dir(&rid("r1")).join("log")).unwrap();
        root.link_shared(&rid("r1"), &["log/".into(), "config/db.yml".into()])
            .unwrap();
        let log = root.release_dir(&rid("r1")).join("log");
        assert!(fs::symlink_metadata(&log).unwrap().file_type().is_symlink());
        assert!(root.shared_dir().join("log").is_dir());
        for bad in ["../x", "/etc/passwd", "", "a/../../b"] {
            assert!(
                root.link_shared(&rid("r1"), &[bad.into()]).is_err(),
                "{bad:?}"
            );
        }
    }

    /// The app's user owns the release directory: a FIFO, a link or a huge file in the
    /// marker's place makes the release incomplete, and never blocks the reader.
    #[test]
    fn a_marker_that_is_not_a_small_regular_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        make(&root, "r1", 1);
        assert!(root.info(&rid("r1")).is_some());
        let marker = root.release_dir(&rid("r1")).join(MARKER);
        let good = fs::read(&marker).unwrap();
        fs::remove_file(&marker).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&marker)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(root.info(&rid("r1")).is_none(), "a FIFO is not a marker");
        fs::remove_file(&marker).unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        fs::write(&elsewhere, &good).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &marker).unwrap();
        assert!(root.info(&rid("r1")).is_none(), "a link is not a marker");
        fs::remove_file(&marker).unwrap();
        fs::write(&marker, vec![b' '; 100 * 1024]).unwrap();
        assert!(root.info(&rid("r1")).is_none(), "too big");
    }

    /// A commit whose `config` is a link out of the release (`config -> <outside>`), and a
    /// shared entry `config/db.yml`: refused, and nothing outside is touched.
    #[test]
    fn a_shared_path_never_leads_out_of_the_release_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("db.yml"), "precious").unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        make(&root, "r1", 1);
        let release = root.release_dir(&rid("r1"));
        std::os::unix::fs::symlink(outside.path(), release.join("config")).unwrap();
        std::os::unix::fs::symlink(outside.path(), release.join("deep")).unwrap();
        for entry in ["config/db.yml", "deep/a/b/", "config/new/"] {
            let err = root
                .link_shared(&rid("r1"), &[entry.into()])
                .expect_err(entry);
            assert!(
                matches!(err, LayoutError::SharedThroughLink { .. }),
                "{entry}: {err}"
            );
        }
        assert_eq!(
            fs::read_to_string(outside.path().join("db.yml")).unwrap(),
            "precious"
        );
        let left: Vec<_> = fs::read_dir(outside.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "nothing created outside: {left:?}");
    }

    /// The app's user replaced a directory of `shared/` by a link elsewhere: convoy does not
    /// follow it and creates nothing there. An operator's link (root's) is followed.
    #[test]
    fn a_shared_directory_replaced_by_someone_elses_link_is_not_followed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        make(&root, "r1", 1);
        let link = root.shared_dir().join("log");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let me = nix::unistd::geteuid();
        if me.is_root() {
            // Made by the app's user (here: nobody).
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            for entry in ["log/app/", "log/app/file.txt", "log/"] {
                let err = root
                    .link_shared(&rid("r1"), &[entry.into()])
                    .expect_err(entry);
                assert!(
                    matches!(err, LayoutError::SharedDirIsLink { uid: 65534, .. }),
                    "{entry}: {err}"
                );
            }
            let left: Vec<_> = fs::read_dir(outside.path()).unwrap().flatten().collect();
            assert!(left.is_empty(), "nothing created outside: {left:?}");
            // Root's (an operator's) link is followed.
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(me),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        assert_eq!(fs::symlink_metadata(&link).unwrap().uid(), me.as_raw());
        root.link_shared(&rid("r1"), &["log/app/".into()]).unwrap();
        assert!(
            outside.path().join("app").is_dir(),
            "through the trusted link"
        );
        // Real directories, nested ones included.
        root.link_shared(&rid("r1"), &["data/a/b/".into(), "conf/x.yml".into()])
            .unwrap();
        assert!(root.shared_dir().join("data/a/b").is_dir());
        assert!(root.shared_dir().join("conf").is_dir());
    }
}
