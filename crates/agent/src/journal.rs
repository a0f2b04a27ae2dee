//! The agent's journal: one directory per command id under `<state_dir>/journal/`.
//!
//! ```text
//! <id>/command     the message exactly as received (written before the delivery is acked)
//! <id>/state.json  how far execution got, rewritten atomically before each step
//! <id>/result      the result message exactly as published (written before publishing);
//!                  created empty with the entry, so saving it costs one write and one
//!                  fdatasync: empty or torn (a crash mid-save, so never published) reads
//!                  as no result
//! <id>/published   present once the broker confirmed the result
//! ```
//!
//! A redelivered command finds its entry and is answered from `result`; a command id reused
//! with other bytes is a replay; an entry without a result after a restart is recovered.

use chrono::{DateTime, Utc};
use convoy_message::StepReport;
use convoy_message::names::ReleaseId;
use convoy_release::{LayoutError, write_atomic};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// How far a command got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded and acked; nothing done yet.
    Accepted,
    Export,
    Build,
    PreSwitch,
    /// About to rename `current`.
    Switch,
    /// `current` points to the new release.
    Switched,
    Restart,
    Health,
    PostSwitch,
    /// Every step succeeded.
    Complete,
    /// Switching back to the release that was current before.
    Revert,
}

/// The persisted execution state of one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub started_at: DateTime<Utc>,
    /// The release being installed or switched to.
    #[serde(default)]
    pub target: Option<ReleaseId>,
    /// `current` and `previous` before this command touched them.
    #[serde(default)]
    pub current_before: Option<ReleaseId>,
    #[serde(default)]
    pub previous_before: Option<ReleaseId>,
    /// This command created the target's directory (so a failure may remove it).
    #[serde(default)]
    pub created_release: bool,
    #[serde(default)]
    pub steps: Vec<StepReport>,
    /// The process group of the hook running now, if any, and the boot it runs in (a
    /// group id from an earlier boot means nothing).
    #[serde(default)]
    pub hook_pgid: Option<i32>,
    #[serde(default)]
    pub hook_boot: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            phase: Phase::Accepted,
            started_at: Utc::now(),
            target: None,
            current_before: None,
            previous_before: None,
            created_release: false,
            steps: Vec::new(),
            hook_pgid: None,
            hook_boot: None,
            error: None,
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// What the journal knows about an incoming command id.
pub enum Lookup {
    New,
    /// The same bytes were recorded before.
    Known(Entry),
    /// The id was recorded with different bytes.
    Reused,
}

/// The journal directory.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

