//! The engine: one task that owns the store and every unfinished rollout and pipeline, and
//! handles one input at a time — an agent's result, a build event, an operator's request, a
//! gate's verdict, a timer. Each change is written to the store in one transaction, then the
//! commands it issued are sent; an input is acknowledged (to the broker or the HTTP caller)
//! only after its transaction committed.

use crate::config::{AppConfig, Concurrency, Config, GateConfig, StageConfig};
use crate::dead::DeadLetter;
use crate::fleet::{Fleet, Liveness};
use crate::pipeline::{
    GateCheck, GateContext, GateOutcome, GateRecord, GateState, Pipeline, PipelineState, TestsGate,
    Verdict,
};
use crate::plan::{BatchPlan, Budget};
use crate::rollout::{
    Dispatch, HostReport, Rollout, RolloutKind, RolloutSpec, RolloutState, Strategy,
};
use crate::store::{Store, StoreError, Tx};
use chrono::{DateTime, Utc};
use convoy_bus::{Consumer, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use convoy_message::{
    Action, Body, BuildEvent, BuildStatus, Command, DeployOutcome, DeployProgress, DeployResult,
    DeploySpec, FetchReport, FetchStatus, InventoryReport, KeyPair, Message, PushEvent, routing,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Something that happened, for the live stream (SSE) and the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// `rollout`, `pipeline`, `progress`, `result`, `host`.
    pub kind: &'static str,
    pub data: Value,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub commands_sent: AtomicU64,
    pub results: AtomicU64,
    pub duplicate_results: AtomicU64,
    pub heartbeats: AtomicU64,
    pub rollouts_started: AtomicU64,
    pub store_errors: AtomicU64,
    /// Dead letters taken into the store.
    pub dead_letters: AtomicU64,
}

const MAX_TRACKED_STEPS: usize = 20_000;

/// At most this many waiting results share one transaction.
const MAX_RESULT_GROUP: usize = 256;
/// How long an inventory command stays valid: a host whose agent is down longer than this
/// does not answer an old question when it comes back.
const INVENTORY_VALIDITY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// What the engine, the HTTP API and the consumers share.
pub struct Shared {
    pub config: Arc<Config>,
    pub fleet: Fleet,
    pub events: broadcast::Sender<Event>,
    pub metrics: Metrics,
    /// Active rollouts' summaries, for fast reads by the API.
    pub active: Mutex<BTreeMap<i64, Value>>,
    /// The step each command in flight reported last (memory only: what a host is doing
    /// now, for the dashboard). Dropped when the command's result arrives.
    pub steps: Mutex<Steps>,
    /// Inventories asked and answered (memory only: asked again after a restart).
    pub inventories: Mutex<Inventories>,
    /// Why the dead-letter keeper cannot take the dead letters now, if it cannot: shown with
    /// them, so that an empty list is never mistaken for none refused.
    dead_letters_blocked: Mutex<Option<String>>,
}

/// Each host's pending inventory question and its last answer. Only answers to a question
/// this conductor asked are kept, so both maps are bounded by the hosts operators asked.
#[derive(Default)]
pub struct Inventories {
    asked: std::collections::HashMap<HostName, (Uuid, DateTime<Utc>)>,
    answers: std::collections::HashMap<HostName, Value>,
    /// The host's agent refused the last question outright (a signature it cannot check…).
    refused: std::collections::HashMap<HostName, Value>,
}

/// What is known of one host's inventory: its last answer, the question still waiting,
/// and the refusal of the last question.
pub type InventoryView = (Option<Value>, Option<(Uuid, DateTime<Utc>)>, Option<Value>);

impl Inventories {
    /// The command still waiting for the host's answer, while it is valid.
    fn pending(&self, host: &HostName, now: DateTime<Utc>) -> Option<(Uuid, DateTime<Utc>)> {
        self.asked
            .get(host)
            .copied()
            .filter(|(_, expires)| now < *expires)
    }
}

/// What each command in flight is doing now, from its progress events; and the commands
/// recently finished, whose late progress is ignored (progress and results travel on
/// separate queues, so a step can arrive after its command's result).
#[derive(Default)]
pub struct Steps {
    now: std::collections::HashMap<Uuid, DeployProgress>,
    finished: std::collections::HashSet<Uuid>,
    finished_order: std::collections::VecDeque<Uuid>,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Self {
            fleet: Fleet::new(config.stale_after, config.gone_after),
            config,
            events,
            metrics: Metrics::default(),
            active: Mutex::new(BTreeMap::new()),
            steps: Mutex::new(Steps::default()),
            inventories: Mutex::new(Default::default()),
            dead_letters_blocked: Mutex::new(None),
        })
    }

    /// The host's last inventory answer, the question still waiting for its agent, and the
    /// refusal of the last question.
    pub fn inventory_of(&self, host: &HostName) -> InventoryView {
        let inv = self.inventories.lock().unwrap_or_else(|e| e.into_inner());
        (
            inv.answers.get(host).cloned(),
            inv.pending(host, now()),
            inv.refused.get(host).cloned(),
        )
    }

    /// Why the dead-letter keeper cannot take the dead letters now, if it cannot.
    pub fn dead_letters_blocked(&self) -> Option<String> {
        self.dead_letters_blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_dead_letters_blocked(&self, why: Option<String>) {
        *self
            .dead_letters_blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// The agent refused the inventory question this conductor asked it: no answer will
    /// come, and whoever waits for one hears why.
    fn note_inventory_refused(&self, host: &HostName, command: Uuid, why: &str) {
        let view = json!({ "host": host, "command": command, "refused_at": now(), "refused": why });
        self.settle_inventory(host, command, view, |inv, view| {
            inv.refused.insert(host.clone(), view);
        });
    }

    /// Ends the inventory question `command` this conductor asked `host`: `keep` records
    /// `view`, which is then shown live. False, doing nothing, for any other command.
    fn settle_inventory(
        &self,
        host: &HostName,
        command: Uuid,
        view: Value,
        keep: impl FnOnce(&mut Inventories, Value),
    ) -> bool {
        {
            let mut inv = self.inventories.lock().unwrap_or_else(|e| e.into_inner());
            if inv.asked.get(host).map(|(id, _)| *id) != Some(command) {
                return false;
            }
            inv.asked.remove(host);
            keep(&mut inv, view.clone());
        }
        self.emit("inventory", view);
        true
    }

    /// Keeps a host's answer to the inventory this conductor asked it (the last one wins)
    /// and shows it live; any other report is ignored.
    pub fn note_inventory(&self, report: &InventoryReport) {
        let view = json!({
            "host": report.host, "command": report.command_id, "received_at": now(),
            "apps": report.apps, "releases": report.releases,
        });
        let kept = self.settle_inventory(&report.host, report.command_id, view, |inv, view| {
            inv.refused.remove(&report.host);
            inv.answers.insert(report.host.clone(), view);
        });
        if !kept {
            tracing::info!(host = %report.host, command = %report.command_id,
                "an inventory report this conductor did not ask for (or asked before a restart); ignored");
        }
    }

    /// Remembers what a command in flight is doing now.
    pub fn note_progress(&self, progress: &DeployProgress) {
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if steps.finished.contains(&progress.command_id) {
            return;
        }
        if steps.now.len() >= MAX_TRACKED_STEPS {
            // Results that never came (hosts that died mid-step): forget the oldest half.
            let mut ids: Vec<_> = steps
                .now
                .iter()
                .map(|(id, p)| (*id, p.release.clone()))
                .collect();
            ids.sort_by(|a, b| a.1.cmp(&b.1));
            for (id, _) in ids.into_iter().take(MAX_TRACKED_STEPS / 2) {
                steps.now.remove(&id);
            }
        }
        steps.now.insert(progress.command_id, progress.clone());
    }

    /// The step command `id` reported last, while it runs.
    pub fn step_of(&self, id: Uuid) -> Option<DeployProgress> {
        let steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        steps.now.get(&id).cloned()
    }

    /// Command `id` has its result: forget its step, and ignore its late progress.
    pub fn forget_progress(&self, id: Uuid) {
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        steps.now.remove(&id);
        if steps.finished.insert(id) {
            steps.finished_order.push_back(id);
            if steps.finished_order.len() > MAX_TRACKED_STEPS
                && let Some(old) = steps.finished_order.pop_front()
            {
                steps.finished.remove(&old);
            }
        }
    }

    pub fn emit(&self, kind: &'static str, data: Value) {
        let _ = self.events.send(Event { kind, data });
    }
}

/// Why a request was refused: each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for RequestError {
    fn from(e: StoreError) -> Self {
        RequestError::Internal(e.to_string())
    }
}

