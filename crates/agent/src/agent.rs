//! The agent's consumer: verify, journal, ack, execute — one app at a time.
//!
//! A command is acked as soon as it is in the journal, not after the deploy: a deploy may
//! outlast the broker's `consumer_timeout`, and the journal (not the delivery) is what makes
//! it survive a crash. A redelivered command is answered from the journal and never runs
//! twice; a command id reused with other bytes is dead-lettered as a replay.

use crate::config::AgentConfig;
use crate::execute::Run;
use crate::fault::Faults;
use crate::journal::{Entry, Journal, Lookup};
use crate::outbox::Outbox;
use chrono::Utc;
use convoy_bus::{Disposition, Handler, Incoming, Outgoing, Publisher, Retry, topology};
use convoy_message::names::HostName;
use convoy_message::signing::CommandVerifier;
use convoy_message::{Command, Message, Rejection, RejectionCode, routing};
use nix::fcntl::{Flock, FlockArg};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// What an execution needs from the agent.
pub struct Ctx {
    pub config: Arc<AgentConfig>,
    pub host: HostName,
    /// `agent@<host>`, the envelope's `from`.
    pub from: String,
    pub outbox: Outbox,
    pub faults: Faults,
    dead: Arc<Publisher>,
}

impl Ctx {
    /// Copies a command to the dead-letter queue with a reason, after it was acked (a ref
    /// that moved is only found out during the export).
    pub async fn dead_letter_copy(&self, entry: &Entry, reason: &str, detail: &str) {
        let Ok(payload) = entry.command() else { return };
        let out = Outgoing {
            exchange: Some(topology::dead_exchange(&self.config.exchange)),
            routing_key: routing::command(&self.host),
            id: entry.id,
            kind: "command".into(),
            payload,
            headers: vec![
                ("x-convoy-reason".into(), reason.into()),
                (
                    "x-convoy-detail".into(),
                    convoy_message::rejection::header_detail(detail),
                ),
                ("x-convoy-rejected-by".into(), self.from.clone()),
                ("x-convoy-rejected-at".into(), Utc::now().to_rfc3339()),
            ],
            transient: false,
        };
        if let Err(e) = self
            .dead
            .publish(&out, Retry::within(Duration::from_secs(10)))
            .await
        {
            tracing::warn!(error = %e, "could not copy a refused command to the dead-letter queue");
        }
    }
}

/// The agent: a [`Handler`] for the host's command queue.
pub struct Agent {
    ctx: Arc<RwLock<Arc<Ctx>>>,
    verifier: RwLock<CommandVerifier>,
    journal: Journal,
    app_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    running: Arc<Mutex<HashSet<Uuid>>>,
    tasks: TaskTracker,
}

fn load_verifier(config: &AgentConfig, host: &HostName) -> anyhow::Result<CommandVerifier> {
    let trust = config.trusted_keys()?;
    if trust.is_empty() {
        tracing::warn!(dir = %config.trusted_keys_dir.display(),
            "no trusted keys: every command will be refused");
    }
    let mut verifier = CommandVerifier::new(trust, host.clone());
    verifier.max_skew = chrono::Duration::seconds(i64::from(config.max_clock_skew_s));
    Ok(verifier)
}

impl Agent {
    pub fn new(
        config: AgentConfig,
        publisher: Arc<Publisher>,
        outbox: Outbox,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let host = config.host_name()?;
        let journal = Journal::open(&config.state_dir)
            .map_err(|e| anyhow::anyhow!("config key `state_dir`: {e}"))?;
        let verifier = load_verifier(&config, &host)?;
        let ctx = Ctx {
            from: format!("agent@{host}"),
            host,
            config: Arc::new(config),
            outbox,
            faults: Faults::from_env(),
            dead: publisher,
        };
        Ok(Self {
            ctx: Arc::new(RwLock::new(Arc::new(ctx))),
            verifier: RwLock::new(verifier),
            journal,
            app_locks: Mutex::default(),
            running: Arc::default(),
            tasks: TaskTracker::new(),
        })
    }

    fn ctx(&self) -> Arc<Ctx> {
        self.ctx
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn host(&self) -> HostName {
        self.ctx().host.clone()
    }

    /// Applies a reloaded config: apps, hooks, trusted keys. The host, broker and state
    /// directory need a restart.
    pub fn reload(&self, config: AgentConfig) -> anyhow::Result<()> {
        config.validate()?;
        let old = self.ctx();
        if config.host_name()? != old.host || config.state_dir != old.config.state_dir {
            anyhow::bail!("`host` and `state_dir` change only with a restart");
        }
        let verifier = load_verifier(&config, &old.host)?;
        let keys = verifier.trust.len();
        let ctx = Ctx {
            config: Arc::new(config),
            host: old.host.clone(),
            from: old.from.clone(),
            outbox: old.outbox.clone(),
            faults: old.faults.clone(),
            dead: old.dead.clone(),
        };
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = verifier;
        *self.ctx.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ctx);
        tracing::info!(trusted_keys = keys, "configuration reloaded");
        Ok(())
    }

    /// On start: republish results the broker never confirmed, and finish commands a
    /// previous run left unfinished.
    pub fn recover(&self) -> anyhow::Result<usize> {
        let ctx = self.ctx();
        let pruned = self.journal.prune(ctx.config.journal_days)?;
        if pruned > 0 {
            tracing::info!(pruned, "forgot old journal entries");
        }
        let mut resumed = 0;
        for entry in self.journal.entries()? {
            if let Some(bytes) = entry.result() {
                if !entry.is_published() {
                    republish(&ctx, entry, &bytes);
                }
                continue;
            }
            let raw = entry.command()?;
            let command = Message::decode(&raw)
                .ok()
                .and_then(|m| self.verifier().verify_signed(&m).ok());
            match command {
                Some(command) => {
                    resumed += 1;
                    self.spawn(entry, command);
                }
                None => {
                    tracing::error!(id = %entry.id, "journal entry no longer verifies; leaving it for a person")
                }
            }
        }
        Ok(resumed)
    }

