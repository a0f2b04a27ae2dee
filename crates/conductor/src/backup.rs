//! `convoy-conductor backup DEST`: a consistent copy of the store, taken while the conductor
//! runs, and checked before it replaces anything.
//!
//! Copying `conductor.db` with `cp` while the conductor writes is not a backup: the newest
//! transactions live in `conductor.db-wal` until a checkpoint, and a copy of the two files
//! taken at different moments may be torn. SQLite's online backup API copies every page
//! inside one read transaction instead — in WAL mode a reader never blocks the writer, so
//! the conductor goes on committing while the copy is made, and the copy is the store as
//! of one commit.
//!
//! The copy is written next to DEST under a temporary name, switched to rollback-journal
//! mode (one self-contained file, no `-wal` beside it), checked with `PRAGMA
//! integrity_check`, fsynced, and only then renamed over DEST: a failed backup never
//! replaces a good older one.

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::fs;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the backup waits for a store that stays locked. A reader of a WAL store waits
/// only in rare moments (another connection recovering or restarting the WAL).
const BUSY_FOR: Duration = Duration::from_secs(30);

/// Why a backup was not made. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "the store {0} does not exist: check `state_dir` in the conductor's config (or pass --config)"
    )]
    NoStore(PathBuf),
    #[error("cannot read the store {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the store {path}: {source}")]
    Source {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the store {path} stayed locked for {secs} s; try again")]
    Busy { path: PathBuf, secs: u64 },
    #[error("{0} is the live store itself; write the backup to another file")]
    SameFile(PathBuf),
    #[error("{0} is a directory; name the backup file (e.g. {0}/conductor.db)")]
    IsDirectory(PathBuf),
    #[error("cannot write the backup {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the backup {path}: {source}")]
    Copy {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the backup of {source_path} failed its check ({detail}); {dest} was not written")]
    Check {
        source_path: PathBuf,
        dest: PathBuf,
        detail: String,
    },
}

/// What a finished backup holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    pub dest: PathBuf,
    pub bytes: u64,
    pub rollouts: i64,
    pub pipelines: i64,
    pub audit_lines: i64,
}

/// Copies the store at `source` (the conductor may be running) to `dest`, checks the copy,
/// and renames it into place. An existing `dest` is replaced only by a copy that passed.
pub fn backup(source: &Path, dest: &Path) -> Result<BackupReport, BackupError> {
    let source_meta = match fs::metadata(source) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::NoStore(source.to_owned()));
        }
        Err(e) => {
            return Err(BackupError::Unreadable {
                path: source.to_owned(),
                source: e,
            });
        }
    };
    if let Ok(m) = fs::metadata(dest) {
        if m.is_dir() {
            return Err(BackupError::IsDirectory(dest.to_owned()));
        }
        if m.dev() == source_meta.dev() && m.ino() == source_meta.ino() {
            return Err(BackupError::SameFile(dest.to_owned()));
        }
    }
    let write_err = |source| BackupError::Write {
        path: dest.to_owned(),
        source,
    };
    let name = dest
        .file_name()
        .ok_or_else(|| write_err(std::io::Error::other("the path names no file")))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Made here, not by SQLite, so that it is new (never someone's file or link) and only
    // readable as the live store is (the unit's UMask=0027 gives that 0640).
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)
        .map_err(write_err)?;
    let made = copy_and_check(source, &tmp, dest).and_then(|report| {
        place(&tmp, dest, &parent).map_err(write_err)?;
        Ok(report)
    });
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(journal_of(&tmp));
    }
    made
}

fn journal_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-journal");
    PathBuf::from(name)
}

