//! The conductor's memory: one SQLite file (WAL, `synchronous = FULL`), written in one
//! transaction per change before anything is sent, so a restart resumes exactly.
//!
//! | table | holds |
//! | --- | --- |
//! | `rollouts` | every rollout, its state as JSON (`Rollout`) |
//! | `commands` | every signed command issued, by id: re-sent byte for byte after a restart |
//! | `results` | every agent result, by command id (a second copy is ignored) |
//! | `pipelines` | every pipeline run, as JSON (`Pipeline`) |
//! | `audit` | who did what, when |
//! | `refs` | refs and commits seen in push events and fetch reports |
//! | `seen` | ids of build events that started pipelines |
//! | `dead_letters` | what consumers refused, taken from the dead-letter queue (the newest [`DEAD_LETTERS_KEPT`]) |

use crate::dead::DeadLetter;
use crate::pipeline::Pipeline;
use crate::rollout::Rollout;
use chrono::{DateTime, Utc};
use convoy_message::DeployResult;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The causes are in the messages and not marked as sources: with both, `{:#}` printed
    // each twice ("file is not a database: file is not a database").
    #[error("the conductor's store {path}: {cause}")]
    Open {
        path: String,
        cause: rusqlite::Error,
    },
    #[error("the conductor's store: {0}")]
    Sql(rusqlite::Error),
    #[error("the conductor's store holds a record it cannot read ({what}): {cause}")]
    Corrupt {
        what: String,
        cause: serde_json::Error,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY,
    app TEXT NOT NULL,
    stage TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_app_stage ON rollouts (app, stage, id);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state);
CREATE TABLE IF NOT EXISTS rollout_hosts (
    rollout INTEGER NOT NULL,
    host TEXT NOT NULL,
    PRIMARY KEY (host, rollout)
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    rollout INTEGER,
    host TEXT NOT NULL,
    message BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    command TEXT PRIMARY KEY,
    rollout INTEGER,
    host TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_rollout ON results (rollout);
CREATE TABLE IF NOT EXISTS pipelines (
    id INTEGER PRIMARY KEY,
    app TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    app TEXT,
    stage TEXT,
    rollout INTEGER,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    repo TEXT NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    sha TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (repo, source, name)
);
CREATE TABLE IF NOT EXISTS seen (
    id TEXT PRIMARY KEY,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL UNIQUE,
    reason TEXT NOT NULL,
    meta TEXT NOT NULL,
    body TEXT NOT NULL
);
";

/// How many dead letters of each reason the store holds, most first.
pub type ReasonCounts = Vec<(String, i64)>;

/// The most dead letters one list gives.
pub const MAX_LISTED: usize = 500;

/// Dead letters the store keeps: older ones go as newer arrive.
pub const DEAD_LETTERS_KEPT: i64 = 5000;

/// One connection to the store. The engine owns the writer; readers open their own.
pub struct Store {
    conn: Connection,
}

/// One line of the audit trail.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub app: Option<String>,
    pub stage: Option<String>,
    pub rollout: Option<i64>,
    pub detail: String,
}