    fn verifier(&self) -> CommandVerifier {
        self.verifier
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn app_lock(&self, app: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.app_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(app.to_owned()).or_default().clone()
    }

    /// Runs a command in the background under its app's lock.
    fn spawn(&self, entry: Entry, command: Command) {
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if !running.insert(command.id) {
                return;
            }
        }
        let ctx = self.ctx();
        let lock = command
            .action
            .app()
            .map(|a| (a.to_string(), self.app_lock(a.as_str())));
        let running = self.running.clone();
        self.tasks.spawn(async move {
            let id = command.id;
            // In-process order per app, and a flock against a second agent on this host.
            let _guard = match &lock {
                Some((_, mutex)) => Some(mutex.clone().lock_owned().await),
                None => None,
            };
            let flocked = match &lock {
                Some((app, _)) => Some(flock(&ctx, app).await),
                None => None,
            };
            // Another task (or agent) may have finished it while we waited for the locks.
            if let Some(bytes) = entry.result() {
                republish(&ctx, entry, &bytes);
            } else if let Some(Err(why)) = &flocked {
                let result = Run::new(&ctx, entry.clone(), command).fail_now(why.clone());
                finish(&ctx, entry, result);
            } else {
                let result = Run::new(&ctx, entry.clone(), command).execute().await;
                finish(&ctx, entry, result);
            }
            drop(flocked);
            running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// Waits for running commands, at most `deadline`; unfinished ones are recovered by
    /// the next start.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// Queues a recorded result for publication again, bytes unchanged (same message id).
fn republish(ctx: &Ctx, entry: Entry, bytes: &[u8]) {
    match Message::decode(bytes) {
        Ok(message) => {
            match routing::for_message(&message).map(|key| Outgoing::with_key(&message, key)) {
                Some(Ok(mut out)) => {
                    out.payload = bytes.to_vec();
                    ctx.outbox.result(out, entry);
                }
                _ => tracing::error!(id = %entry.id, "recorded result cannot be routed"),
            }
        }
        Err(e) => tracing::error!(id = %entry.id, error = %e, "recorded result is unreadable"),
    }
}

/// Records the result, then queues it for publication.
fn finish(ctx: &Ctx, entry: Entry, result: Message) {
    tracing::debug!(id = %entry.id, "result ready");
    let bytes = match result.encode() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a result");
            return;
        }
    };
    if let Err(e) = entry.save_result(&bytes) {
        tracing::error!(error = %e, "cannot record a result; it is published anyway");
    }
    ctx.faults.hit("after_result");
    if let Some(Ok(mut out)) = routing::for_message(&result).map(|k| Outgoing::with_key(&result, k))
    {
        out.payload = bytes;
        if let convoy_message::Body::Result(r) = &result.body {
            tracing::info!(id = %r.command_id, outcome = ?r.outcome, rolled_back = r.rolled_back,
                error = r.error.as_deref().unwrap_or(""), "command finished");
        }
        ctx.outbox.result(out, entry);
    }
}

/// Takes `<state_dir>/locks/<app>.lock` exclusively (waits for another agent process).
async fn flock(ctx: &Ctx, app: &str) -> Result<Flock<std::fs::File>, String> {
    let dir = ctx.config.state_dir.join("locks");
    let path = dir.join(format!("{app}.lock"));
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| e.to_string())?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .map_err(|e| format!("cannot take the app lock {shown}: {e}; nothing was done"))
}

impl Handler for Agent {
    async fn handle(&self, incoming: Incoming) -> Disposition {
        tracing::debug!(message = %incoming.message.id, "command delivered");
        let verifier = self.verifier();
        // Signature and address first; the validity window only for commands not seen
        // before, so a command re-sent after it expired is still answered from the journal.
        let command = match verifier.verify_signed(&incoming.message) {
            Ok(c) => c,
            Err(rejection) => return Disposition::DeadLetter(rejection),
        };
        let payload = match &incoming.message.body {
            convoy_message::Body::Command(signed) => signed.payload.clone(),
            _ => String::new(),
        };
        let ctx = self.ctx();
        match self.journal.lookup(command.id, payload.as_bytes()) {
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal; the command goes back to the queue");
                Disposition::Retry
            }
            Ok(Lookup::Reused) => Disposition::DeadLetter(Rejection::new(
                RejectionCode::Replayed,
                format!(
                    "command id {} was already executed here with a different payload",
                    command.id
                ),
            )),
            Ok(Lookup::Known(entry)) => {
                match entry.result() {
                    Some(bytes) => {
                        tracing::info!(id = %command.id, "command seen before: answering with the recorded result");
                        republish(&ctx, entry, &bytes);
                    }
                    None => self.spawn(entry, command),
                }
                Disposition::Ack
            }
            Ok(Lookup::New) => {
                tracing::debug!(id = %command.id, "command verified");
                if let Err(rejection) = verifier.check_window(&command, Utc::now()) {
                    return Disposition::DeadLetter(rejection);
                }
                match self
                    .journal
                    .record(command.id, &incoming.raw, payload.as_bytes())
                {
                    Ok(entry) => {
                        tracing::info!(id = %command.id, action = command.action.verb(),
                            app = command.action.app().map(|a| a.as_str()).unwrap_or("-"),
                            issuer = %command.issuer, "command accepted");
                        ctx.faults.hit("after_record");
                        self.spawn(entry, command);
                        Disposition::Ack
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot journal the command; it goes back to the queue");
                        Disposition::Retry
                    }
                }
            }
        }
    }
}