/// Strategy overrides given with a deploy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyOverrides {
    pub batches: Option<BatchPlan>,
    pub max_failures: Option<Budget>,
    pub host_deadline_s: Option<u64>,
    pub pause_s: Option<u64>,
    pub on_failure: Option<crate::config::OnFailure>,
}

impl StrategyOverrides {
    fn apply(&self, mut s: Strategy) -> Result<Strategy, RequestError> {
        if let Some(b) = &self.batches {
            b.check().map_err(RequestError::Invalid)?;
            s.batches = b.clone();
        }
        if let Some(m) = self.max_failures {
            m.check().map_err(RequestError::Invalid)?;
            s.max_failures = m;
        }
        if let Some(d) = self.host_deadline_s {
            if !(1..=crate::config::MAX_HOST_DEADLINE_S).contains(&d) {
                return Err(RequestError::Invalid(format!(
                    "host_deadline_s must be between 1 and {}",
                    crate::config::MAX_HOST_DEADLINE_S
                )));
            }
            s.host_deadline_s = d;
        }
        if let Some(p) = self.pause_s {
            if p > crate::config::MAX_PAUSE_S {
                return Err(RequestError::Invalid(format!(
                    "pause_s must be at most {} (a week); `convoy pause` holds a rollout longer",
                    crate::config::MAX_PAUSE_S
                )));
            }
            s.pause_s = p;
        }
        if let Some(f) = self.on_failure {
            s.on_failure = f;
        }
        Ok(s)
    }
}

/// `deploy APP REF --to STAGE`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub app: String,
    pub stage: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit the ref must point to; looked up from pushes and fetch reports when absent.
    #[serde(default)]
    pub commit: Option<String>,
    #[serde(default)]
    pub strategy: StrategyOverrides,
    /// Only compute and return the plan.
    #[serde(default)]
    pub plan: bool,
    /// Carry the commit on through the later stages and their gates, as a pipeline that
    /// starts at this stage (what a CI success does from the first stage).
    #[serde(default)]
    pub pipeline: bool,
}

/// Where and how a pipeline starts: at stage `first` (0 for CI successes), with the
/// release id, strategy and person a deploy request gave.
#[derive(Default)]
struct PipelineStart {
    first: usize,
    release: Option<ReleaseId>,
    strategy: Option<Strategy>,
    by: Option<String>,
}

/// An operator's request, with who asked.
#[derive(Debug)]
pub enum Request {
    Deploy(DeployRequest),
    Abort(i64),
    Pause(i64),
    Resume(i64),
    Retry(i64),
    Rollback {
        app: String,
        stage: String,
    },
    Promote {
        app: String,
        stage: Option<String>,
    },
    /// Ask one host what each app runs and which releases it keeps.
    Inventory {
        host: String,
    },
    /// Forget the dead letters kept, up to and including `through` (all without).
    ClearDeadLetters {
        through: Option<i64>,
    },
}

impl Request {
    /// A rollout action by its name in a URL (`/rollouts/{id}/{action}`); `Err` says which
    /// names exist.
    pub fn rollout_action(id: i64, action: &str) -> Result<Self, String> {
        match action {
            "abort" => Ok(Self::Abort(id)),
            "pause" => Ok(Self::Pause(id)),
            "resume" => Ok(Self::Resume(id)),
            "retry" => Ok(Self::Retry(id)),
            other => Err(format!(
                "unknown action {other:?}: use abort, pause, resume or retry"
            )),
        }
    }
}

/// One input to the engine.
pub enum Input {
    Result {
        result: Box<DeployResult>,
        done: oneshot::Sender<bool>,
    },
    Build {
        id: Uuid,
        event: BuildEvent,
        done: oneshot::Sender<bool>,
    },
    Push {
        event: PushEvent,
        done: oneshot::Sender<bool>,
    },
    Fetch {
        report: FetchReport,
        done: oneshot::Sender<bool>,
    },
    Request {
        request: Request,
        user: String,
        reply: oneshot::Sender<Result<Value, RequestError>>,
    },
    GateDone {
        pipeline: i64,
        outcome: GateOutcome,
    },
    /// Refused messages taken from the dead-letter queue, each with its digest.
    DeadLetters {
        letters: Vec<(DeadLetter, String)>,
        done: oneshot::Sender<bool>,
    },
}

pub struct Engine {
    shared: Arc<Shared>,
    store: Store,
    key: KeyPair,
    publisher: Arc<Publisher>,
    declared: Arc<tokio::sync::Mutex<HashSet<HostName>>>,
    rollouts: BTreeMap<i64, Rollout>,
    pipelines: BTreeMap<i64, Pipeline>,
    inputs: mpsc::Sender<Input>,
    cancel: CancellationToken,
    /// Started paused (after a restore): no rollout the conductor would start by itself
    /// (queued, a pipeline's next stage) dispatches, until an operator resumes one.
    held: bool,
    /// The rollouts the store showed unfinished at a paused start: neither ticked (no
    /// deadline fails a host, no budget halts) nor sent to, each until an operator resumes
    /// (or retries, or aborts) it.
    held_rollouts: HashSet<i64>,
    /// The `<state_dir>/start-paused` file that asked for it, removed at the first resume:
    /// until then every restart is paused too.
    held_marker: Option<std::path::PathBuf>,
}

/// Why a rollout is paused when the conductor started paused.
const HELD: &str = "the conductor started paused (after a restore?): check `convoy status` and \
    `convoy hosts`, then `convoy resume ID` or `convoy abort ID`";