/// Filters for history.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    pub app: Option<String>,
    pub stage: Option<String>,
    pub host: Option<String>,
    pub limit: usize,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |cause| StoreError::Open {
            path: path.display().to_string(),
            cause,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        Ok(Self { conn })
    }

    /// Copies what the write-ahead log holds into the database without waiting for anyone
    /// (`PRAGMA wal_checkpoint(PASSIVE)`); returns the log's frames and how many of them are
    /// now in the database. Run on its own connection, away from the engine: when every
    /// frame is copied, the engine's next commit starts the log over and overwrites it
    /// instead of growing the file (an overwrite's fsync costs half an append's here), and
    /// the engine's commits rarely reach SQLite's own checkpoint, which would run inline.
    pub fn checkpoint(&self) -> Result<(i64, i64)> {
        Ok(self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })?)
    }

    /// Runs `f` in one transaction: all of it is durable, or none of it.
    pub fn write<T>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction()?;
        let out = f(&Tx { tx: &tx })?;
        tracing::trace!("committing");
        tx.commit()?;
        Ok(out)
    }

    pub fn rollout(&self, id: i64) -> Result<Option<Rollout>> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM rollouts WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        body.map(|b| parse(&b, &format!("rollout {id}")))
            .transpose()
    }

    /// Rollouts that have not ended, oldest first.
    pub fn unfinished_rollouts(&self) -> Result<Vec<Rollout>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, body FROM rollouts WHERE state NOT IN ('succeeded','rolled_back','aborted','superseded') ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, body) = row?;
            parse(&body, &format!("rollout {id}"))
        })
        .collect()
    }

    /// Newest first, filtered.
    pub fn history(&self, q: &HistoryQuery) -> Result<Vec<Rollout>> {
        let mut sql = String::from("SELECT body FROM rollouts r WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        if let Some(app) = &q.app {
            args.push(app.clone());
            sql += &format!(" AND r.app = ?{}", args.len());
        }
        if let Some(stage) = &q.stage {
            args.push(stage.clone());
            sql += &format!(" AND r.stage = ?{}", args.len());
        }
        if let Some(host) = &q.host {
            args.push(host.clone());
            sql += &format!(
                " AND r.id IN (SELECT rollout FROM rollout_hosts WHERE host = ?{})",
                args.len()
            );
        }
        sql += &format!(" ORDER BY r.id DESC LIMIT {}", q.limit.clamp(1, 10_000));
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            r.get::<_, String>(0)
        })?;
        rows.map(|b| parse(&b?, "rollout")).collect()
    }

    /// The releases this stage ran after successful rollouts, newest first, without repeats.
    pub fn stage_releases(&self, app: &str, stage: &str) -> Result<Vec<(String, Option<String>)>> {
        let mut stmt = self.conn.prepare(
            "SELECT body FROM rollouts WHERE app = ?1 AND stage = ?2 AND state = 'succeeded' ORDER BY id DESC LIMIT 200",
        )?;
        let rows = stmt.query_map(params![app, stage], |r| r.get::<_, String>(0))?;
        let mut out: Vec<(String, Option<String>)> = Vec::new();
        for body in rows {
            let r: Rollout = parse(&body?, "rollout")?;
            let release = r.release.to_string();
            if !out.iter().any(|(rel, _)| *rel == release) {
                out.push((release, r.commit.map(|c| c.to_string())));
            }
        }
        Ok(out)
    }

    pub fn results(&self, rollout: i64) -> Result<Vec<DeployResult>> {
        let mut stmt = self
            .conn
            .prepare("SELECT body FROM results WHERE rollout = ?1 ORDER BY received_at")?;
        let rows = stmt.query_map([rollout], |r| r.get::<_, String>(0))?;
        rows.map(|b| parse(&b?, "result")).collect()
    }

    pub fn has_result(&self, command: Uuid) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM results WHERE command = ?1")?
            .query_row([command.to_string()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Whether this store sent command `id` to `host`, and for which rollout: `None` when
    /// it never did (another conductor's command, one from before a restore, or a result
    /// claiming the wrong host); `Some(None)` for a command of no rollout (an inventory).
    pub fn command_sent(&self, id: Uuid, host: &str) -> Result<Option<Option<i64>>> {
        Ok(self
            .conn
            .prepare_cached("SELECT rollout FROM commands WHERE id = ?1 AND host = ?2")?
            .query_row(params![id.to_string(), host], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()?)
    }

    /// The stored message of a command, to send again.
    pub fn command(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT message FROM commands WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn pipeline(&self, id: i64) -> Result<Option<Pipeline>> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM pipelines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        body.map(|b| parse(&b, &format!("pipeline {id}")))
            .transpose()
    }

    pub fn pipelines(&self, app: Option<&str>, limit: usize) -> Result<Vec<Pipeline>> {
        let mut stmt = self.conn.prepare(
            "SELECT body FROM pipelines WHERE (?1 IS NULL OR app = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![app, limit.clamp(1, 10_000) as i64], |r| {
            r.get::<_, String>(0)
        })?;
        rows.map(|b| parse(&b?, "pipeline")).collect()
    }

    pub fn unfinished_pipelines(&self) -> Result<Vec<Pipeline>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, body FROM pipelines WHERE state NOT IN ('succeeded','failed','aborted') ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, body) = row?;
            parse(&body, &format!("pipeline {id}"))
        })
        .collect()
    }

    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, at, actor, action, app, stage, rollout, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit.clamp(1, 10_000) as i64], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                app: r.get(4)?,
                stage: r.get(5)?,
                rollout: r.get(6)?,
                detail: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Every (source, sha) known for `name` in `repo`.
    pub fn ref_sources(&self, repo: &str, name: &str) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT source, sha FROM refs WHERE repo = ?1 AND name = ?2")?;
        let rows = stmt.query_map(params![repo, name], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// Every ref of `repo` reported by `source`.
    pub fn refs_of(&self, repo: &str, source: &str) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, sha FROM refs WHERE repo = ?1 AND source = ?2 ORDER BY name")?;
        let rows = stmt.query_map(params![repo, source], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The newest dead letters first (at most [`MAX_LISTED`], without their bodies), with
    /// `reason` only those; and how many of each reason the store holds.
    pub fn dead_letters(
        &self,
        reason: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, ReasonCounts)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, meta FROM dead_letters WHERE ?1 IS NULL OR reason = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![reason, limit.clamp(1, MAX_LISTED) as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut letters = Vec::new();
        for row in rows {
            let (id, body) = row?;
            letters.push(DeadLetter {
                id,
                ..parse(&body, &format!("dead letter {id}"))?
            });
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason ORDER BY COUNT(*) DESC, reason",
        )?;
        let counts = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<std::result::Result<_, _>>()?;
        Ok((letters, counts))
    }

    /// One dead letter, with its body.
    pub fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT meta, body FROM dead_letters WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(meta, body)| {
            Ok(DeadLetter {
                id,
                body: Some(body),
                ..parse(&meta, &format!("dead letter {id}"))?
            })
        })
        .transpose()
    }

    pub fn seen(&self, id: Uuid) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM seen WHERE id = ?1", [id.to_string()], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }
}

