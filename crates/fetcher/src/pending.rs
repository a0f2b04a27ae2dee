//! Push events received but not yet covered by a successful fetch, one file per repo under
//! `<mirror_dir>/.pending/`. An event is written here (and fsynced) before its delivery is
//! acked, so a crash or a broker restart between the ack and the fetch loses nothing: the
//! next fetch (at the latest the catch-up at start) answers it.

use convoy_release::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use uuid::Uuid;

pub struct Pending {
    dir: PathBuf,
    lock: Mutex<()>,
}

impl Pending {
    pub fn open(mirror_dir: &Path) -> std::io::Result<Self> {
        let dir = mirror_dir.join(".pending");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            lock: Mutex::new(()),
        })
    }

    fn file(&self, repo: &str) -> PathBuf {
        self.dir.join(repo)
    }

    /// Records an event durably.
    pub fn add(&self, repo: &str, id: Uuid) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.file(repo))?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_data()
    }

    /// The events waiting for a fetch of `repo`, oldest first, without duplicates.
    pub fn list(&self, repo: &str) -> Vec<Uuid> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read(repo)
    }

    fn read(&self, repo: &str) -> Vec<Uuid> {
        let text = std::fs::read_to_string(self.file(repo)).unwrap_or_default();
        let mut out: Vec<Uuid> = Vec::new();
        for id in text.lines().filter_map(|l| Uuid::parse_str(l.trim()).ok()) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    /// Forgets events a successful fetch answered (events added meanwhile stay).
    pub fn remove(&self, repo: &str, done: &[Uuid]) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let left: String = self
            .read(repo)
            .into_iter()
            .filter(|id| !done.contains(id))
            .map(|id| format!("{id}\n"))
            .collect();
        write_atomic(&self.file(repo), left.as_bytes()).map_err(std::io::Error::other)
    }
}
