//! Handing a new release to the app's `user`, as Capistrano and ansistrano do: the agent
//! (root) exports the commit and makes the shared directories, and the build hook, which
//! runs as the user, must be able to write into them (`bundle install --deployment`,
//! `npm ci`, compiled assets).
//!
//! Every change goes through directory descriptors opened with `O_NOFOLLOW` below the app
//! root, and `fchownat(…, AT_SYMLINK_NOFOLLOW)`: a symlink — committed to the repository, or
//! planted by the user — has its own owner changed and is never followed, so nothing outside
//! the tree changes hands. A directory's contents are handed over before the directory
//! itself: while the walk runs, no part of it the walk has still to visit is writable by the
//! user, who therefore cannot slip a link or a foreign file into it.

use convoy_message::names::ReleaseId;
use convoy_release::AppRoot;
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, User, fchown, fchownat};
use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Deeper trees than this are refused rather than walked (each level holds a descriptor).
const MAX_DEPTH: usize = 256;

/// Who a release is handed to: the app's `user` and that user's primary group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Why a release or a shared directory could not be handed to the app's user.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("user {0:?} (the app's `user`) does not exist on this host")]
    NoSuchUser(String),
    #[error("cannot give {path} to user {user}: {source}")]
    Io {
        path: PathBuf,
        user: String,
        source: std::io::Error,
    },
    #[error(
        "{0} is a symlink or not a directory; the agent does not change owners through it (make it a real directory, or point `root` at the real location)"
    )]
    NotADirectory(PathBuf),
    #[error("{0} is nested more than {MAX_DEPTH} directories deep; not handed over")]
    TooDeep(PathBuf),
}

impl Owner {
    /// The owner of an app's new releases: its `user`, when one is set and the agent runs
    /// as root (only root can give files away, and only root can run hooks as another
    /// user). `None` when there is nothing to hand over: no `user`, `user` is root, or the
    /// agent is not root (the files are then the agent's own user's, as its hooks are).
    pub fn for_app(user: Option<&str>) -> Result<Option<Owner>, OwnershipError> {
        let Some(name) = user else { return Ok(None) };
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let found = User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| OwnershipError::NoSuchUser(name.to_owned()))?;
        if found.uid.is_root() {
            return Ok(None);
        }
        Ok(Some(Owner {
            name: name.to_owned(),
            uid: found.uid,
            gid: found.gid,
        }))
    }

    fn io(&self, path: &Path) -> impl FnOnce(nix::Error) -> OwnershipError + '_ {
        let path = path.to_owned();
        move |e| OwnershipError::Io {
            path,
            user: self.name.clone(),
            source: e.into(),
        }
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Opens `name` in `parent` as a directory, never through a symlink. `Ok(None)` when it is
/// missing.
fn open_in(
    parent: &Dir,
    name: &CStr,
    shown: &Path,
    owner: &Owner,
) -> Result<Option<Dir>, OwnershipError> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(nix::Error::ENOENT) => return Ok(None),
        Err(e) => return Err(owner.io(shown)(e)),
        Ok(st) if !is_dir(st.st_mode) => {
            return Err(OwnershipError::NotADirectory(shown.to_owned()));
        }
        Ok(_) => {}
    }
    match Dir::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(d) => Ok(Some(d)),
        // Replaced by a link or a file since the stat.
        Err(nix::Error::ELOOP | nix::Error::ENOTDIR) => {
            Err(OwnershipError::NotADirectory(shown.to_owned()))
        }
        Err(e) => Err(owner.io(shown)(e)),
    }
}