/// The audit line of a rollout paused because the conductor started paused.
fn audit_held(tx: &Tx<'_>, app: &str, stage: &str, id: i64) -> Result<(), StoreError> {
    tx.audit("conductor", "pause", Some(app), Some(stage), Some(id), HELD)
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

impl Engine {
    pub fn new(
        shared: Arc<Shared>,
        store: Store,
        key: KeyPair,
        publisher: Arc<Publisher>,
        inputs: mpsc::Sender<Input>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            shared,
            store,
            key,
            publisher,
            declared: Arc::new(tokio::sync::Mutex::new(HashSet::new())),
            rollouts: BTreeMap::new(),
            pipelines: BTreeMap::new(),
            inputs,
            cancel,
            held: false,
            held_rollouts: HashSet::new(),
            held_marker: None,
        }
    }

    /// Starts paused: see [`Engine::held`]. `marker` is removed at the first resume.
    pub fn start_paused(mut self, marker: Option<std::path::PathBuf>) -> Self {
        self.held = true;
        self.held_marker = marker;
        self
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Loads what was unfinished, sends again every command still waiting for its result,
    /// restarts running gates, then handles inputs until cancelled.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) -> Result<(), StoreError> {
        for mut r in self.store.unfinished_rollouts()? {
            let id = r.id;
            if self.held {
                // Nothing is sent, not even the commands in flight: `resume` sends those again.
                self.held_rollouts.insert(id);
                let t = now();
                if r.state == RolloutState::Running && r.pause(t).is_ok() {
                    self.store.write(|tx| {
                        tx.save_rollout(&r)?;
                        audit_held(tx, r.app.as_str(), &r.stage, id)
                    })?;
                }
                tracing::warn!(rollout = id, app = %r.app, stage = %r.stage, state = r.state.as_str(),
                    "rollout held: {HELD}");
                self.rollouts.insert(id, r);
                self.publish_summary(id);
                continue;
            }
            let resend = r.in_flight();
            tracing::info!(rollout = id, app = %r.app, stage = %r.stage, state = r.state.as_str(),
                in_flight = resend.len(), "resuming rollout");
            self.rollouts.insert(id, r);
            self.publish_summary(id);
            self.send_all(id, &resend);
        }
        if self.held {
            tracing::warn!(
                "started paused: no rollout goes on and none starts by itself until an operator resumes one"
            );
        }
        for p in self.store.unfinished_pipelines()? {
            let id = p.id;
            let gating = p.state == PipelineState::Gating;
            self.pipelines.insert(id, p);
            if gating {
                tracing::info!(pipeline = id, "restarting the gate that was running");
                self.start_gate_check(id);
            }
        }
        let ids: Vec<i64> = self.rollouts.keys().copied().collect();
        for id in ids {
            self.tick(id);
        }
        self.recover_handoffs();
        loop {
            let wake = self
                .rollouts
                .values()
                .filter_map(Rollout::next_wakeup)
                .min()
                .map(|t| (t - now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                input = inputs.recv() => match input {
                    Some(Input::Result { result, done }) => {
                        self.handle_results(*result, done, &mut inputs);
                    }
                    Some(input) => self.handle(input),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(wake) => {
                    let ids: Vec<i64> = self.rollouts.keys().copied().collect();
                    for id in ids {
                        self.tick(id);
                    }
                }
            }
        }
    }

    /// Finishes what a crash may have cut between two transactions: a queued rollout whose
    /// stage is free, a pipeline whose stage's rollout already ended.
    fn recover_handoffs(&mut self) {
        let queued: Vec<(Name, String)> = self
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Queued)
            .map(|r| (r.app.clone(), r.stage.clone()))
            .collect();
        for (app, stage) in queued {
            self.start_queued(&app, &stage);
        }
        let unstarted: Vec<(i64, usize)> = self
            .pipelines
            .values()
            .filter(|p| p.state == PipelineState::Deploying && p.rollouts.is_empty())
            .map(|p| (p.id, p.stage))
            .collect();
        for (pid, stage) in unstarted {
            tracing::info!(
                pipeline = pid,
                "starting the first rollout of a pipeline cut off before it"
            );
            self.start_stage(pid, stage, None, None);
        }
        let deploying: Vec<(i64, i64)> = self
            .pipelines
            .values()
            .filter(|p| p.state == PipelineState::Deploying)
            .filter_map(|p| p.rollouts.last().map(|r| (p.id, *r)))
            .collect();
        for (pid, rid) in deploying {
            if self.rollouts.contains_key(&rid) {
                continue;
            }
            if let Ok(Some(r)) = self.store.rollout(rid)
                && r.state.is_terminal()
            {
                tracing::info!(
                    pipeline = pid,
                    rollout = rid,
                    "moving on a pipeline whose rollout ended before the restart"
                );
                self.pipeline_stage_ended(pid, &r);
            }
        }
    }

    /// A result, and every result already waiting behind it: one transaction for all.
    fn handle_results(
        &mut self,
        first: DeployResult,
        done: oneshot::Sender<bool>,
        inputs: &mut mpsc::Receiver<Input>,
    ) {
        let mut results = vec![first];
        let mut dones = vec![done];
        let mut next = None;
        while results.len() < MAX_RESULT_GROUP {
            match inputs.try_recv() {
                Ok(Input::Result { result, done }) => {
                    results.push(*result);
                    dones.push(done);
                }
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let ok = tokio::task::block_in_place(|| self.on_results(results));
        for done in dones {
            let _ = done.send(ok);
        }
        if let Some(input) = next {
            self.handle(input);
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Result { result, done } => {
                let ok = tokio::task::block_in_place(|| self.on_results(vec![*result]));
                let _ = done.send(ok);
            }
            Input::Build { id, event, done } => {
                let ok = tokio::task::block_in_place(|| self.on_build(id, event));
                let _ = done.send(ok);
            }
            Input::Push { event, done } => {
                let ok = tokio::task::block_in_place(|| self.on_push(&event));
                let _ = done.send(ok);
            }
            Input::Fetch { report, done } => {
                let ok = tokio::task::block_in_place(|| self.on_fetch(&report));
                let _ = done.send(ok);
            }
            Input::DeadLetters { letters, done } => {
                let ok = tokio::task::block_in_place(|| self.on_dead_letters(&letters));
                let _ = done.send(ok);
            }
            Input::Request {
                request,
                user,
                reply,
            } => {
                let answer = tokio::task::block_in_place(|| self.on_request(request, &user));
                let _ = reply.send(answer);
            }
            Input::GateDone { pipeline, outcome } => {
                tokio::task::block_in_place(|| self.on_gate_done(pipeline, outcome));
            }
        }
    }

    // ----- rollouts -------------------------------------------------------------------

    /// Ticks rollout `id` and persists and sends whatever changed.
    fn tick(&mut self, id: i64) {
        if self.held_rollouts.contains(&id) {
            return;
        }
        let Some(r) = self.rollouts.get_mut(&id) else {
            return;
        };
        let before = r.updated_at;
        let dispatches = r.tick(now());
        if r.updated_at != before || !dispatches.is_empty() {
            let _ = self.commit(id, dispatches, |_| Ok(()));
        }
    }

    /// Writes rollout `id` (with the commands in `dispatches` and whatever `extra` adds) in
    /// one transaction, then sends the commands. On a store error the rollout is reloaded
    /// from the store, so memory never runs ahead of disk.
    fn commit(
        &mut self,
        id: i64,
        dispatches: Vec<Dispatch>,
        extra: impl FnOnce(&Tx<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.commit_many(vec![(id, dispatches)], extra)
    }

    /// Writes the rollouts and their new signed commands (and `extra`) in one transaction,
    /// then sends the commands: nothing is sent that is not on disk first. One fsync for
    /// however many rollouts changed (results that arrived together share it).
    fn commit_many(
        &mut self,
        changes: Vec<(i64, Vec<Dispatch>)>,
        extra: impl FnOnce(&Tx<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let changes: Vec<(i64, Vec<Dispatch>)> = changes
            .into_iter()
            .filter(|(id, _)| self.rollouts.contains_key(id))
            .collect();
        let mut fresh = Vec::new();
        for (id, dispatches) in &changes {
            let Some(r) = self.rollouts.get(id) else {
                continue;
            };
            for d in dispatches.iter().filter(|d| !d.resend) {
                let command = command_for(r, d);
                let message = self.key.command_message("conductor", &command);
                match message.encode() {
                    Ok(bytes) => fresh.push((*id, d.command, r.hosts[d.host].host.clone(), bytes)),
                    Err(e) => tracing::error!(error = %e, "cannot encode a command"),
                }
            }
        }
        let rollouts = &self.rollouts;
        tracing::debug!(commands = fresh.len(), "writing the store");
        let result = self.store.write(|tx| {
            for (id, _) in &changes {
                if let Some(r) = rollouts.get(id) {
                    tx.save_rollout(r)?;
                }
            }
            for (id, cmd, host, bytes) in &fresh {
                tx.insert_command(*cmd, Some(*id), host.as_str(), bytes)?;
            }
            extra(tx)
        });
        if let Err(e) = result {
            self.shared
                .metrics
                .store_errors
                .fetch_add(1, Ordering::Relaxed);
            for (id, _) in &changes {
                tracing::error!(rollout = id, error = %e, "cannot write to the store; nothing was sent");
                match self.store.rollout(*id) {
                    Ok(Some(saved)) => {
                        self.rollouts.insert(*id, saved);
                    }
                    _ => {
                        self.rollouts.remove(id);
                    }
                }
            }
            return Err(e);
        }
        tracing::debug!(commands = fresh.len(), "store committed");
        for (_, _, host, bytes) in fresh {
            self.send(host, bytes);
        }
        for (id, dispatches) in changes {
            self.send_all(
                id,
                &dispatches
                    .into_iter()
                    .filter(|d| d.resend)
                    .collect::<Vec<_>>(),
            );
            self.publish_summary(id);
            if self
                .rollouts
                .get(&id)
                .is_some_and(|r| r.state.is_terminal())
                && let Some(r) = self.rollouts.remove(&id)
            {
                self.ended(r);
            }
        }
        Ok(())
    }

    /// Sends stored commands again (same id, same bytes).
    fn send_all(&self, id: i64, dispatches: &[Dispatch]) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        for d in dispatches {
            match self.store.command(d.command) {
                Ok(Some(bytes)) => self.send(r.hosts[d.host].host.clone(), bytes),
                Ok(None) => {
                    tracing::error!(command = %d.command, "a command to re-send is not in the store")
                }
                Err(e) => tracing::error!(error = %e, "cannot read a command from the store"),
            }
        }
    }

    /// Publishes a command (until confirmed or the conductor stops), declaring the host's
    /// command queue first so a host whose agent never started still finds it waiting.
    fn send(&self, host: HostName, bytes: Vec<u8>) {
        let publisher = self.publisher.clone();
        let declared = self.declared.clone();
        let cancel = self.cancel.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let message = match Message::decode(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "a stored command does not decode");
                    return;
                }
            };
            let bus = publisher.bus().clone();
            let exchange = bus.exchange().to_owned();
            loop {
                if declared.lock().await.contains(&host) {
                    break;
                }
                let consumer = Consumer::new(bus.clone(), QueueSpec::commands(&exchange, &host));
                match consumer.declare().await {
                    Ok(()) => {
                        declared.lock().await.insert(host.clone());
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "cannot declare the command queue; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
            let out = match Outgoing::with_key(&message, routing::command(&host)) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "cannot publish a command");
                    return;
                }
            };
            tracing::debug!(%host, command = %message.id, "publishing a command");
            match publisher
                .publish(&out, Retry::until_cancelled(cancel))
                .await
            {
                Ok(()) => {
                    shared.metrics.commands_sent.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%host, command = %message.id, "command sent");
                }
                Err(e) => {
                    tracing::warn!(%host, command = %message.id, error = %e, "command not sent")
                }
            }
        });
    }

    fn publish_summary(&self, id: i64) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        let summary = summary(r);
        {
            let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
            if r.state.is_terminal() {
                active.remove(&id);
            } else {
                active.insert(id, summary.clone());
            }
        }
        self.shared.emit("rollout", summary);
    }

    /// A rollout ended: start the next queued one of its stage, move its pipeline on.
    fn ended(&mut self, r: Rollout) {
        tracing::info!(rollout = r.id, app = %r.app, stage = %r.stage, state = r.state.as_str(),
            reason = r.reason.as_deref().unwrap_or(""), "rollout ended");
        self.shared.emit("rollout", summary(&r));
        self.shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.id);
        self.start_queued(&r.app, &r.stage);
        if let Some(pid) = r.pipeline {
            self.pipeline_stage_ended(pid, &r);
        }
    }

    fn start_queued(&mut self, app: &Name, stage: &str) {
        if self.active_on(app, stage).is_some() {
            return;
        }
        let next = self
            .rollouts
            .values()
            .find(|r| &r.app == app && r.stage == stage && r.state == RolloutState::Queued)
            .map(|r| r.id);
        if let Some(id) = next
            && let Some(r) = self.rollouts.get_mut(&id)
        {
            r.updated_at = now();
            // From here on it is ticked like any other (paused while the conductor is held).
            self.held_rollouts.remove(&id);
            if self.held {
                r.state = RolloutState::Paused;
                tracing::warn!(
                    rollout = id,
                    "queued rollout takes the stage, paused: {HELD}"
                );
                let _ = self.commit(id, Vec::new(), |tx| audit_held(tx, app.as_str(), stage, id));
                return;
            }
            r.state = RolloutState::Running;
            tracing::info!(rollout = id, "queued rollout starts");
            let dispatches = r.tick(now());
            let _ = self.commit(id, dispatches, |_| Ok(()));
        }
    }

    /// The rollout that holds the stage (running, paused, halted or rolling back).
    fn active_on(&self, app: &Name, stage: &str) -> Option<i64> {
        self.rollouts
            .values()
            .find(|r| {
                &r.app == app
                    && r.stage == stage
                    && !matches!(r.state, RolloutState::Queued)
                    && !r.state.is_terminal()
            })
            .map(|r| r.id)
    }

    /// Agents' results that arrived together: recorded in their rollouts, then one
    /// transaction for all of them (results, rollouts, the next batches' commands), then
    /// the next commands are sent. Duplicates (already stored, or twice in the group) are
    /// counted and ignored.
    fn on_results(&mut self, results: Vec<DeployResult>) -> bool {
        let mut fresh: Vec<DeployResult> = Vec::with_capacity(results.len());
        for result in results {
            self.shared.metrics.results.fetch_add(1, Ordering::Relaxed);
            let known = match self.store.has_result(result.command_id) {
                Ok(known) => known,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the store");
                    return false;
                }
            };
            if known || fresh.iter().any(|f| f.command_id == result.command_id) {
                self.shared
                    .metrics
                    .duplicate_results
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(command = %result.command_id, "duplicate result ignored");
                continue;
            }
            fresh.push(result);
        }
        if fresh.is_empty() {
            return true;
        }
        let t = now();
        let mut touched: Vec<i64> = Vec::new();
        // Results for rollouts that ended (aborted with hosts in flight): kept in the record.
        let mut ended: BTreeMap<i64, Rollout> = BTreeMap::new();
        let mut rows: Vec<(Option<i64>, &DeployResult)> = Vec::new();
        for result in &fresh {
            // The rollout is the one that issued the command, by this store's own record,
            // not whatever the result says: a result of another conductor's command (or of
            // one from before a restore) must not land in the rollout that has its number.
            let sent = match self
                .store
                .command_sent(result.command_id, result.host.as_str())
            {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the store");
                    return false;
                }
            };
            // `Some(None)`: a command of no rollout (an inventory).
            let rollout = sent.flatten();
            if sent.is_none() {
                tracing::warn!(claimed_rollout = result.rollout.as_deref().unwrap_or("none"),
                    host = %result.host, command = %result.command_id,
                    "result of a command this conductor did not send to that host; kept under no rollout");
            }
            self.shared.emit(
                "result",
                json!({
                    "rollout": rollout, "host": result.host, "command": result.command_id,
                    "outcome": result.outcome, "rolled_back": result.rolled_back,
                    "error": result.error, "duration_ms": result.duration_ms,
                }),
            );
            let report = HostReport::from(result);
            rows.push((rollout, result));
            match rollout {
                Some(id) if self.rollouts.contains_key(&id) => {
                    if let Some(r) = self.rollouts.get_mut(&id)
                        && !r.record(&report, t)
                    {
                        tracing::debug!(rollout = id, command = %result.command_id, "stale or unknown result");
                    }
                    if !touched.contains(&id) {
                        touched.push(id);
                    }
                }
                Some(id) => {
                    if let std::collections::btree_map::Entry::Vacant(slot) = ended.entry(id) {
                        match self.store.rollout(id) {
                            Ok(Some(r)) => {
                                slot.insert(r);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::error!(error = %e, rollout = id, "cannot read the store");
                                return false;
                            }
                        }
                    }
                    if let Some(r) = ended.get_mut(&id) {
                        r.record(&report, t);
                    }
                }
                None => {}
            }
        }
        let held = &self.held_rollouts;
        let changes: Vec<(i64, Vec<Dispatch>)> = touched
            .into_iter()
            .filter_map(|id| {
                let r = self.rollouts.get_mut(&id)?;
                // A held rollout records its results; it moves on when resumed.
                Some((
                    id,
                    if held.contains(&id) {
                        Vec::new()
                    } else {
                        r.tick(t)
                    },
                ))
            })
            .collect();
        self.commit_many(changes, |tx| {
            for (rollout, result) in &rows {
                tx.insert_result(*rollout, result)?;
            }
            for r in ended.values() {
                tx.save_rollout(r)?;
            }
            Ok(())
        })
        .is_ok()
    }

    // ----- operators' requests ----------------------------------------------------------

    fn on_request(&mut self, request: Request, user: &str) -> Result<Value, RequestError> {
        match request {
            Request::Deploy(req) => self.deploy(req, user),
            Request::Abort(id) => self.change(id, user, "abort", |r, t| {
                r.abort(RolloutState::Aborted, format!("aborted by {user}"), t)
                    .map(|()| Vec::new())
            }),
            Request::Pause(id) => {
                self.change(id, user, "pause", |r, t| r.pause(t).map(|()| Vec::new()))
            }
            Request::Resume(id) => {
                let v = self.change_held(id, user, "resume", |r, t, held| {
                    if !held {
                        r.resume(t)?;
                        return Ok(r.tick(t));
                    }
                    // Held since a paused start: paused, halted or rolling back, with
                    // nothing sent since; its waiting hosts get their commands again.
                    if r.state == RolloutState::Paused {
                        r.resume(t)?;
                    }
                    let mut out = r.rearm(t);
                    out.extend(r.tick(t));
                    Ok(out)
                })?;
                self.release_hold(user);
                Ok(v)
            }
            Request::Retry(id) => self.change_held(id, user, "retry", |r, t, held| {
                // Only a halted rollout is retried: re-arm nothing that retry would refuse.
                let mut out = if held && r.state == RolloutState::Halted {
                    r.rearm(t)
                } else {
                    Vec::new()
                };
                out.extend(r.retry(t)?);
                Ok(out)
            }),
            Request::Rollback { app, stage } => self.rollback_stage(&app, &stage, user),
            Request::Promote { app, stage } => self.promote(&app, stage.as_deref(), user),
            Request::Inventory { host } => self.inventory(&host, user),
            Request::ClearDeadLetters { through } => {
                let detail = match through {
                    Some(id) => format!("dead letters up to {id} cleared"),
                    None => "every dead letter cleared".to_owned(),
                };
                let cleared = self.store.write(|tx| {
                    let n = tx.clear_dead_letters(through)?;
                    tx.audit(
                        user,
                        "clear-dead-letters",
                        None,
                        None,
                        None,
                        &format!("{detail} ({n})"),
                    )?;
                    Ok(n)
                })?;
                Ok(json!({ "cleared": cleared }))
            }
        }
    }

    /// The first resume after a paused start: the conductor starts rollouts by itself again,
    /// and the start-paused file goes (later restarts are ordinary ones).
    fn release_hold(&mut self, user: &str) {
        if !std::mem::take(&mut self.held) {
            return;
        }
        tracing::warn!(
            by = user,
            "an operator resumed a rollout: the conductor is no longer held"
        );
        if let Some(marker) = self.held_marker.take()
            && let Err(e) = std::fs::remove_file(&marker)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, path = %marker.display(),
                "cannot remove the start-paused file; the next start will be paused too");
        }
    }

    /// Sends one host a signed inventory command, stored (under no rollout) and audited
    /// before it leaves. The agent answers with an `inventory` event and a result.
    fn inventory(&mut self, host: &str, user: &str) -> Result<Value, RequestError> {
        let host = HostName::new(host)
            .map_err(|e| RequestError::Invalid(format!("host name {host:?}: {e}")))?;
        let configured = self.shared.config.apps.values().any(|app| {
            app.stages
                .iter()
                .any(|st| st.hosts.iter().any(|h| h == host.as_str()))
        });
        if !configured && self.shared.fleet.liveness_of(&host, now()).is_none() {
            return Err(RequestError::NotFound(format!(
                "no host named {host}: none has sent a heartbeat and no stage names it \
                 (`convoy hosts` lists the fleet)"
            )));
        }
        let t = now();
        let pending = self
            .shared
            .inventories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending(&host, t);
        if let Some((command, expires_at)) = pending {
            // Asked already and not yet answered: the same question, not another command.
            return Ok(json!({ "host": host, "command": command, "expires_at": expires_at }));
        }
        let command = Command {
            id: Uuid::now_v7(),
            host: host.clone(),
            issued_at: t,
            expires_at: t + INVENTORY_VALIDITY,
            issuer: user.to_owned(),
            rollout: None,
            action: Action::Inventory,
        };
        let bytes = self
            .key
            .command_message("conductor", &command)
            .encode()
            .map_err(|e| RequestError::Internal(format!("cannot encode the command: {e}")))?;
        self.store.write(|tx| {
            tx.insert_command(command.id, None, host.as_str(), &bytes)?;
            tx.audit(user, "inventory", None, None, None, host.as_str())
        })?;
        tracing::info!(%host, command = %command.id, by = user, "inventory asked");
        self.shared
            .inventories
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .asked
            .insert(host.clone(), (command.id, command.expires_at));
        self.send(host.clone(), bytes);
        Ok(json!({ "host": host, "command": command.id, "expires_at": command.expires_at }))
    }

    /// [`Engine::change`] for an action that lets a rollout go: `f` is told whether it was
    /// held since a paused start, and the hold on it ends when `f` succeeds.
    fn change_held(
        &mut self,
        id: i64,
        user: &str,
        action: &str,
        f: impl FnOnce(&mut Rollout, DateTime<Utc>, bool) -> Result<Vec<Dispatch>, String>,
    ) -> Result<Value, RequestError> {
        let held = self.held_rollouts.remove(&id);
        let v = self.change(id, user, action, |r, t| f(r, t, held));
        if v.is_err() && held {
            self.held_rollouts.insert(id);
        }
        v
    }

    fn change(
        &mut self,
        id: i64,
        user: &str,
        action: &str,
        f: impl FnOnce(&mut Rollout, DateTime<Utc>) -> Result<Vec<Dispatch>, String>,
    ) -> Result<Value, RequestError> {
        let Some(r) = self.rollouts.get_mut(&id) else {
            return match self.store.rollout(id)? {
                Some(r) => Err(RequestError::Conflict(format!(
                    "rollout {id} has already ended ({})",
                    r.state.as_str()
                ))),
                None => Err(RequestError::NotFound(format!("there is no rollout {id}"))),
            };
        };
        let (app, stage) = (r.app.to_string(), r.stage.clone());
        let dispatches = f(r, now()).map_err(RequestError::Conflict)?;
        let snapshot = r.clone();
        self.commit(id, dispatches, |tx| {
            tx.audit(user, action, Some(&app), Some(&stage), Some(id), "")
        })?;
        tracing::info!(rollout = id, %user, action, "operator request");
        Ok(rollout_json(self.rollouts.get(&id).unwrap_or(&snapshot)))
    }

    fn app(&self, app: &str) -> Result<&AppConfig, RequestError> {
        self.config().apps.get(app).ok_or_else(|| {
            let known: Vec<&str> = self.config().apps.keys().map(String::as_str).collect();
            RequestError::NotFound(format!(
                "there is no app {app:?} in the conductor's config (apps: {})",
                known.join(", ")
            ))
        })
    }

    fn stage<'a>(
        &self,
        app_name: &str,
        app: &'a AppConfig,
        stage: &str,
    ) -> Result<(usize, &'a StageConfig), RequestError> {
        app.stage(stage).ok_or_else(|| {
            let known: Vec<&str> = app.stages.iter().map(|s| s.name.as_str()).collect();
            RequestError::NotFound(format!(
                "app {app_name} has no stage {stage:?} (stages: {})",
                known.join(", ")
            ))
        })
    }

    /// Which commit `git_ref` names: from the central repo's push events, else from what
    /// the target hosts' fetchers reported (they must agree).
    fn resolve(
        &self,
        repo: &str,
        git_ref: &str,
        commit: Option<&str>,
        hosts: &[HostName],
    ) -> Result<(RefName, Sha), RequestError> {
        let invalid = |e: convoy_message::names::NameError| RequestError::Invalid(e.to_string());
        let candidates: Vec<String> = if git_ref.starts_with("refs/") {
            vec![git_ref.to_owned()]
        } else {
            vec![
                format!("refs/tags/{git_ref}"),
                format!("refs/heads/{git_ref}"),
            ]
        };
        let given = commit.map(Sha::new).transpose().map_err(invalid)?;
        for name in &candidates {
            let sources = self.store.ref_sources(repo, name)?;
            if sources.is_empty() {
                continue;
            }
            let name = RefName::new(name.as_str()).map_err(invalid)?;
            if let Some(sha) = given {
                return Ok((name, sha));
            }
            if let Some((_, sha)) = sources.iter().find(|(s, _)| s == "push") {
                return Ok((name, Sha::new(sha.as_str()).map_err(invalid)?));
            }
            let shas: std::collections::BTreeSet<&str> = sources
                .iter()
                .filter(|(s, _)| hosts.iter().any(|h| h.as_str() == s))
                .map(|(_, sha)| sha.as_str())
                .collect();
            return match shas.len() {
                1 => Ok((
                    name,
                    Sha::new(shas.into_iter().next().unwrap_or_default()).map_err(invalid)?,
                )),
                0 => Err(RequestError::Invalid(format!(
                    "{name} is known, but none of the stage's hosts has reported it yet; wait for their fetchers or pass the commit"
                ))),
                _ => Err(RequestError::Conflict(format!(
                    "the stage's hosts disagree on what {name} points to ({}); wait for their fetchers or pass the commit",
                    shas.into_iter().collect::<Vec<_>>().join(", ")
                ))),
            };
        }
        match given {
            Some(sha) if git_ref.starts_with("refs/") => {
                Ok((RefName::new(git_ref).map_err(invalid)?, sha))
            }
            _ => Err(RequestError::Invalid(format!(
                "the ref {git_ref:?} of repo {repo} is unknown: no push event or fetch report mentions it; push it, or give its full name (refs/tags/…) and the commit"
            ))),
        }
    }

    fn deploy(&mut self, req: DeployRequest, user: &str) -> Result<Value, RequestError> {
        let app = self.app(&req.app)?.clone();
        let (_, stage) = self.stage(&req.app, &app, &req.stage)?;
        let strategy = req.strategy.apply(stage.strategy.clone())?;
        let (hosts, notes) = stage_hosts(&self.shared.fleet, stage)?;
        let repo = app.repo(&req.app);
        let (git_ref, commit) = self.resolve(&repo, &req.git_ref, req.commit.as_deref(), &hosts)?;
        let release = release_id(now(), &commit);
        let app_name =
            Name::new(req.app.as_str()).map_err(|e| RequestError::Invalid(e.to_string()))?;
        let spec = RolloutSpec {
            app: app_name,
            stage: req.stage.clone(),
            repo: Name::new(repo).map_err(|e| RequestError::Invalid(e.to_string()))?,
            kind: RolloutKind::Deploy,
            git_ref: Some(git_ref),
            commit: Some(commit),
            release,
            strategy,
            started_by: user.to_owned(),
            pipeline: None,
        };
        if req.plan {
            return Ok(plan_json(
                &spec,
                &hosts,
                &notes,
                self.active_on(&spec.app, &spec.stage),
            ));
        }
        let id = if req.pipeline {
            let (first, _) = self.stage(&req.app, &app, &req.stage)?;
            let (git_ref, commit) = match (&spec.git_ref, &spec.commit) {
                (Some(g), Some(c)) => (g.clone(), c.clone()),
                _ => return Err(RequestError::Internal("a deploy without a commit".into())),
            };
            let start = PipelineStart {
                first,
                release: Some(spec.release.clone()),
                strategy: Some(spec.strategy.clone()),
                by: Some(user.to_owned()),
            };
            let trigger = format!("deploy by {user}");
            let pid = self.start_pipeline(&req.app, &git_ref, &commit, &trigger, start)?;
            self.pipelines
                .get(&pid)
                .and_then(|p| p.rollouts.last().copied())
                .ok_or_else(|| {
                    let reason = self
                        .store
                        .pipeline(pid)
                        .ok()
                        .flatten()
                        .and_then(|p| p.reason)
                        .unwrap_or_else(|| "the pipeline ended at once".into());
                    RequestError::Conflict(format!("pipeline {pid}: {reason}"))
                })?
        } else {
            self.create_rollout(spec, hosts, &app, user, false, |_, _| Ok(()))?
        };
        let r = self.rollouts.get(&id).cloned().or(self.store.rollout(id)?);
        let mut out = r.as_ref().map(rollout_json).unwrap_or(json!({ "id": id }));
        out["notes"] = json!(notes);
        Ok(out)
    }

    /// Creates, stores and starts (or queues) a rollout; `extra` runs in the same
    /// transaction with the new id. With `hold` (one the conductor starts by itself while
    /// held) it starts paused, or queues rather than supersede.
    fn create_rollout(
        &mut self,
        spec: RolloutSpec,
        hosts: Vec<HostName>,
        app: &AppConfig,
        user: &str,
        hold: bool,
        extra: impl FnOnce(&Tx<'_>, i64) -> Result<(), StoreError>,
    ) -> Result<i64, RequestError> {
        let t = now();
        let mut r = Rollout::new(0, spec, hosts, t);
        let mut superseded = None;
        if let Some(active) = self.active_on(&r.app, &r.stage) {
            match app.concurrency {
                // Held, it waits rather than end one an operator has yet to look at.
                Concurrency::Queue | Concurrency::Supersede if hold => {
                    r.state = RolloutState::Queued
                }
                Concurrency::Queue => r.state = RolloutState::Queued,
                Concurrency::Supersede => superseded = Some(active),
            }
        }
        if hold && r.state == RolloutState::Running {
            r.state = RolloutState::Paused;
            tracing::warn!(app = %r.app, stage = %r.stage, "a pipeline's rollout starts paused: {HELD}");
        }
        let detail = format!(
            "{} {} to {} ({} hosts, batches {})",
            match r.kind {
                RolloutKind::Deploy => "deploy",
                RolloutKind::Rollback => "rollback",
            },
            r.git_ref
                .as_ref()
                .map_or(r.release.to_string(), |g| g.short().to_owned()),
            r.stage,
            r.hosts.len(),
            r.strategy.batches
        );
        self.store.write(|tx| {
            tx.insert_rollout(&mut r)?;
            tx.audit(
                user,
                "deploy",
                Some(r.app.as_str()),
                Some(&r.stage),
                Some(r.id),
                &detail,
            )?;
            extra(tx, r.id)
        })?;
        let id = r.id;
        self.shared
            .metrics
            .rollouts_started
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(rollout = id, %user, "{detail}");
        self.rollouts.insert(id, r);
        if let Some(old) = superseded
            && let Some(o) = self.rollouts.get_mut(&old)
        {
            let _ = o.abort(
                RolloutState::Superseded,
                format!("superseded by rollout {id}"),
                now(),
            );
            let _ = self.commit(old, Vec::new(), |_| Ok(()));
        }
        let dispatches = self
            .rollouts
            .get_mut(&id)
            .map(|r| r.tick(now()))
            .unwrap_or_default();
        self.commit(id, dispatches, |_| Ok(()))?;
        Ok(id)
    }

    fn rollback_stage(
        &mut self,
        app_name: &str,
        stage_name: &str,
        user: &str,
    ) -> Result<Value, RequestError> {
        let app = self.app(app_name)?.clone();
        let (_, stage) = self.stage(app_name, &app, stage_name)?;
        let releases = self.store.stage_releases(app_name, stage_name)?;
        let Some((release, commit)) = releases.get(1).cloned() else {
            return Err(RequestError::Conflict(format!(
                "{app_name} has no earlier successful release on {stage_name} to roll back to"
            )));
        };
        let (hosts, _) = stage_hosts(&self.shared.fleet, stage)?;
        let invalid = |e: convoy_message::names::NameError| RequestError::Internal(e.to_string());
        let spec = RolloutSpec {
            app: Name::new(app_name).map_err(invalid)?,
            stage: stage_name.to_owned(),
            repo: Name::new(app.repo(app_name)).map_err(invalid)?,
            kind: RolloutKind::Rollback,
            git_ref: None,
            commit: commit.map(Sha::new).transpose().map_err(invalid)?,
            release: ReleaseId::new(release).map_err(invalid)?,
            strategy: stage.strategy.clone(),
            started_by: user.to_owned(),
            pipeline: None,
        };
        // A rollback does not wait behind the rollout it undoes.
        let mut app = app;
        app.concurrency = Concurrency::Supersede;
        let id = self.create_rollout(spec, hosts, &app, user, false, |_, _| Ok(()))?;
        let r = self.rollouts.get(&id).cloned().or(self.store.rollout(id)?);
        Ok(r.as_ref().map(rollout_json).unwrap_or(json!({ "id": id })))
    }

    // ----- events from the bus ----------------------------------------------------------

    fn on_push(&mut self, event: &PushEvent) -> bool {
        let sha = (!event.new.is_zero()).then(|| event.new.to_string());
        self.store
            .write(|tx| {
                tx.set_ref(
                    event.repo.as_str(),
                    "push",
                    event.git_ref.as_str(),
                    sha.as_deref(),
                )
            })
            .is_ok()
    }

    fn on_fetch(&mut self, report: &FetchReport) -> bool {
        if report.status != FetchStatus::Fetched {
            return true;
        }
        self.store
            .write(|tx| {
                tx.replace_refs(
                    report.repo.as_str(),
                    report.host.as_str(),
                    report.refs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                )
            })
            .is_ok()
    }

    /// Keeps refused messages; true once they are in the store (then they may leave the queue).
    fn on_dead_letters(&mut self, letters: &[(DeadLetter, String)]) -> bool {
        let kept = self.store.write(|tx| tx.insert_dead_letters(letters));
        match kept {
            Ok(ids) => {
                let new: Vec<(&DeadLetter, i64)> = letters
                    .iter()
                    .zip(ids)
                    .filter_map(|((letter, _), id)| Some((letter, id?)))
                    .collect();
                self.shared
                    .metrics
                    .dead_letters
                    .fetch_add(new.len() as u64, Ordering::Relaxed);
                // A command its agent refused will never run: the host fails now, with the
                // reason, instead of at its deadline.
                let refusals: Vec<DeployResult> = new
                    .into_iter()
                    .filter_map(|(letter, id)| self.refusal(letter, id))
                    .collect();
                if !refusals.is_empty() && !self.on_results(refusals) {
                    tracing::warn!(
                        "cannot record an agent's refusal; its host fails at its deadline instead"
                    );
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot keep dead letters; they stay in their queue");
                false
            }
        }
    }

    /// The result an agent would have sent had it not refused this command outright (a
    /// signature it cannot check, an expired or misaddressed command): `refused`, nothing
    /// run. Only for a command this conductor sent, refused on that host's own queue.
    fn refusal(&self, letter: &DeadLetter, kept_as: i64) -> Option<DeployResult> {
        if !letter.routing_key.starts_with("cmd.") {
            return None;
        }
        let id = Uuid::parse_str(letter.message_id.as_deref()?).ok()?;
        let bytes = self.store.command(id).ok()??;
        let Body::Command(signed) = Message::decode(&bytes).ok()?.body else {
            return None;
        };
        let command: Command = serde_json::from_str(&signed.payload).ok()?;
        if letter.routing_key != routing::command(&command.host) {
            return None;
        }
        tracing::warn!(host = %command.host, command = %id, reason = %letter.reason,
            detail = %letter.detail, "the agent refused a command outright");
        let why = format!(
            "its agent refused the command before running anything ({}): {} — `convoy dead-letters {}` shows it",
            letter.reason, letter.detail, kept_as
        );
        if command.action == Action::Inventory {
            self.shared.note_inventory_refused(&command.host, id, &why);
        }
        let t = now();
        Some(DeployResult {
            command_id: id,
            host: command.host.clone(),
            action: command.action.verb().to_owned(),
            app: command.action.app().cloned(),
            rollout: command.rollout.clone(),
            release: None,
            outcome: DeployOutcome::Refused,
            rolled_back: false,
            current: None,
            previous: None,
            steps: Vec::new(),
            error: Some(why),
            started_at: t,
            duration_ms: 0,
            finished_at: Some(t),
        })
    }

    /// A build succeeded: start a pipeline for every app that deploys this repo and ref.
    fn on_build(&mut self, id: Uuid, event: BuildEvent) -> bool {
        if event.status != BuildStatus::Succeeded {
            return true;
        }
        match self.store.seen(id) {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        let Some(git_ref) = event.git_ref.clone() else {
            tracing::info!(repo = %event.repo, commit = %event.commit, "a build without a ref starts no pipeline");
            return true;
        };
        let apps: Vec<(String, AppConfig)> = self
            .config()
            .apps
            .iter()
            .filter(|(name, app)| {
                app.repo(name) == event.repo.as_str() && app.pipeline.wants(&git_ref)
            })
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect();
        let trigger = match event.build_number {
            Some(n) => format!("build {} #{n}", event.job),
            None => format!("build {}", event.job),
        };
        for (name, _) in apps {
            let start = PipelineStart::default();
            if let Err(e) = self.start_pipeline(&name, &git_ref, &event.commit, &trigger, start) {
                tracing::warn!(app = %name, error = %e, "pipeline not started");
            }
        }
        self.store.write(|tx| tx.mark_seen(id)).is_ok()
    }

    fn start_pipeline(
        &mut self,
        app_name: &str,
        git_ref: &RefName,
        commit: &Sha,
        trigger: &str,
        start: PipelineStart,
    ) -> Result<i64, RequestError> {
        let t = now();
        let mut p = Pipeline {
            id: 0,
            app: Name::new(app_name).map_err(|e| RequestError::Internal(e.to_string()))?,
            git_ref: Some(git_ref.clone()),
            commit: commit.clone(),
            release: start
                .release
                .clone()
                .unwrap_or_else(|| release_id(t, commit)),
            stage: start.first,
            state: PipelineState::Deploying,
            trigger: trigger.to_owned(),
            rollouts: Vec::new(),
            gates: Vec::new(),
            reason: None,
            created_at: t,
            updated_at: t,
        };
        self.store.write(|tx| {
            tx.insert_pipeline(&mut p)?;
            tx.audit(
                "pipeline",
                "pipeline",
                Some(app_name),
                None,
                None,
                &format!("{trigger}: {} {}", git_ref.short(), commit.short()),
            )
        })?;
        let id = p.id;
        tracing::info!(pipeline = id, app = app_name, git_ref = %git_ref, "pipeline started by {trigger}");
        self.pipelines.insert(id, p);
        self.start_stage(id, start.first, start.strategy, start.by.as_deref());
        Ok(id)
    }

    /// Starts the rollout of pipeline `pid` to stage `idx` (with the stage's strategy unless
    /// one is given; started by the pipeline unless `by` names a person); returns its id.
    /// On failure the pipeline ends, with the reason.
    fn start_stage(
        &mut self,
        pid: i64,
        idx: usize,
        strategy: Option<Strategy>,
        by: Option<&str>,
    ) -> Option<i64> {
        let p = self.pipelines.get(&pid).cloned()?;
        let Some(app) = self.config().apps.get(p.app.as_str()).cloned() else {
            self.end_pipeline(
                pid,
                PipelineState::Failed,
                "the app is no longer configured".into(),
            );
            return None;
        };
        let Some(stage) = app.stages.get(idx).cloned() else {
            self.end_pipeline(pid, PipelineState::Succeeded, String::new());
            return None;
        };
        let hosts = match stage_hosts(&self.shared.fleet, &stage) {
            Ok((h, _)) => h,
            Err(e) => {
                self.end_pipeline(pid, PipelineState::Failed, e.to_string());
                return None;
            }
        };
        // Held: only a person (a promote) moves a pipeline on.
        let hold = self.held && by.is_none();
        let by = by.map_or_else(|| format!("pipeline {pid}"), str::to_owned);
        let spec = RolloutSpec {
            app: p.app.clone(),
            stage: stage.name.clone(),
            repo: match Name::new(app.repo(p.app.as_str())) {
                Ok(r) => r,
                Err(e) => {
                    self.end_pipeline(pid, PipelineState::Failed, e.to_string());
                    return None;
                }
            },
            kind: RolloutKind::Deploy,
            git_ref: p.git_ref.clone(),
            commit: Some(p.commit.clone()),
            release: p.release.clone(),
            strategy: strategy.unwrap_or_else(|| stage.strategy.clone()),
            started_by: by.clone(),
            pipeline: Some(pid),
        };
        let mut updated = p.clone();
        updated.stage = idx;
        updated.state = PipelineState::Deploying;
        updated.updated_at = now();
        let result = self.create_rollout(spec, hosts, &app, &by, hold, |tx, rid| {
            updated.rollouts.push(rid);
            tx.save_pipeline(&updated)
        });
        match result {
            Ok(rid) => {
                self.pipelines.insert(pid, updated.clone());
                self.shared.emit("pipeline", json!(updated));
                Some(rid)
            }
            Err(e) => {
                self.end_pipeline(pid, PipelineState::Failed, e.to_string());
                None
            }
        }
    }

    fn end_pipeline(&mut self, pid: i64, state: PipelineState, reason: String) {
        let Some(mut p) = self.pipelines.remove(&pid) else {
            return;
        };
        p.state = state;
        p.reason = (!reason.is_empty()).then_some(reason);
        p.updated_at = now();
        if let Err(e) = self.store.write(|tx| tx.save_pipeline(&p)) {
            tracing::error!(pipeline = pid, error = %e, "cannot save the pipeline");
        }
        tracing::info!(pipeline = pid, state = state.as_str(), "pipeline ended");
        self.shared.emit("pipeline", json!(p));
    }

    fn save_pipeline(&mut self, p: Pipeline) {
        if let Err(e) = self.store.write(|tx| tx.save_pipeline(&p)) {
            tracing::error!(pipeline = p.id, error = %e, "cannot save the pipeline");
        }
        self.shared.emit("pipeline", json!(p));
        self.pipelines.insert(p.id, p);
    }

    fn pipeline_stage_ended(&mut self, pid: i64, r: &Rollout) {
        let Some(mut p) = self.pipelines.get(&pid).cloned() else {
            return;
        };
        if r.state != RolloutState::Succeeded {
            let state = if r.state == RolloutState::Aborted {
                PipelineState::Aborted
            } else {
                PipelineState::Failed
            };
            self.end_pipeline(
                pid,
                state,
                format!("rollout {} to {} ended {}", r.id, r.stage, r.state.as_str()),
            );
            return;
        }
        let Some(app) = self.config().apps.get(p.app.as_str()).cloned() else {
            return;
        };
        if p.stage + 1 >= app.stages.len() {
            self.end_pipeline(pid, PipelineState::Succeeded, String::new());
            return;
        }
        let gate = app.stages[p.stage].gate.clone();
        let t = now();
        let mut record = GateRecord {
            after: r.stage.clone(),
            kind: gate.kind().to_owned(),
            state: GateState::Running,
            started_at: t,
            finished_at: None,
            by: None,
            exit_code: None,
            output: String::new(),
            detail: None,
        };
        match gate {
            GateConfig::Auto => {
                record.state = GateState::Passed;
                record.finished_at = Some(t);
                record.by = Some("conductor".into());
                p.gates.push(record);
                let next = p.stage + 1;
                self.save_pipeline(p);
                self.start_stage(pid, next, None, None);
            }
            GateConfig::Manual => {
                record.state = GateState::Waiting;
                p.gates.push(record);
                p.state = PipelineState::WaitingForPromotion;
                p.updated_at = t;
                self.save_pipeline(p);
            }
            GateConfig::Tests { .. } => {
                p.gates.push(record);
                p.state = PipelineState::Gating;
                p.updated_at = t;
                self.save_pipeline(p);
                self.start_gate_check(pid);
            }
        }
    }

    /// Runs the check of pipeline `pid`'s current gate in the background.
    fn start_gate_check(&self, pid: i64) {
        let Some(p) = self.pipelines.get(&pid) else {
            return;
        };
        let Some(app) = self.config().apps.get(p.app.as_str()) else {
            return;
        };
        let (Some(stage), Some(next)) = (app.stages.get(p.stage), app.stages.get(p.stage + 1))
        else {
            return;
        };
        let check: Box<dyn GateCheck> = match &stage.gate {
            GateConfig::Tests { command, timeout_s } => Box::new(TestsGate {
                command: command.clone(),
                timeout: Duration::from_secs(*timeout_s),
            }),
            _ => return,
        };
        let hosts = p
            .rollouts
            .last()
            .and_then(|id| self.store.rollout(*id).ok().flatten())
            .map(|r| r.hosts.iter().map(|h| h.host.to_string()).collect())
            .unwrap_or_default();
        let ctx = GateContext {
            pipeline: pid,
            app: p.app.to_string(),
            stage: stage.name.clone(),
            next_stage: next.name.clone(),
            release: p.release.to_string(),
            commit: p.commit.to_string(),
            git_ref: p.git_ref.as_ref().map(|r| r.to_string()),
            hosts,
        };
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let outcome = check.evaluate(ctx).await;
            let _ = inputs
                .send(Input::GateDone {
                    pipeline: pid,
                    outcome,
                })
                .await;
        });
    }

    fn on_gate_done(&mut self, pid: i64, outcome: GateOutcome) {
        let Some(mut p) = self.pipelines.get(&pid).cloned() else {
            return;
        };
        if p.state != PipelineState::Gating {
            return;
        }
        let t = now();
        let Some(gate) = p.gates.last_mut() else {
            return;
        };
        gate.finished_at = Some(t);
        gate.exit_code = outcome.exit_code;
        gate.output = outcome.output;
        gate.by = Some("conductor".into());
        match outcome.verdict {
            Verdict::Pass => {
                gate.state = GateState::Passed;
                let next = p.stage + 1;
                tracing::info!(pipeline = pid, "gate passed");
                self.save_pipeline(p);
                self.start_stage(pid, next, None, None);
            }
            Verdict::Fail(why) => {
                gate.state = GateState::Failed;
                gate.detail = Some(why.clone());
                self.save_pipeline(p);
                self.end_pipeline(pid, PipelineState::Failed, format!("gate failed: {why}"));
            }
            Verdict::Inconclusive(why) => {
                gate.state = GateState::Waiting;
                gate.detail = Some(why);
                p.state = PipelineState::WaitingForPromotion;
                p.updated_at = t;
                self.save_pipeline(p);
            }
        }
    }

    fn promote(
        &mut self,
        app: &str,
        stage: Option<&str>,
        user: &str,
    ) -> Result<Value, RequestError> {
        let waiting: Vec<i64> = self
            .pipelines
            .values()
            .filter(|p| p.app.as_str() == app && p.state == PipelineState::WaitingForPromotion)
            .filter(|p| stage.is_none_or(|s| p.gates.last().is_some_and(|g| g.after == s)))
            .map(|p| p.id)
            .collect();
        let pid = match waiting.as_slice() {
            [] => {
                return Err(RequestError::Conflict(format!(
                    "no pipeline of {app} waits at a gate{}",
                    stage.map(|s| format!(" after {s}")).unwrap_or_default()
                )));
            }
            [one] => *one,
            many => *many.iter().max().unwrap_or(&many[0]),
        };
        let Some(mut p) = self.pipelines.get(&pid).cloned() else {
            return Err(RequestError::Internal("pipeline vanished".into()));
        };
        let t = now();
        let after = if let Some(g) = p.gates.last_mut() {
            g.state = GateState::Promoted;
            g.by = Some(user.to_owned());
            g.finished_at = Some(t);
            g.after.clone()
        } else {
            String::new()
        };
        p.updated_at = t;
        let next = p.stage + 1;
        self.store.write(|tx| {
            tx.save_pipeline(&p)?;
            tx.audit(
                user,
                "promote",
                Some(app),
                Some(&after),
                None,
                &format!("pipeline {pid}"),
            )
        })?;
        tracing::info!(pipeline = pid, %user, "promoted");
        self.pipelines.insert(pid, p);
        self.start_stage(pid, next, None, None);
        let p = self
            .pipelines
            .get(&pid)
            .cloned()
            .or(self.store.pipeline(pid)?);
        Ok(json!(p))
    }
}

