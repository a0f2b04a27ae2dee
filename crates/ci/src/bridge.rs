//! The bridge: push events in, Jenkins builds out, build events back.
//!
//! A push matching a job rule becomes a *trigger*, written to `<state_dir>/triggers/` before
//! the push is acked. Each trigger is followed by its own task — request the build (retrying
//! with backoff while Jenkins is down or answering 5xx), follow the queue item to the build,
//! poll the build to its result — and every step is saved before it is announced, so a
//! restarted bridge resumes each trigger where it was and loses none. Build event ids are
//! derived from the trigger and the status, so a step announced twice is one event.

use crate::config::{Config, JobRule};
use crate::jenkins::{BuildState, CallError, Jenkins, QueueState};
use chrono::{DateTime, Utc};
use convoy_bus::backoff::Backoff;
use convoy_bus::{Disposition, Handler, Incoming, Outgoing, Publisher};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{
    Body, BuildEvent, BuildStatus, Message, PushChange, Rejection, RejectionCode,
};
use convoy_release::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Where a trigger stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Requested,
    Queued { queue: String },
    Started { number: u64, url: String },
}

/// One build requested for one push.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub id: Uuid,
    pub repo: Name,
    #[serde(rename = "ref")]
    pub git_ref: RefName,
    pub commit: Sha,
    pub job: String,
    pub params: BTreeMap<String, String>,
    #[serde(flatten)]
    pub phase: Phase,
    /// The event for `phase` was published.
    pub announced: bool,
    pub created_at: DateTime<Utc>,
}

pub struct Bridge {
    config: Config,
    jenkins: Arc<Jenkins>,
    publisher: Arc<Publisher>,
    dir: PathBuf,
    from: String,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

fn substitute(template: &str, repo: &Name, git_ref: &RefName, commit: &Sha) -> String {
    template
        .replace("{repo}", repo.as_str())
        .replace("{ref}", git_ref.as_str())
        .replace("{short_ref}", git_ref.short())
        .replace("{commit}", commit.as_str())
}

impl Bridge {
    pub fn new(
        config: Config,
        publisher: Arc<Publisher>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let token = config.jenkins_token()?;
        let jenkins = Jenkins::new(
            &config.jenkins.url,
            &config.jenkins.user,
            token.as_deref(),
            Duration::from_secs(config.jenkins.request_timeout_s.max(1)),
        );
        let dir = config.state_dir.join("triggers");
        for sub in ["", "done"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| {
                anyhow::anyhow!(
                    "config key `state_dir` ({}): {e}",
                    config.state_dir.display()
                )
            })?;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(Arc::new(Self {
            config,
            jenkins: Arc::new(jenkins),
            publisher,
            dir,
            from: format!("ci@{}", host.trim()),
            tasks: TaskTracker::new(),
            cancel,
        }))
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn save(&self, t: &Trigger) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(t).unwrap_or_default();
        write_atomic(&self.path(t.id), &bytes).map_err(std::io::Error::other)
    }

    /// Files a finished trigger under done/ (kept so a redelivered push is not built again).
    fn finish(&self, t: &Trigger) {
        let _ = std::fs::rename(
            self.path(t.id),
            self.dir.join("done").join(format!("{}.json", t.id)),
        );
    }