/// The writes of one transaction.
pub struct Tx<'a> {
    tx: &'a rusqlite::Transaction<'a>,
}

impl Tx<'_> {
    /// Runs a statement from the connection's statement cache (the same few run for every
    /// result, so they are parsed once).
    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
        Ok(self.tx.prepare_cached(sql)?.execute(params)?)
    }

    /// Inserts a new rollout, giving it its id.
    pub fn insert_rollout(&self, rollout: &mut Rollout) -> Result<()> {
        self.exec(
            "INSERT INTO rollouts (app, stage, state, created_at, updated_at, body) VALUES (?1, ?2, ?3, ?4, ?4, '{}')",
            params![rollout.app.as_str(), rollout.stage, rollout.state.as_str(), ts(rollout.created_at)],
        )?;
        rollout.id = self.tx.last_insert_rowid();
        for h in &rollout.hosts {
            self.exec(
                "INSERT OR IGNORE INTO rollout_hosts (rollout, host) VALUES (?1, ?2)",
                params![rollout.id, h.host.as_str()],
            )?;
        }
        self.save_rollout(rollout)
    }

    pub fn save_rollout(&self, rollout: &Rollout) -> Result<()> {
        let body = serde_json::to_string(rollout).map_err(|cause| StoreError::Corrupt {
            what: format!("rollout {}", rollout.id),
            cause,
        })?;
        self.exec(
            "UPDATE rollouts SET state = ?2, updated_at = ?3, body = ?4 WHERE id = ?1",
            params![
                rollout.id,
                rollout.state.as_str(),
                ts(rollout.updated_at),
                body
            ],
        )?;
        Ok(())
    }

    pub fn insert_command(
        &self,
        id: Uuid,
        rollout: Option<i64>,
        host: &str,
        message: &[u8],
    ) -> Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO commands (id, rollout, host, message, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id.to_string(), rollout, host, message, ts(Utc::now())],
        )?;
        Ok(())
    }

    /// Stores a result; false when one for this command is already stored.
    pub fn insert_result(&self, rollout: Option<i64>, result: &DeployResult) -> Result<bool> {
        let body = serde_json::to_string(result).map_err(|cause| StoreError::Corrupt {
            what: format!("result of {}", result.command_id),
            cause,
        })?;
        let n = self.exec(
            "INSERT OR IGNORE INTO results (command, rollout, host, body, received_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![result.command_id.to_string(), rollout, result.host.as_str(), body, ts(Utc::now())],
        )?;
        Ok(n == 1)
    }

    pub fn insert_pipeline(&self, p: &mut Pipeline) -> Result<()> {
        self.exec(
            "INSERT INTO pipelines (app, state, created_at, updated_at, body) VALUES (?1, ?2, ?3, ?3, '{}')",
            params![p.app.as_str(), p.state.as_str(), ts(p.created_at)],
        )?;
        p.id = self.tx.last_insert_rowid();
        self.save_pipeline(p)
    }

    pub fn save_pipeline(&self, p: &Pipeline) -> Result<()> {
        let body = serde_json::to_string(p).map_err(|cause| StoreError::Corrupt {
            what: format!("pipeline {}", p.id),
            cause,
        })?;
        self.exec(
            "UPDATE pipelines SET state = ?2, updated_at = ?3, body = ?4 WHERE id = ?1",
            params![p.id, p.state.as_str(), ts(p.updated_at), body],
        )?;
        Ok(())
    }

    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        app: Option<&str>,
        stage: Option<&str>,
        rollout: Option<i64>,
        detail: &str,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO audit (at, actor, action, app, stage, rollout, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![ts(Utc::now()), actor, action, app, stage, rollout, detail],
        )?;
        Ok(())
    }

    pub fn set_ref(&self, repo: &str, source: &str, name: &str, sha: Option<&str>) -> Result<()> {
        match sha {
            Some(sha) => self.exec(
                "INSERT INTO refs (repo, source, name, sha, at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (repo, source, name) DO UPDATE SET sha = excluded.sha, at = excluded.at",
                params![repo, source, name, sha, ts(Utc::now())],
            )?,
            None => self.exec(
                "DELETE FROM refs WHERE repo = ?1 AND source = ?2 AND name = ?3",
                params![repo, source, name],
            )?,
        };
        Ok(())
    }

    /// Replaces every ref `source` reported for `repo`.
    pub fn replace_refs<'r>(
        &self,
        repo: &str,
        source: &str,
        refs: impl Iterator<Item = (&'r str, &'r str)>,
    ) -> Result<()> {
        self.exec(
            "DELETE FROM refs WHERE repo = ?1 AND source = ?2",
            params![repo, source],
        )?;
        for (name, sha) in refs {
            self.set_ref(repo, source, name, Some(sha))?;
        }
        Ok(())
    }

    /// Keeps dead letters (a second copy, by digest, is ignored), and lets the oldest go
    /// beyond [`DEAD_LETTERS_KEPT`]. The number of each that is new.
    pub fn insert_dead_letters(
        &self,
        letters: &[(DeadLetter, String)],
    ) -> Result<Vec<Option<i64>>> {
        let ids = letters
            .iter()
            .map(|(letter, digest)| self.insert_dead_letter(letter, digest))
            .collect::<Result<Vec<_>>>()?;
        self.exec(
            "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?1",
            [DEAD_LETTERS_KEPT],
        )?;
        Ok(ids)
    }

    fn insert_dead_letter(&self, letter: &DeadLetter, digest: &str) -> Result<Option<i64>> {
        let meta = DeadLetter {
            body: None,
            ..letter.clone()
        };
        let meta = serde_json::to_string(&meta).map_err(|cause| StoreError::Corrupt {
            what: "a dead letter".into(),
            cause,
        })?;
        let added = self.exec(
            "INSERT OR IGNORE INTO dead_letters (digest, reason, meta, body) VALUES (?1, ?2, ?3, ?4)",
            params![digest, letter.reason, meta, letter.body.as_deref().unwrap_or("")],
        )?;
        Ok((added == 1).then(|| self.tx.last_insert_rowid()))
    }

    /// Forgets the dead letters up to and including `through` (all with `None`); how many.
    pub fn clear_dead_letters(&self, through: Option<i64>) -> Result<usize> {
        self.exec(
            "DELETE FROM dead_letters WHERE ?1 IS NULL OR id <= ?1",
            [through],
        )
    }

    pub fn mark_seen(&self, id: Uuid) -> Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO seen (id, at) VALUES (?1, ?2)",
            params![id.to_string(), ts(Utc::now())],
        )?;
        Ok(())
    }
}

fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse<T: serde::de::DeserializeOwned>(body: &str, what: &str) -> Result<T> {
    serde_json::from_str(body).map_err(|cause| StoreError::Corrupt {
        what: what.to_owned(),
        cause,
    })
}