/// The command a dispatch stands for, as the agent will verify it.
fn command_for(r: &Rollout, d: &Dispatch) -> Command {
    let h = &r.hosts[d.host];
    let t = h.sent_at.unwrap_or_else(now);
    let (issued_at, expires_at, action) = match (&h.undo, d.undo) {
        (Some(u), true) => (
            u.sent_at,
            u.expires_at,
            Action::Rollback {
                app: r.app.clone(),
                release: Some(u.release.clone()),
            },
        ),
        _ => (
            t,
            h.expires_at.unwrap_or(t),
            match (r.kind, &r.git_ref, &r.commit) {
                (RolloutKind::Deploy, Some(git_ref), Some(commit)) => Action::Deploy(DeploySpec {
                    app: r.app.clone(),
                    repo: r.repo.clone(),
                    git_ref: git_ref.clone(),
                    commit: commit.clone(),
                    release: r.release.clone(),
                    no_switch: false,
                }),
                _ => Action::Rollback {
                    app: r.app.clone(),
                    release: Some(r.release.clone()),
                },
            },
        ),
    };
    Command {
        id: d.command,
        host: h.host.clone(),
        issued_at,
        expires_at,
        issuer: r.started_by.clone(),
        rollout: Some(r.id.to_string()),
        action,
    }
}