/// One command's entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: Uuid,
    dir: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, LayoutError> {
        let dir = state_dir.join("journal");
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(Self { dir })
    }

    /// Looks a command up by id; `payload` is its signed payload (the envelope around it
    /// may differ between two sendings of the same command).
    pub fn lookup(&self, id: Uuid, payload: &[u8]) -> Result<Lookup, LayoutError> {
        let entry = Entry {
            id,
            dir: self.dir.join(id.to_string()),
        };
        match fs::read(entry.dir.join("payload")) {
            Ok(recorded) if recorded == payload => Ok(Lookup::Known(entry)),
            Ok(_) => Ok(Lookup::Reused),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Lookup::New),
            Err(e) => Err(io_at(&entry.dir)(e)),
        }
    }

    /// Records a new command durably. Done before the delivery is acked.
    pub fn record(&self, id: Uuid, raw: &[u8], payload: &[u8]) -> Result<Entry, LayoutError> {
        let dir = self.dir.join(id.to_string());
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let entry = Entry { id, dir };
        // Its name becomes durable with the fsyncs below, before the command is acked.
        fs::File::create(entry.result_path()).map_err(io_at(&entry.dir))?;
        entry.save_progress(&Progress::new())?;
        write_atomic(&entry.dir.join("payload"), payload)?;
        write_atomic(&entry.dir.join("command"), raw)?;
        convoy_release::fsync_dir(&self.dir)?;
        Ok(entry)
    }

    /// Every recorded entry with a command.
    pub fn entries(&self) -> Result<Vec<Entry>, LayoutError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_at(&self.dir))?.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            let entry = Entry { id, dir: e.path() };
            if entry.dir.join("command").exists() {
                out.push(entry);
            } else {
                // Crashed between mkdir and the command write: never acked, so it comes again.
                let _ = fs::remove_dir_all(&entry.dir);
            }
        }
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    /// Forgets finished entries older than `days`.
    pub fn prune(&self, days: u32) -> Result<usize, LayoutError> {
        let cutoff =
            std::time::SystemTime::now() - std::time::Duration::from_secs(u64::from(days) * 86_400);
        let mut removed = 0;
        for entry in self.entries()? {
            let old = fs::metadata(entry.dir.join("command"))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old && entry.is_published() {
                fs::remove_dir_all(&entry.dir).map_err(io_at(&entry.dir))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Entry {
    pub fn command(&self) -> Result<Vec<u8>, LayoutError> {
        let p = self.dir.join("command");
        fs::read(&p).map_err(io_at(&p))
    }

    pub fn progress(&self) -> Progress {
        fs::read(self.dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save_progress(&self, progress: &Progress) -> Result<(), LayoutError> {
        let bytes = serde_json::to_vec_pretty(progress).unwrap_or_default();
        write_atomic(&self.dir.join("state.json"), &bytes)
    }

    fn result_path(&self) -> PathBuf {
        self.dir.join("result")
    }

    /// The recorded result, if the command finished and its result was saved whole. Whole
    /// means well-formed JSON (a torn save never is), not "decodes with this build": a
    /// result an older agent recorded is still a result, answered as it was.
    pub fn result(&self) -> Option<Vec<u8>> {
        let bytes = fs::read(self.result_path()).ok()?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .is_ok()
            .then_some(bytes)
    }

    /// Saves the result durably before it is published: one write and one fdatasync into
    /// the file created with the entry (the result is on the path from the agent's last
    /// step to the conductor). Entries recorded by an older agent have no such file and
    /// get an atomic write.
    pub fn save_result(&self, bytes: &[u8]) -> Result<(), LayoutError> {
        let path = self.result_path();
        match fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
        {
            Ok(mut f) => f
                .write_all(bytes)
                .and_then(|()| f.sync_data())
                .map_err(io_at(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomic(&path, bytes),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    pub fn is_published(&self) -> bool {
        self.dir.join("published").exists()
    }

    pub fn mark_published(&self) -> Result<(), LayoutError> {
        write_atomic(&self.dir.join("published"), b"")
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use convoy_message::Message;

    #[test]
    fn same_bytes_are_known_other_bytes_are_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = Uuid::now_v7();
        assert!(matches!(j.lookup(id, b"cmd").unwrap(), Lookup::New));
        let e = j.record(id, b"envelope", b"cmd").unwrap();
        assert!(matches!(j.lookup(id, b"cmd").unwrap(), Lookup::Known(_)));
        assert!(matches!(j.lookup(id, b"other").unwrap(), Lookup::Reused));
        assert_eq!(e.progress().phase, Phase::Accepted);
        assert!(e.result().is_none(), "an entry starts with no result");
        let result = Message::new("agent", heartbeat()).encode().unwrap();
        e.save_result(&result[..result.len() / 2]).unwrap();
        assert!(e.result().is_none(), "a torn result is no result");
        e.save_result(&result).unwrap();
        assert_eq!(e.result(), Some(result.clone()));
        e.save_result(&result[..10]).unwrap();
        assert!(
            e.result().is_none(),
            "a shorter save leaves no tail of the longer one"
        );
        e.save_result(&result).unwrap();
        e.mark_published().unwrap();
        assert_eq!(j.entries().unwrap().len(), 1);
        assert_eq!(j.prune(0).unwrap(), 1);
    }

    #[test]
    fn an_entry_without_a_result_file_still_saves_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let e = j.record(Uuid::now_v7(), b"envelope", b"cmd").unwrap();
        fs::remove_file(e.result_path()).unwrap();
        let result = Message::new("agent", heartbeat()).encode().unwrap();
        e.save_result(&result).unwrap();
        assert_eq!(e.result(), Some(result));
    }

    fn heartbeat() -> convoy_message::Body {
        convoy_message::Body::Heartbeat(convoy_message::Heartbeat {
            host: "web-01".parse().unwrap(),
            labels: Default::default(),
            versions: Default::default(),
            apps: Default::default(),
            load: [0.0; 3],
            disk_free_bytes: 0,
            interval_s: 10,
            started_at: Utc::now(),
        })
    }
}
