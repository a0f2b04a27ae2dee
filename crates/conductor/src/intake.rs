//! What the conductor consumes: its event queue (builds, pushes, fetch reports, results,
//! inventories), its live progress queue and its heartbeat queue — declared as
//! [`QueueSpec::conductor_events`], [`QueueSpec::conductor_progress`] and
//! [`QueueSpec::conductor_heartbeats`], the same specs `convoy bus setup` declares.
//!
//! Results, builds, pushes and fetch reports go through the engine and are acknowledged only
//! after the engine's transaction committed; progress and heartbeats only feed the live view
//! and are acknowledged at once.

use crate::engine::{Input, Shared};
use convoy_bus::{Disposition, Incoming};
use convoy_message::{Body, DeployProgress, Rejection, RejectionCode};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{mpsc, oneshot};

/// Handles one delivery of the event queue.
pub async fn on_event(
    shared: &Arc<Shared>,
    engine: &mpsc::Sender<Input>,
    incoming: Incoming,
) -> Disposition {
    let message = incoming.message;
    let (tx, rx) = oneshot::channel();
    let input = match message.body {
        Body::Result(result) => {
            tracing::debug!(command = %result.command_id, host = %result.host, "result delivered");
            shared.forget_progress(result.command_id);
            Input::Result {
                result: Box::new(result),
                done: tx,
            }
        }
        Body::Build(event) => {
            shared.emit("build", json!(event));
            Input::Build {
                id: message.id,
                event,
                done: tx,
            }
        }
        Body::Push(event) => Input::Push { event, done: tx },
        Body::Fetch(report) => {
            shared.emit(
                "fetch",
                json!({ "host": report.host, "repo": report.repo, "status": report.status, "error": report.error }),
            );
            Input::Fetch { report, done: tx }
        }
        // Only from before progress had its own queue (an upgrade's leftovers).
        Body::Progress(p) => {
            note_progress(shared, &p);
            return Disposition::Ack;
        }
        Body::Inventory(i) => {
            shared.note_inventory(&i);
            return Disposition::Ack;
        }
        other => {
            return Disposition::DeadLetter(Rejection::new(
                RejectionCode::UnknownKind,
                format!(
                    "the conductor's queue does not take `{}` messages",
                    other.kind()
                ),
            ));
        }
    };
    if engine.send(input).await.is_err() {
        return Disposition::Retry;
    }
    match rx.await {
        Ok(true) => Disposition::Ack,
        _ => Disposition::Retry,
    }
}

/// Handles one delivery of the progress queue.
pub fn on_progress(shared: &Arc<Shared>, incoming: Incoming) -> Disposition {
    let Body::Progress(p) = incoming.message.body else {
        return Disposition::DeadLetter(Rejection::new(
            RejectionCode::UnknownKind,
            "the progress queue takes only `progress` messages",
        ));
    };
    note_progress(shared, &p);
    Disposition::Ack
}

fn note_progress(shared: &Arc<Shared>, p: &DeployProgress) {
    shared.note_progress(p);
    shared.emit("progress", json!(p));
}

/// Handles one heartbeat.
pub fn on_heartbeat(shared: &Arc<Shared>, incoming: Incoming) -> Disposition {
    let Body::Heartbeat(beat) = incoming.message.body else {
        return Disposition::DeadLetter(Rejection::new(
            RejectionCode::UnknownKind,
            "the heartbeat queue takes only `heartbeat` messages",
        ));
    };
    shared.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
    let host = beat.host.clone();
    if shared.fleet.beat(beat, chrono::Utc::now()) {
        shared.emit("host", json!({ "host": host, "liveness": "alive" }));
    }
    Disposition::Ack
}