    /// Resumes every trigger a previous run left unfinished.
    pub fn resume(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Trigger>(&b).ok())
            {
                Some(t) => {
                    n += 1;
                    self.spawn(t);
                }
                None => {
                    tracing::error!(file = %path.display(), "unreadable trigger left for a person")
                }
            }
        }
        Ok(n)
    }

    fn spawn(self: &Arc<Self>, t: Trigger) {
        let me = self.clone();
        self.tasks.spawn(async move { me.follow(t).await });
    }

    pub async fn drain(&self, deadline: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(deadline, self.tasks.wait()).await;
    }

    async fn announce(&self, t: &Trigger, status: BuildStatus, detail: Option<String>) -> bool {
        let (number, url) = match &t.phase {
            Phase::Started { number, url } => (Some(*number), Some(url.clone())),
            _ => (None, None),
        };
        let id = Uuid::new_v5(&t.id, status.as_str().as_bytes());
        let body = Body::Build(BuildEvent {
            repo: t.repo.clone(),
            git_ref: Some(t.git_ref.clone()),
            commit: t.commit.clone(),
            status,
            job: t.job.clone(),
            build_number: number,
            url,
            detail,
        });
        let message = Message::with_id(id, self.from.clone(), body);
        match Outgoing::message(&message) {
            Ok(out) => self
                .publisher
                .publish_event(&out, &self.cancel)
                .await
                .is_ok(),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a build event");
                true
            }
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Jenkins) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, CallError> {
        let jenkins = self.jenkins.clone();
        tokio::task::spawn_blocking(move || f(&jenkins))
            .await
            .unwrap_or_else(|e| Err(CallError::Transient(e.to_string())))
    }

    async fn follow(self: Arc<Self>, mut t: Trigger) {
        let poll = Duration::from_millis(self.config.jenkins.poll_interval_ms.max(100));
        let give_up =
            t.created_at + chrono::Duration::hours(self.config.jenkins.follow_hours as i64);
        let mut backoff = Backoff::new(Duration::from_secs(60));
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            if !t.announced {
                let status = match t.phase {
                    Phase::Requested => None,
                    Phase::Queued { .. } => Some(BuildStatus::Queued),
                    Phase::Started { .. } => Some(BuildStatus::Started),
                };
                if let Some(status) = status
                    && !self.announce(&t, status, None).await
                {
                    return;
                }
                t.announced = true;
                let _ = self.save(&t);
            }
            if Utc::now() > give_up {
                let why = format!(
                    "gave up following after {} hours",
                    self.config.jenkins.follow_hours
                );
                self.end(&t, BuildStatus::Aborted, Some(why)).await;
                return;
            }
            let step = match t.phase.clone() {
                Phase::Requested => {
                    let (job, params) = (t.job.clone(), t.params.clone());
                    self.call(move |j| j.trigger(&job, &params)).await.map(|queue| {
                        tracing::info!(job = %t.job, commit = %t.commit.short(), %queue, "build requested");
                        Some(Phase::Queued { queue })
                    })
                }
                Phase::Queued { queue } => {
                    self.call(move |j| j.queue_item(&queue))
                        .await
                        .map(|state| match state {
                            QueueState::Waiting => None,
                            QueueState::Cancelled => Some(Phase::Requested), // marker, handled below
                            QueueState::Started { number, url } => {
                                Some(Phase::Started { number, url })
                            }
                        })
                }
                Phase::Started { url, .. } => match self.call(move |j| j.build(&url)).await {
                    Ok(BuildState::Running) => Ok(None),
                    Ok(BuildState::Done(result)) => {
                        let status = match result.as_str() {
                            "SUCCESS" => BuildStatus::Succeeded,
                            "ABORTED" | "NOT_BUILT" => BuildStatus::Aborted,
                            _ => BuildStatus::Failed,
                        };
                        let detail = (status != BuildStatus::Succeeded)
                            .then(|| format!("Jenkins result {result}"));
                        self.end(&t, status, detail).await;
                        return;
                    }
                    Err(e) => Err(e),
                },
            };
            match step {
                Ok(None) => tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = self.cancel.cancelled() => return,
                },
                Ok(Some(Phase::Requested)) => {
                    self.end(
                        &t,
                        BuildStatus::Aborted,
                        Some("cancelled in the Jenkins queue".into()),
                    )
                    .await;
                    return;
                }
                Ok(Some(next)) => {
                    backoff.reset();
                    t.phase = next;
                    t.announced = false;
                    if let Err(e) = self.save(&t) {
                        tracing::error!(error = %e, "cannot save a trigger; it may be announced twice");
                    }
                }
                Err(CallError::Transient(why)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(job = %t.job, %why, retry_in = ?delay, "Jenkins unavailable; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                }
                Err(refused @ CallError::Refused { .. }) => {
                    tracing::error!(job = %t.job, cause = %refused, "Jenkins refused; reporting the build failed");
                    self.end(
                        &t,
                        BuildStatus::Failed,
                        Some(format!("job {}: {refused}", t.job)),
                    )
                    .await;
                    return;
                }
            }
        }
    }

    async fn end(&self, t: &Trigger, status: BuildStatus, detail: Option<String>) {
        tracing::info!(job = %t.job, commit = %t.commit.short(), status = status.as_str(), "build finished");
        if self.announce(t, status, detail).await {
            self.finish(t);
        }
    }

    fn known(&self, id: Uuid) -> bool {
        self.path(id).exists() || self.dir.join("done").join(format!("{id}.json")).exists()
    }

    fn trigger_for(&self, message: &Message, rule: &JobRule) -> Option<Trigger> {
        let Body::Push(push) = &message.body else {
            return None;
        };
        let id = Uuid::new_v5(&message.id, rule.job.as_bytes());
        let params = rule
            .parameters
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    substitute(v, &push.repo, &push.git_ref, &push.new),
                )
            })
            .collect();
        Some(Trigger {
            id,
            repo: push.repo.clone(),
            git_ref: push.git_ref.clone(),
            commit: push.new.clone(),
            job: rule.job.clone(),
            params,
            phase: Phase::Requested,
            announced: true,
            created_at: Utc::now(),
        })
    }
}

/// The push-event handler: one trigger per matching rule, saved before the ack.
pub struct PushHandler(pub Arc<Bridge>);

impl Handler for PushHandler {
    async fn handle(&self, incoming: Incoming) -> Disposition {
        let bridge = &self.0;
        let Body::Push(push) = &incoming.message.body else {
            return Disposition::DeadLetter(Rejection::new(
                RejectionCode::Unexpected,
                format!("a {} message on the CI queue", incoming.message.kind()),
            ));
        };
        if push.change == PushChange::Deleted {
            return Disposition::Ack;
        }
        let rules: Vec<JobRule> = bridge
            .config
            .rules_for(push.repo.as_str(), push.git_ref.as_str())
            .cloned()
            .collect();
        for rule in &rules {
            let Some(trigger) = bridge.trigger_for(&incoming.message, rule) else {
                continue;
            };
            if bridge.known(trigger.id) {
                continue;
            }
            if let Err(e) = bridge.save(&trigger) {
                tracing::error!(error = %e, "cannot save a trigger; the push goes back to the queue");
                return Disposition::Retry;
            }
            tracing::info!(job = %rule.job, repo = %push.repo, git_ref = %push.git_ref, "push matches a job");
            bridge.spawn(trigger);
        }
        Disposition::Ack
    }
}
