//! The push-event handler and the per-repository fetch loops.

use crate::config::{Config, RepoConfig};
use crate::pending::Pending;
use convoy_bus::backoff::Backoff;
use convoy_bus::{Disposition, Handler, Incoming, Outgoing, PublishError, Publisher};
use convoy_message::names::{HostName, Name};
use convoy_message::{Body, FetchReport, FetchStatus, Message};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Shared by the handler and the fetch loops.
pub struct Fetcher {
    config: Config,
    host: HostName,
    pending: Pending,
    wake: HashMap<String, Arc<Notify>>,
    publisher: Arc<Publisher>,
}

impl Fetcher {
    pub fn new(config: Config, publisher: Arc<Publisher>) -> anyhow::Result<Self> {
        let host = config.host_name()?;
        std::fs::create_dir_all(&config.mirror_dir).map_err(|e| {
            anyhow::anyhow!(
                "config key `mirror_dir` ({}): {e}",
                config.mirror_dir.display()
            )
        })?;
        let pending = Pending::open(&config.mirror_dir)?;
        let wake = config
            .repos
            .keys()
            .map(|r| (r.clone(), Arc::new(Notify::new())))
            .collect();
        Ok(Self {
            config,
            host,
            pending,
            wake,
            publisher,
        })
    }

    pub fn host(&self) -> &HostName {
        &self.host
    }

    /// The mirrored repos, whose push keys this host's queue binds.
    pub fn repos(&self) -> Vec<Name> {
        self.config
            .repos
            .keys()
            .filter_map(|r| Name::new(r.as_str()).ok())
            .collect()
    }

    fn mirror_path(&self, repo: &str) -> PathBuf {
        self.config.mirror_dir.join(format!("{repo}.git"))
    }

    /// Starts one fetch loop per repo; each fetches once at start (catch-up).
    pub fn spawn_loops(
        self: &Arc<Self>,
        cancel: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.config
            .repos
            .iter()
            .map(|(name, repo)| {
                let me = self.clone();
                let name = name.clone();
                let repo = repo.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move { me.fetch_loop(name, repo, cancel).await })
            })
            .collect()
    }

    async fn fetch_loop(
        self: Arc<Self>,
        name: String,
        repo: RepoConfig,
        cancel: CancellationToken,
    ) {
        let Some(wake) = self.wake.get(&name).cloned() else {
            return;
        };
        let path = self.mirror_path(&name);
        let mut backoff = Backoff::new(Duration::from_secs(60));
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = cancel.cancelled() => return,
                }
                // Let a burst of pushes gather: one fetch answers them all.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(self.config.debounce_ms)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            first = false;
            let events = self.pending.list(&name);
            let started = Instant::now();
            let timeout = Duration::from_secs(self.config.fetch_timeout_s);
            let request = convoy_git::Request::Fetch {
                mirror: path.clone(),
                repo: repo.clone(),
                timeout_s: self.config.fetch_timeout_s,
            };
            // The helper gives up by itself at the timeout; it is killed a little after.
            let outcome = tokio::select! {
                reply = convoy_git::client::run(&request, timeout + Duration::from_secs(5)) => {
                    match reply {
                        Ok(convoy_git::Reply::Fetched { refs }) => Ok(refs),
                        Ok(convoy_git::Reply::Failed(convoy_git::GitError::Git(e))) => Err(e),
                        Ok(convoy_git::Reply::Failed(e)) => Err(e.to_string()),
                        Ok(other) => Err(format!("convoy-git answered a fetch with {other:?}")),
                        Err(convoy_git::GitError::Git(e)) => Err(e),
                        Err(e) => Err(e.to_string()),
                    }
                }
                // Dropping the run kills the helper.
                _ = cancel.cancelled() => return,
            };
            let Ok(repo_name) = Name::new(name.as_str()) else {
                return;
            };
            let ok = outcome.is_ok();
            let report = FetchReport {
                host: self.host.clone(),
                repo: repo_name,
                status: if ok {
                    FetchStatus::Fetched
                } else {
                    FetchStatus::Failed
                },
                refs: outcome.as_ref().cloned().unwrap_or_default(),
                for_events: events.clone(),
                error: outcome.as_ref().err().cloned(),
                duration_ms: started.elapsed().as_millis() as u64,
            };
            match &outcome {
                Ok(refs) => tracing::info!(repo = %name, refs = refs.len(), events = events.len(),
                    ms = report.duration_ms, "fetched"),
                Err(e) => tracing::warn!(repo = %name, error = %e, "fetch failed"),
            }
            let message = Message::new(format!("fetcher@{}", self.host), Body::Fetch(report));
            if self.report(&message, &cancel).await.is_err() {
                return;
            }
            if ok {
                backoff.reset();
                if let Err(e) = self.pending.remove(&name, &events) {
                    tracing::warn!(error = %e, "cannot update the pending list; those events will be answered again");
                }
            } else {
                // Try again later, pending events kept.
                let delay = backoff.next_delay();
                let wake = wake.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => wake.notify_one(),
                        _ = cancel.cancelled() => {}
                    }
                });
            }
        }
    }

    /// Publishes a fetch report; one nobody is bound to receive is dropped.
    async fn report(
        &self,
        message: &Message,
        cancel: &CancellationToken,
    ) -> Result<(), PublishError> {
        let out = Outgoing::message(message)?;
        self.publisher.publish_event(&out, cancel).await.map(|_| ())
    }
}

/// The push-event handler: record, wake the repo's loop, ack.
pub struct PushHandler(pub Arc<Fetcher>);

impl Handler for PushHandler {
    async fn handle(&self, incoming: Incoming) -> Disposition {
        let Body::Push(push) = &incoming.message.body else {
            return Disposition::DeadLetter(convoy_message::Rejection::new(
                convoy_message::RejectionCode::Unexpected,
                format!("a {} message on a fetcher queue", incoming.message.kind()),
            ));
        };
        let repo = push.repo.as_str();
        let Some(wake) = self.0.wake.get(repo) else {
            tracing::debug!(
                repo,
                "push for a repository this host does not mirror; ignored"
            );
            return Disposition::Ack;
        };
        if let Err(e) = self.0.pending.add(repo, incoming.message.id) {
            tracing::error!(error = %e, "cannot record the push event; it goes back to the queue");
            return Disposition::Retry;
        }
        tracing::debug!(repo, git_ref = %push.git_ref, id = %incoming.message.id, "push event");
        wake.notify_one();
        Disposition::Ack
    }
}
