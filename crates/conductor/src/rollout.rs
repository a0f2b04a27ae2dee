//! The rollout state machine: pure, serialisable, and the only place that decides which host
//! gets a command when.
//!
//! The engine persists a [`Rollout`] after every change and before it sends what
//! [`Rollout::tick`] asked for, so a conductor killed at any moment reloads the same state and
//! re-sends only commands already issued (same id: the agent answers from its journal).
//!
//! Rules it keeps (checked by the property test in `tests/rollout_model.rs`):
//! - a batch starts only when every host of the batches before it has a definite outcome;
//! - no command is issued once failures exceed the budget, or a host missed its deadline;
//! - a host gets a new command id only when its earlier one ended in failure, or can no
//!   longer run (expired past the agents' clock skew), and an operator asked for a retry.

use crate::config::{OnFailure, StrategyConfig};
use chrono::{DateTime, Duration, Utc};
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use convoy_message::{DeployOutcome, DeployResult};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How late after `expires_at` an agent may still accept a command (its `max_clock_skew_s`).
pub const AGENT_SKEW: Duration = Duration::seconds(120);

pub type Strategy = StrategyConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// Export a commit into a new release on each host and switch to it.
    Deploy,
    /// Switch each host back to a release it already has (a stage rollback).
    Rollback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waits for the rollout running on the same stage to end.
    Queued,
    Running,
    /// No new batch starts; hosts in flight finish.
    Paused,
    /// Stopped by a failure or a missed deadline; `retry` goes on, `abort` gives up.
    Halted,
    /// Stopped by a failure; hosts already done are being put back.
    RollingBack,
    Succeeded,
    RolledBack,
    Aborted,
    /// Replaced by a newer rollout of the same stage.
    Superseded,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halted => "halted",
            Self::RollingBack => "rolling_back",
            Self::Succeeded => "succeeded",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
            Self::Superseded => "superseded",
        }
    }

    /// Ended for good: nothing more will be sent.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::RolledBack | Self::Aborted | Self::Superseded
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Not sent yet.
    Pending,
    /// Sent; waiting for the agent's result until the deadline.
    Sent,
    Succeeded,
    Failed,
    /// No result before the deadline: the outcome is unknown.
    TimedOut,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Putting one host back on the release it ran before (`on_failure = "rollback"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Undo {
    pub command: Uuid,
    pub release: ReleaseId,
    pub state: HostState,
    pub sent_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub error: Option<String>,
}

/// One host of a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostSlot {
    pub host: HostName,
    pub batch: usize,
    pub state: HostState,
    /// The command this host was sent (the same id is re-sent after a restart).
    #[serde(default)]
    pub command: Option<Uuid>,
    /// Command ids issued to this host in this rollout (more than one only after retries).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub deadline_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    /// The agent switched back by itself after a failure past the switch.
    #[serde(default)]
    pub agent_rolled_back: bool,
    /// The release the host ran before this rollout switched it.
    #[serde(default)]
    pub before: Option<ReleaseId>,
    /// The host answered after its deadline had already failed it.
    #[serde(default)]
    pub late: bool,
    /// When a retry sent this host its timed-out command again (cleared by a new command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub undo: Option<Undo>,
}

impl HostSlot {
    fn new(host: HostName, batch: usize) -> Self {
        Self {
            host,
            batch,
            state: HostState::Pending,
            command: None,
            attempts: 0,
            sent_at: None,
            deadline_at: None,
            expires_at: None,
            finished_at: None,
            duration_ms: None,
            error: None,
            agent_rolled_back: false,
            before: None,
            late: false,
            retried_at: None,
            undo: None,
        }
    }

    fn is_done(&self) -> bool {
        matches!(self.state, HostState::Succeeded | HostState::Failed)
    }
}

/// A command the engine must sign, store and send (or send again, from the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub host: usize,
    pub command: Uuid,
    /// A rollback of this host to its earlier release, not the rollout's own action.
    pub undo: bool,
    /// Already issued and stored: send the stored bytes again.
    pub resend: bool,
}

impl Dispatch {
    /// A stored command sent again (the same id and bytes).
    fn again(host: usize, command: Uuid, undo: bool) -> Self {
        Self {
            host,
            command,
            undo,
            resend: true,
        }
    }
}

/// What an agent's result says, reduced to what the rollout needs.
#[derive(Clone, Debug, PartialEq)]
pub struct HostReport {
    pub command: Uuid,
    pub succeeded: bool,
    pub error: Option<String>,
    pub rolled_back: bool,
    /// The release `current` pointed to before this command switched it.
    pub previous: Option<ReleaseId>,
    pub duration_ms: u64,
}

impl From<&DeployResult> for HostReport {
    fn from(r: &DeployResult) -> Self {
        let succeeded = r.outcome == DeployOutcome::Succeeded;
        Self {
            command: r.command_id,
            succeeded,
            error: r
                .error
                .clone()
                .filter(|_| !succeeded)
                .or_else(|| (!succeeded).then(|| format!("{:?}", r.outcome).to_lowercase())),
            rolled_back: r.rolled_back,
            previous: r.previous.clone(),
            duration_ms: r.duration_ms,
        }
    }
}

/// When the run a result reports began, by the conductor's clock: its arrival less the run's
/// duration. Never earlier than the truth (the result's time in transit is not taken off),
/// so a doubtful run counts as begun later; agents' clocks are not needed.
fn began_by_our_clock(report: &HostReport, now: DateTime<Utc>) -> DateTime<Utc> {
    now - Duration::milliseconds(report.duration_ms.min(i64::MAX as u64 / 2) as i64)
}

/// A rollout of one commit (or one earlier release) to one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: i64,
    pub app: Name,
    pub stage: String,
    pub repo: Name,
    pub kind: RolloutKind,
    #[serde(default)]
    pub git_ref: Option<RefName>,
    #[serde(default)]
    pub commit: Option<Sha>,
    pub release: ReleaseId,
    pub strategy: Strategy,
    pub hosts: Vec<HostSlot>,
    /// The batch in progress (0-based).
    pub batch: usize,
    pub batches: usize,
    pub state: RolloutState,
    /// Why it stopped, in words.
    #[serde(default)]
    pub reason: Option<String>,
    pub started_by: String,
    #[serde(default)]
    pub pipeline: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The next batch may start at this time (`pause_s` between batches).
    #[serde(default)]
    pub next_batch_at: Option<DateTime<Utc>>,
}

/// The identity of a rollout, everything but its hosts and progress.
#[derive(Clone, Debug)]
pub struct RolloutSpec {
    pub app: Name,
    pub stage: String,
    pub repo: Name,
    pub kind: RolloutKind,
    pub git_ref: Option<RefName>,
    pub commit: Option<Sha>,
    pub release: ReleaseId,
    pub strategy: Strategy,
    pub started_by: String,
    pub pipeline: Option<i64>,
}

impl Rollout {
    /// A rollout over `hosts`, in this order, split into batches by the strategy.
    pub fn new(id: i64, spec: RolloutSpec, hosts: Vec<HostName>, now: DateTime<Utc>) -> Self {
        let assignment = spec.strategy.batches.assign(hosts.len());
        let batches = assignment.last().map_or(0, |b| b + 1);
        Self {
            id,
            app: spec.app,
            stage: spec.stage,
            repo: spec.repo,
            kind: spec.kind,
            git_ref: spec.git_ref,
            commit: spec.commit,
            release: spec.release,
            strategy: spec.strategy,
            hosts: hosts
                .into_iter()
                .zip(assignment)
                .map(|(h, b)| HostSlot::new(h, b))
                .collect(),
            batch: 0,
            batches,
            state: RolloutState::Running,
            reason: None,
            started_by: spec.started_by,
            pipeline: spec.pipeline,
            created_at: now,
            updated_at: now,
            finished_at: None,
            next_batch_at: None,
        }
    }

    pub fn failures(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| matches!(h.state, HostState::Failed | HostState::TimedOut))
            .count()
    }

    pub fn allowed_failures(&self) -> usize {
        self.strategy.max_failures.allowed(self.hosts.len())
    }

    pub fn succeeded(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.state == HostState::Succeeded)
            .count()
    }

    fn deadline(&self) -> Duration {
        Duration::seconds(self.strategy.host_deadline_s.min(i64::MAX as u64 / 1000) as i64)
    }

    fn finish(&mut self, state: RolloutState, now: DateTime<Utc>) {
        self.state = state;
        if state.is_terminal() {
            self.finished_at = Some(now);
        }
    }

    /// Moves the rollout on: deadlines, the budget, the next batch. Returns the commands to
    /// send. Call after every change and on a timer.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Dispatch> {
        let before = (self.state, self.batch, self.next_batch_at);
        let mut out = Vec::new();
        let expired = self.expire(now);
        match self.state {
            RolloutState::Running | RolloutState::Paused => {
                if let Some(reason) = self.failure_reason() {
                    self.reason = Some(reason);
                    match self.strategy.on_failure {
                        OnFailure::Halt => self.finish(RolloutState::Halted, now),
                        OnFailure::Rollback => self.finish(RolloutState::RollingBack, now),
                    }
                } else if self.state == RolloutState::Running {
                    out = self.advance(now);
                }
            }
            _ => {}
        }
        if self.state == RolloutState::RollingBack {
            out.extend(self.undo(now));
        }
        if expired || (self.state, self.batch, self.next_batch_at) != before || !out.is_empty() {
            self.updated_at = now;
        }
        out
    }

    /// Marks hosts (and undos) past their deadline as timed out.
    fn expire(&mut self, now: DateTime<Utc>) -> bool {
        let secs = self.strategy.host_deadline_s;
        let mut changed = false;
        for h in &mut self.hosts {
            if h.state == HostState::Sent && h.deadline_at.is_some_and(|d| now >= d) {
                changed = true;
                h.state = HostState::TimedOut;
                h.finished_at = Some(now);
                h.error = Some(format!("no result within the {secs} s host deadline"));
            }
            if let Some(u) = &mut h.undo
                && u.state == HostState::Sent
                && now >= u.deadline_at
            {
                u.state = HostState::TimedOut;
                u.error = Some(format!("no result within the {secs} s host deadline"));
                changed = true;
            }
        }
        changed
    }

    fn failure_reason(&self) -> Option<String> {
        if let Some(h) = self.hosts.iter().find(|h| h.state == HostState::TimedOut) {
            return Some(format!(
                "host {} did not answer within {} s; halted rather than skipping it",
                h.host, self.strategy.host_deadline_s
            ));
        }
        let failed = self.failures();
        let allowed = self.allowed_failures();
        (failed > allowed).then(|| {
            let names: Vec<&str> = self
                .hosts
                .iter()
                .filter(|h| h.state == HostState::Failed)
                .map(|h| h.host.as_str())
                .collect();
            format!(
                "{failed} host(s) failed ({}), more than the budget of {allowed}",
                names.join(", ")
            )
        })
    }

    fn advance(&mut self, now: DateTime<Utc>) -> Vec<Dispatch> {
        loop {
            let batch = self.batch;
            // The earliest batch not yet done goes first: after a retry, failed hosts of
            // earlier batches finish before later batches go on.
            let open =
                (0..=batch).find(|&b| self.hosts.iter().any(|h| h.batch == b && !h.is_done()));
            if let Some(b) = open {
                let pending: Vec<usize> = (0..self.hosts.len())
                    .filter(|&i| {
                        self.hosts[i].batch == b && self.hosts[i].state == HostState::Pending
                    })
                    .collect();
                return pending.into_iter().map(|i| self.send(i, now)).collect();
            }
            if batch + 1 >= self.batches {
                self.finish(RolloutState::Succeeded, now);
                return Vec::new();
            }
            if self.strategy.pause_s > 0 {
                let at = *self.next_batch_at.get_or_insert(
                    now + Duration::seconds(self.strategy.pause_s.min(1 << 40) as i64),
                );
                if now < at {
                    return Vec::new();
                }
            }
            self.next_batch_at = None;
            self.batch += 1;
        }
    }

    /// Issues a new command to host `i`.
    fn send(&mut self, i: usize, now: DateTime<Utc>) -> Dispatch {
        let deadline = self.deadline();
        let h = &mut self.hosts[i];
        let id = Uuid::now_v7();
        h.state = HostState::Sent;
        h.command = Some(id);
        h.attempts += 1;
        h.sent_at = Some(now);
        h.deadline_at = Some(now + deadline);
        h.expires_at = Some(now + deadline);
        h.finished_at = None;
        h.error = None;
        h.late = false;
        h.retried_at = None;
        Dispatch {
            host: i,
            command: id,
            undo: false,
            resend: false,
        }
    }

    /// Rollback in progress: send undos to hosts that switched, finish when all answered.
    fn undo(&mut self, now: DateTime<Utc>) -> Vec<Dispatch> {
        let deadline = self.deadline();
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if h.state != HostState::Succeeded || h.undo.is_some() {
                continue;
            }
            let Some(release) = h.before.clone() else {
                continue;
            };
            let id = Uuid::now_v7();
            h.undo = Some(Undo {
                command: id,
                release,
                state: HostState::Sent,
                sent_at: now,
                deadline_at: now + deadline,
                expires_at: now + deadline,
                error: None,
            });
            out.push(Dispatch {
                host: i,
                command: id,
                undo: true,
                resend: false,
            });
        }
        let in_flight = self.hosts.iter().any(|h| {
            h.state == HostState::Sent
                || h.undo.as_ref().is_some_and(|u| u.state == HostState::Sent)
        });
        if out.is_empty() && !in_flight {
            self.finish(RolloutState::RolledBack, now);
        }
        out
    }

    /// Records an agent's result. Returns false for a duplicate, stale or unknown one.
    pub fn record(&mut self, report: &HostReport, now: DateTime<Utc>) -> bool {
        let open = !self.state.is_terminal();
        for h in &mut self.hosts {
            if h.command == Some(report.command) {
                if !matches!(h.state, HostState::Sent | HostState::TimedOut) {
                    return false;
                }
                if open
                    && h.state == HostState::Sent
                    && !report.succeeded
                    && let Some(retried) = h.retried_at
                    && began_by_our_clock(report, now) < retried
                {
                    // The failure of the attempt the retry was meant to replace: by the
                    // conductor's own clock it began before the retry, and only now reached
                    // us. The retry asked for another try, so the host gets a new command.
                    tracing::info!(
                        rollout = self.id,
                        host = %h.host,
                        command = %report.command,
                        error = report.error.as_deref().unwrap_or(""),
                        "the retried attempt's failure arrived after the retry: a new command"
                    );
                    h.state = HostState::Pending;
                    h.retried_at = None;
                    h.error = report.error.clone();
                    self.updated_at = now;
                    return true;
                }
                h.late = h.state == HostState::TimedOut;
                h.state = if report.succeeded {
                    HostState::Succeeded
                } else {
                    HostState::Failed
                };
                h.finished_at = Some(now);
                h.duration_ms = Some(report.duration_ms);
                h.error = report.error.clone();
                h.agent_rolled_back = report.rolled_back;
                if report.succeeded {
                    h.before = report.previous.clone();
                }
                self.updated_at = now;
                return true;
            }
            if let Some(u) = &mut h.undo
                && u.command == report.command
            {
                if !matches!(u.state, HostState::Sent | HostState::TimedOut) {
                    return false;
                }
                u.state = if report.succeeded {
                    HostState::Succeeded
                } else {
                    HostState::Failed
                };
                u.error = report.error.clone();
                self.updated_at = now;
                return true;
            }
        }
        false
    }

    /// Every command issued and still waiting for its result: sent again after a restart.
    pub fn in_flight(&self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        if self.state.is_terminal() {
            return out;
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if h.state == HostState::Sent
                && let Some(id) = h.command
            {
                out.push(Dispatch::again(i, id, false));
            }
            if let Some(u) = &h.undo
                && u.state == HostState::Sent
            {
                out.push(Dispatch::again(i, u.command, true));
            }
        }
        out
    }

    pub fn pause(&mut self, now: DateTime<Utc>) -> Result<(), String> {
        match self.state {
            RolloutState::Running => {
                self.state = RolloutState::Paused;
                self.updated_at = now;
                Ok(())
            }
            s => Err(format!(
                "rollout {} is {}; only a running rollout can be paused",
                self.id,
                s.as_str()
            )),
        }
    }

    pub fn resume(&mut self, now: DateTime<Utc>) -> Result<(), String> {
        match self.state {
            RolloutState::Paused => {
                self.state = RolloutState::Running;
                self.updated_at = now;
                Ok(())
            }
            s => Err(format!(
                "rollout {} is {}; only a paused rollout can be resumed",
                self.id,
                s.as_str()
            )),
        }
    }

    /// Stops for good: nothing more is sent; hosts in flight finish and are recorded.
    pub fn abort(
        &mut self,
        state: RolloutState,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        if self.state.is_terminal() {
            return Err(format!(
                "rollout {} has already ended ({})",
                self.id,
                self.state.as_str()
            ));
        }
        self.reason = Some(reason);
        self.finish(state, now);
        self.updated_at = now;
        Ok(())
    }

    /// Goes on after a halt: failed hosts get a new command; a host that timed out gets its
    /// command again while that command could still run, a new one after it expired.
    pub fn retry(&mut self, now: DateTime<Utc>) -> Result<Vec<Dispatch>, String> {
        if self.state != RolloutState::Halted {
            return Err(format!(
                "rollout {} is {}; only a halted rollout can be retried",
                self.id,
                self.state.as_str()
            ));
        }
        let deadline = self.deadline();
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            match h.state {
                HostState::Failed => h.state = HostState::Pending,
                HostState::TimedOut => match (h.command, h.expires_at) {
                    (Some(id), Some(exp)) if now <= exp + AGENT_SKEW => {
                        h.state = HostState::Sent;
                        h.deadline_at = Some(now + deadline);
                        h.error = None;
                        h.retried_at = Some(now);
                        out.push(Dispatch::again(i, id, false));
                    }
                    _ => h.state = HostState::Pending,
                },
                _ => {}
            }
        }
        self.state = RolloutState::Running;
        self.reason = None;
        self.next_batch_at = None;
        self.updated_at = now;
        out.extend(self.tick(now));
        Ok(out)
    }

    /// Lets a rollout go on that the conductor held (started paused after a restore, with
    /// nothing sent): each host still waiting for its result gets its command again, with a
    /// fresh deadline, while that command is valid; a host whose command expired meanwhile
    /// is planned anew. Likewise for hosts being put back (an expired undo times out).
    pub fn rearm(&mut self, now: DateTime<Utc>) -> Vec<Dispatch> {
        let deadline = self.deadline();
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if h.state == HostState::Sent {
                match (h.command, h.expires_at) {
                    (Some(id), Some(exp)) if now < exp => {
                        h.deadline_at = Some(now + deadline);
                        out.push(Dispatch::again(i, id, false));
                    }
                    _ => h.state = HostState::Pending,
                }
            }
            if let Some(u) = &mut h.undo
                && u.state == HostState::Sent
            {
                if now < u.expires_at {
                    u.deadline_at = now + deadline;
                    out.push(Dispatch::again(i, u.command, true));
                } else {
                    u.state = HostState::TimedOut;
                    u.error = Some("its command expired while the conductor was held".into());
                }
            }
        }
        self.updated_at = now;
        out
    }

    /// The earliest time `tick` has something to do without any new result.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        let deadlines = self.hosts.iter().flat_map(|h| {
            let main = (h.state == HostState::Sent)
                .then_some(h.deadline_at)
                .flatten();
            let undo = h
                .undo
                .as_ref()
                .filter(|u| u.state == HostState::Sent)
                .map(|u| u.deadline_at);
            main.into_iter().chain(undo)
        });
        deadlines.chain(self.next_batch_at).min()
    }
}
