//! A daemon's life: started, ready, reloading on SIGHUP, draining on SIGTERM/SIGINT.
//!
//! One [`CancellationToken`] per daemon tells every task to stop; a [`TaskTracker`] knows
//! when they have. systemd hears about each transition through `sd_notify` (a no-op when
//! not run by systemd), and gets a watchdog ping at half its `WatchdogSec` from a task on the
//! same runtime, so a wedged runtime stops pinging and is restarted.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The shutdown token, the task tracker and the reload signal of one daemon.
#[derive(Clone)]
pub struct Lifecycle {
    cancel: CancellationToken,
    tracker: TaskTracker,
    reload: watch::Receiver<u64>,
    /// Set once the daemon asks for [`Lifecycle::reloads`]: only then is SIGHUP a reload
    /// that systemd hears about (and must hear the end of, through `reloaded`).
    reloadable: Arc<AtomicBool>,
}

impl Lifecycle {
    /// Installs the signal handlers and the watchdog. Must run inside a tokio runtime.
    pub fn start() -> std::io::Result<Self> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (reload_tx, reload) = watch::channel(0u64);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let token = cancel.clone();
        let reloadable = Arc::new(AtomicBool::new(false));
        let can_reload = reloadable.clone();
        tokio::spawn(async move {
            let mut generation = 0u64;
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
                    _ = hup.recv() => {
                        if !can_reload.load(Ordering::Relaxed) {
                            tracing::warn!("SIGHUP: this daemon does not reload its configuration; restart it to apply changes");
                            continue;
                        }
                        generation += 1;
                        tracing::info!("SIGHUP: reloading configuration");
                        notify(&[sd_notify::NotifyState::Reloading]);
                        let _ = reload_tx.send(generation);
                    }
                    _ = token.cancelled() => break,
                }
            }
            notify(&[sd_notify::NotifyState::Stopping]);
            token.cancel();
        });
        if let Some(interval) = sd_notify::watchdog_enabled() {
            let token = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval / 2);
                loop {
                    tokio::select! {
                        _ = tick.tick() => notify(&[sd_notify::NotifyState::Watchdog]),
                        _ = token.cancelled() => break,
                    }
                }
            });
        }
        Ok(Self {
            cancel,
            tracker,
            reload,
            reloadable,
        })
    }

    /// Tells systemd the daemon is up (`READY=1`) with a status line.
    pub fn ready(&self, status: &str) {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// Tells systemd a reload finished — applied, or refused with the old configuration
    /// kept (`status` says which).
    pub fn reloaded(&self, status: &str) {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// Updates the status line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        notify(&[sd_notify::NotifyState::Status(status)]);
    }

    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when shutdown was requested.
    pub async fn stopping(&self) {
        self.cancel.cancelled().await
    }

    /// Requests shutdown (e.g. after a fatal error).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    /// A receiver that changes on every SIGHUP. A daemon that asks for it reloads on
    /// SIGHUP and must call [`Lifecycle::reloaded`] after each one; SIGHUP to any other
    /// daemon is logged and ignored.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloadable.store(true, Ordering::Relaxed);
        self.reload.clone()
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// After shutdown was requested: waits for the tracked tasks, at most `deadline`.
    /// Returns false when tasks were still running at the deadline.
    pub async fn drain(&self, deadline: Duration) -> bool {
        notify(&[sd_notify::NotifyState::Stopping]);
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(?deadline, "tasks still running at the shutdown deadline");
                false
            }
        }
    }
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(state)
    {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
