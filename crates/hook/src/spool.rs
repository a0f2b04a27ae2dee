//! The spool: events the broker did not confirm in time, kept on disk until `drain`
//! publishes them — oldest first, with the ids they were born with.
//!
//! The maildir pattern: an event is written under `tmp/`, fsynced, then renamed into `new/`,
//! so `new/` only ever holds complete files. File names start with the time in nanoseconds,
//! so sorting them gives the order they were spooled in. A file that no longer decodes is
//! moved to `bad/` with a log line, never deleted.

use convoy_bus::{Outgoing, PublishError, Publisher, Retry};
use convoy_message::{Message, routing};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        for sub in ["tmp", "new", "bad"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one encoded message durably.
    pub fn put(&self, bytes: &[u8], id: Uuid) -> std::io::Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("{nanos:020}-{id}.json");
        let tmp = self.dir.join("tmp").join(&name);
        let new = self.dir.join("new").join(&name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &new)?;
        std::fs::File::open(self.dir.join("new"))?.sync_all()?;
        Ok(new)
    }

    /// Spooled files, oldest first.
    pub fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("new"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        Ok(files)
    }

    pub fn is_empty(&self) -> bool {
        self.list().map(|l| l.is_empty()).unwrap_or(true)
    }

    fn quarantine(&self, path: &Path, why: &str) {
        tracing::error!(file = %path.display(), why, "spooled event cannot be sent; moved to bad/");
        if let Some(name) = path.file_name() {
            let _ = std::fs::rename(path, self.dir.join("bad").join(name));
        }
    }

    /// Publishes spooled events oldest first; stops at the first one not confirmed within
    /// `per_event` (order is kept: nothing newer overtakes it), or at `deadline`. Returns how
    /// many were sent.
    pub async fn drain(
        &self,
        publisher: &Publisher,
        per_event: Duration,
        deadline: Option<Instant>,
    ) -> Result<usize, PublishError> {
        let mut sent = 0;
        for path in self.list().map_err(|e| {
            PublishError::Encode(convoy_message::Rejection::new(
                convoy_message::RejectionCode::Malformed,
                format!("reading the spool {}: {e}", self.dir.display()),
            ))
        })? {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let message = match Message::decode(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    self.quarantine(&path, &e.to_string());
                    continue;
                }
            };
            let Some(key) = routing::for_message(&message) else {
                self.quarantine(&path, "not a routable event");
                continue;
            };
            let mut out = Outgoing::with_key(&message, key)?;
            out.payload = bytes;
            let budget = match deadline {
                Some(d) if Instant::now() >= d => break,
                Some(d) => per_event.min(d.saturating_duration_since(Instant::now())),
                None => per_event,
            };
            publisher.publish(&out, Retry::within(budget)).await?;
            std::fs::remove_file(&path).ok();
            sent += 1;
        }
        Ok(sent)
    }
}