/// The hosts of a stage: named ones first, then those whose heartbeat labels match
/// (hosts gone silent are left out and said so).
pub fn stage_hosts(
    fleet: &Fleet,
    stage: &StageConfig,
) -> Result<(Vec<HostName>, Vec<String>), RequestError> {
    let mut hosts = Vec::new();
    let mut notes = Vec::new();
    for h in &stage.hosts {
        let host = HostName::new(h.as_str()).map_err(|e| RequestError::Internal(e.to_string()))?;
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    if !stage.labels.is_empty() {
        for (host, liveness) in fleet.matching(&stage.labels, now()) {
            if liveness == Liveness::Gone {
                notes.push(format!("{host} left out: its heartbeats stopped (gone)"));
            } else if !hosts.contains(&host) {
                if liveness == Liveness::Stale {
                    notes.push(format!("{host} is stale: it may miss its deadline"));
                }
                hosts.push(host);
            }
        }
    }
    if hosts.is_empty() {
        return Err(RequestError::Invalid(format!(
            "stage {} has no hosts: none named, and no live heartbeat matches labels {:?}",
            stage.name, stage.labels
        )));
    }
    Ok((hosts, notes))
}

/// `20261123-101500-abc1234`: sorts by time, names the commit.
pub fn release_id(at: DateTime<Utc>, commit: &Sha) -> ReleaseId {
    let id = format!("{}-{}", at.format("%Y%m%d-%H%M%S"), &commit.as_str()[..7]);
    ReleaseId::new(id).unwrap_or_else(|_| ReleaseId::new("release").expect("a valid literal"))
}

/// A rollout as the API returns it.
pub fn rollout_json(r: &Rollout) -> Value {
    let mut v = json!(r);
    v["summary"] = summary(r);
    v
}

/// The short form: state, counts, batch.
pub fn summary(r: &Rollout) -> Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &r.hosts {
        *counts.entry(h.state.as_str()).or_default() += 1;
    }
    json!({
        "id": r.id,
        "app": r.app,
        "stage": r.stage,
        "kind": r.kind,
        "ref": r.git_ref,
        "commit": r.commit,
        "release": r.release,
        "state": r.state.as_str(),
        "reason": r.reason,
        "batch": r.batch + 1,
        "batches": r.batches,
        "hosts": r.hosts.len(),
        "counts": counts,
        "failures": r.failures(),
        "allowed_failures": r.allowed_failures(),
        "started_by": r.started_by,
        "pipeline": r.pipeline,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "finished_at": r.finished_at,
        "host_states": r.hosts.iter().map(|h| json!({
            "host": h.host, "batch": h.batch + 1, "state": h.state.as_str(), "error": h.error,
            "undo": h.undo.as_ref().map(|u| u.state.as_str()),
        })).collect::<Vec<_>>(),
    })
}

fn plan_json(
    spec: &RolloutSpec,
    hosts: &[HostName],
    notes: &[String],
    active: Option<i64>,
) -> Value {
    let sizes = spec.strategy.batches.sizes(hosts.len());
    let mut batches = Vec::new();
    let mut rest = hosts;
    for n in sizes {
        let (batch, tail) = rest.split_at(n.min(rest.len()));
        batches.push(batch.iter().map(|h| h.to_string()).collect::<Vec<_>>());
        rest = tail;
    }
    json!({
        "app": spec.app,
        "stage": spec.stage,
        "ref": spec.git_ref,
        "commit": spec.commit,
        "release": spec.release,
        "strategy": spec.strategy,
        "allowed_failures": spec.strategy.max_failures.allowed(hosts.len()),
        "batches": batches,
        "notes": notes,
        "waits_for": active,
    })
}