fn is_dir(mode: libc::mode_t) -> bool {
    SFlag::from_bits_truncate(mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn c_name(name: &OsStr) -> Result<CString, OwnershipError> {
    CString::new(name.as_bytes()).map_err(|_| OwnershipError::NotADirectory(PathBuf::from(name)))
}

/// Opens the app root itself (the operator's path: a symlink there is theirs to make).
fn open_root(root: &AppRoot, owner: &Owner) -> Result<Dir, OwnershipError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    Dir::open(root.path(), flags, Mode::empty()).map_err(owner.io(root.path()))
}

/// Gives `ROOT/releases/<id>` and everything in it to `owner`. `releases/` itself stays
/// the agent's.
pub fn hand_over_release(
    root: &AppRoot,
    id: &ReleaseId,
    owner: &Owner,
) -> Result<(), OwnershipError> {
    let root_dir = open_root(root, owner)?;
    let releases_path = root.releases_dir();
    let releases = open_in(&root_dir, c"releases", &releases_path, owner)?
        .ok_or_else(|| OwnershipError::NotADirectory(releases_path.clone()))?;
    let release_path = root.release_dir(id);
    let mut release = open_in(
        &releases,
        &c_name(OsStr::new(id.as_str()))?,
        &release_path,
        owner,
    )?
    .ok_or_else(|| OwnershipError::NotADirectory(release_path.clone()))?;
    give_contents(&mut release, &release_path, owner, 0)?;
    fchown(&release, Some(owner.uid), Some(owner.gid)).map_err(owner.io(&release_path))
}

/// Gives everything below `dir` to `owner`, deepest first.
fn give_contents(
    dir: &mut Dir,
    shown: &Path,
    owner: &Owner,
    depth: usize,
) -> Result<(), OwnershipError> {
    if depth >= MAX_DEPTH {
        return Err(OwnershipError::TooDeep(shown.to_owned()));
    }
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(owner.io(shown))?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    for name in names {
        let path = shown.join(OsStr::from_bytes(name.to_bytes()));
        let st = fstatat(&*dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(owner.io(&path))?;
        if is_dir(st.st_mode) {
            let Some(mut child) = open_in(dir, &name, &path, owner)? else {
                continue;
            };
            give_contents(&mut child, &path, owner, depth + 1)?;
            // Through the descriptor: exactly the directory that was walked.
            fchown(&child, Some(owner.uid), Some(owner.gid)).map_err(owner.io(&path))?;
        } else {
            fchownat(
                &*dir,
                name.as_c_str(),
                Some(owner.uid),
                Some(owner.gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(owner.io(&path))?;
        }
    }
    Ok(())
}

/// Creates the directories below `ROOT/shared` that the `shared` entries need (the entry
/// itself for `dir/`, else its parent), owned by `owner`. Directories that exist are left
/// as they are, whoever owns them, and so is everything below a symlink (an operator's
/// `shared/log -> /var/log/shop`): the agent neither creates nor hands over anything
/// through one. Returns the directories it created.
pub fn make_shared_dirs(
    root: &AppRoot,
    shared: &[String],
    owner: &Owner,
) -> Result<Vec<PathBuf>, OwnershipError> {
    let root_dir = open_root(root, owner)?;
    let shared_path = root.shared_dir();
    let shared_dir = match open_in(&root_dir, c"shared", &shared_path, owner) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Vec::new()),
        Err(OwnershipError::NotADirectory(_)) => {
            tracing::debug!(path = %shared_path.display(),
                "shared/ is a symlink: its directories are created as they were, not handed to the app's user");
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut created = Vec::new();
    for entry in shared {
        let Ok(rel) = convoy_release::check_shared_path(entry) else {
            continue; // refused by config validation; link_shared names it
        };
        let dir_part = if entry.ends_with('/') {
            rel.as_path()
        } else {
            rel.parent().unwrap_or(Path::new(""))
        };
        let mut shown = shared_path.clone();
        let mut parent: Option<Dir> = None;
        for component in dir_part.components() {
            let Component::Normal(name) = component else {
                break;
            };
            shown.push(name);
            let name = c_name(name)?;
            let at = parent.as_ref().unwrap_or(&shared_dir);
            let dir = match open_in(at, &name, &shown, owner) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    match mkdirat(at, name.as_c_str(), Mode::from_bits_truncate(0o775)) {
                        Ok(()) | Err(nix::Error::EEXIST) => {}
                        Err(e) => return Err(owner.io(&shown)(e)),
                    }
                    let Some(d) = open_in(at, &name, &shown, owner)? else {
                        return Err(OwnershipError::NotADirectory(shown));
                    };
                    fchown(&d, Some(owner.uid), Some(owner.gid)).map_err(owner.io(&shown))?;
                    created.push(shown.clone());
                    d
                }
                Err(OwnershipError::NotADirectory(_)) => {
                    tracing::debug!(path = %shown.display(),
                        "a shared path runs through a symlink or a file: left as it is");
                    break;
                }
                Err(e) => return Err(e),
            };
            parent = Some(dir);
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn nobody() -> Owner {
        assert!(
            nix::unistd::geteuid().is_root(),
            "giving files away needs root: run scripts/test as root"
        );
        let user = User::from_name("nobody").unwrap().expect("user nobody");
        Owner {
            name: "nobody".into(),
            uid: user.uid,
            gid: user.gid,
        }
    }

    fn owner_of(path: &Path) -> (u32, u32) {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn the_release_tree_is_handed_over_and_nothing_outside_it() {
        let owner = nobody();
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let outside_file = outside.path().join("secret");
        std::fs::write(&outside_file, "root's").unwrap();
        let root = AppRoot::new(dir.path().join("app"));
        root.ensure_layout().unwrap();
        let id = ReleaseId::new("r1").unwrap();
        let rel = root.release_dir(&id);
        std::fs::create_dir_all(rel.join("a/b")).unwrap();
        std::fs::write(rel.join("a/b/file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside_file, rel.join("to-file")).unwrap();
        std::os::unix::fs::symlink(outside.path(), rel.join("a/to-dir")).unwrap();
        std::os::unix::fs::symlink("/", rel.join("to-slash")).unwrap();

        hand_over_release(&root, &id, &owner).unwrap();

        let want = (owner.uid.as_raw(), owner.gid.as_raw());
        for p in [
            "", "a", "a/b", "a/b/file", "to-file", "a/to-dir", "to-slash",
        ] {
            assert_eq!(owner_of(&rel.join(p)), want, "{p}");
        }
        // The links themselves changed hands; what they point to did not.
        assert_eq!(owner_of(&outside_file), (0, 0));
        assert_eq!(owner_of(outside.path()), (0, 0));
        assert_eq!(owner_of(Path::new("/")), (0, 0));
        assert_eq!(owner_of(&root.releases_dir()), (0, 0));
        assert_eq!(owner_of(root.path()), (0, 0));
    }

    #[test]
    fn a_release_reached_through_a_symlink_is_refused() {
        let owner = nobody();
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(elsewhere.path().join("r1")).unwrap();
        let root = AppRoot::new(dir.path());
        std::fs::create_dir(root.shared_dir()).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.releases_dir()).unwrap();
        let err = hand_over_release(&root, &ReleaseId::new("r1").unwrap(), &owner).unwrap_err();
        assert!(matches!(err, OwnershipError::NotADirectory(_)), "{err}");
        assert_eq!(owner_of(&elsewhere.path().join("r1")), (0, 0));
    }

    #[test]
    fn only_the_shared_dirs_it_creates_are_handed_over_never_through_a_link() {
        let owner = nobody();
        let want = (owner.uid.as_raw(), owner.gid.as_raw());
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = AppRoot::new(dir.path());
        root.ensure_layout().unwrap();
        let shared = root.shared_dir();
        std::fs::create_dir(shared.join("existing")).unwrap();
        std::os::unix::fs::symlink(outside.path(), shared.join("linked")).unwrap();
        let entries: Vec<String> = [
            "log/",
            "config/database.yml",
            "existing/",
            "existing/sub/",
            "linked/below/",
            "tmp/cache/",
        ]
        .map(String::from)
        .to_vec();

        let mut created = make_shared_dirs(&root, &entries, &owner).unwrap();
        created.sort();
        let mut expected: Vec<PathBuf> = ["config", "existing/sub", "log", "tmp", "tmp/cache"]
            .iter()
            .map(|p| shared.join(p))
            .collect();
        expected.sort();
        assert_eq!(created, expected);
        for p in &expected {
            assert_eq!(owner_of(p), want, "{}", p.display());
        }
        assert_eq!(
            owner_of(&shared),
            (0, 0),
            "shared/ itself stays the agent's"
        );
        assert_eq!(owner_of(&shared.join("existing")), (0, 0));
        assert!(
            !outside.path().join("below").exists(),
            "nothing made through a link"
        );
        assert_eq!(owner_of(outside.path()), (0, 0));
        assert!(!shared.join("config/database.yml").exists());

        // Again: nothing new, nothing changed.
        assert!(
            make_shared_dirs(&root, &entries, &owner)
                .unwrap()
                .is_empty()
        );
    }
}