fn copy_and_check(source: &Path, tmp: &Path, dest: &Path) -> Result<BackupReport, BackupError> {
    let source_err = |e| BackupError::Source {
        path: source.to_owned(),
        source: e,
    };
    let copy_err = |e| BackupError::Copy {
        path: dest.to_owned(),
        source: e,
    };
    // Read-only: the backup never writes to the live store.
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(source_err)?;
    from.busy_timeout(Duration::from_secs(10))
        .map_err(source_err)?;
    let mut to = Connection::open(tmp).map_err(copy_err)?;
    {
        let backup = Backup::new(&from, &mut to).map_err(copy_err)?;
        let deadline = Instant::now() + BUSY_FOR;
        // Every page in one step, so one read transaction: a step-by-step copy would
        // start over after every commit the conductor makes meanwhile.
        loop {
            match backup.step(-1).map_err(source_err)? {
                StepResult::Done => break,
                StepResult::Busy | StepResult::Locked if Instant::now() >= deadline => {
                    return Err(BackupError::Busy {
                        path: source.to_owned(),
                        secs: BUSY_FOR.as_secs(),
                    });
                }
                StepResult::Busy | StepResult::Locked => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                // `More` (not with -1 pages), or a result added by a later rusqlite.
                _ => {}
            }
        }
    }
    drop(from);
    // The copy carries the live store's WAL flag; one file is what a backup should be.
    let mode: String = to
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(copy_err)?;
    let check = |detail: String| BackupError::Check {
        source_path: source.to_owned(),
        dest: dest.to_owned(),
        detail,
    };
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(check(format!("journal mode stayed {mode:?}")));
    }
    let problems: Vec<String> = to
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| check(format!("integrity_check could not run: {e}")))?;
    if problems != ["ok"] {
        return Err(check(format!(
            "integrity_check: {}",
            problems.into_iter().take(5).collect::<Vec<_>>().join("; ")
        )));
    }
    let count = |table: &str| -> Result<i64, BackupError> {
        to.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .map_err(|e| check(format!("no {table} table ({e}): not a conductor store")))
    };
    let (rollouts, pipelines, audit_lines) =
        (count("rollouts")?, count("pipelines")?, count("audit")?);
    to.close().map_err(|(_, e)| copy_err(e))?;
    let bytes = fs::metadata(tmp)
        .map(|m| m.len())
        .map_err(|e| BackupError::Write {
            path: dest.to_owned(),
            source: e,
        })?;
    Ok(BackupReport {
        dest: dest.to_owned(),
        bytes,
        rollouts,
        pipelines,
        audit_lines,
    })
}

/// fsync the copy, rename it over `dest`, fsync the directory.
fn place(tmp: &Path, dest: &Path, parent: &Path) -> std::io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(tmp)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, dest)?;
    fs::File::open(parent)?.sync_all()?;
    Ok(())
}

impl std::fmt::Display for BackupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes): {} rollouts, {} pipelines, {} audit lines; integrity_check ok",
            self.dest.display(),
            self.bytes,
            self.rollouts,
            self.pipelines,
            self.audit_lines
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_conductor_store_is_refused_by_name_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("backup.db");

        let junk = dir.path().join("junk.db");
        fs::write(&junk, vec![7u8; 8192]).unwrap();
        let err = backup(&junk, &dest).unwrap_err().to_string();
        assert!(err.contains(&junk.display().to_string()), "{err}");

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let err = backup(&other, &dest).unwrap_err().to_string();
        assert!(err.contains("not a conductor store"), "{err}");

        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with(".backup.db") || n == "backup.db"),
            "{names:?}"
        );
    }

    #[test]
    fn a_good_backup_replaces_the_older_one_and_is_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("conductor.db");
        let store = crate::store::Store::open(&source).unwrap();
        let dest = dir.path().join("backup.db");
        fs::write(&dest, "yesterday's").unwrap();
        let report = backup(&source, &dest).unwrap();
        assert_eq!((report.rollouts, report.pipelines), (0, 0));
        drop(store);
        let copy = Connection::open(&dest).unwrap();
        let mode: String = copy
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        assert!(matches!(
            backup(&source, &source),
            Err(BackupError::SameFile(_))
        ));
        assert!(matches!(
            backup(&source, dir.path()),
            Err(BackupError::IsDirectory(_))
        ));
    }
}
