//! Everything the agent publishes goes through one ordered outbox: progress events and
//! results leave in the order they were produced, each retried until the broker confirms.
//! Results are already in the journal before they are queued here, so a result not yet
//! confirmed at shutdown is published again by the next start.

use crate::journal::Entry;
use convoy_bus::{Outgoing, Publisher, Retry};
use convoy_message::Message;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

enum Outbound {
    Event(Outgoing),
    Result(Outgoing, Entry),
}

/// A handle to queue messages for publication.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Outbound>,
}

impl Outbox {
    /// Starts the publishing task; it stops when `cancel` fires.
    pub fn start(
        publisher: Arc<Publisher>,
        cancel: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = cancel.cancelled() => None,
                };
                let Some(next) = next else { break };
                let published = match next {
                    Outbound::Event(out) => {
                        publisher.publish_event(&out, &cancel).await.map(|_| ())
                    }
                    Outbound::Result(out, entry) => {
                        let retry = Retry::until_cancelled(cancel.clone());
                        let sent = publisher.publish(&out, retry).await;
                        if sent.is_ok()
                            && let Err(e) = entry.mark_published()
                        {
                            tracing::warn!(error = %e, "could not mark a result published; it may be sent again");
                        }
                        sent
                    }
                };
                if let Err(e) = published {
                    tracing::info!(error = %e, "stopping the outbox with messages unpublished");
                    break;
                }
            }
        });
        (Self { tx }, task)
    }

    /// Queues a progress or inventory event (lost if the agent stops before it is sent).
    pub fn event(&self, message: &Message) {
        match Outgoing::message(message) {
            Ok(out) => {
                let _ = self.tx.send(Outbound::Event(out));
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an event"),
        }
    }

    /// Queues a recorded result; its entry is marked published once confirmed.
    pub fn result(&self, out: Outgoing, entry: Entry) {
        let _ = self.tx.send(Outbound::Result(out, entry));
    }
}
