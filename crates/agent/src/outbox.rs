//! Everything the agent publishes goes through one ordered outbox: progress events and
//! results leave in the order they were produced, each retried until the broker confirms.
//! Results are already in the journal before they are queued here, so a result not yet
//! confirmed at shutdown is published again by the next start.

use crate::journal::Entry;
use convoy_bus::backoff::Backoff;
use convoy_bus::{Outgoing, PublishError, Publisher, Retry};
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
                    Outbound::Event(out) => publish_event(&publisher, &out, &cancel).await,
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

/// Progress events are worth retrying across a broker restart, but one nobody is bound to
/// receive (no conductor queue yet) is dropped rather than blocking the results behind it.
async fn publish_event(
    publisher: &Publisher,
    out: &Outgoing,
    cancel: &CancellationToken,
) -> Result<(), PublishError> {
    let mut backoff = Backoff::new(publisher.bus().config().max_backoff());
    loop {
        match publisher.publish_once(out).await {
            Ok(()) => return Ok(()),
            Err(PublishError::Unroutable { routing_key, .. }) => {
                tracing::debug!(%routing_key, "no consumer bound for this event; dropped");
                return Ok(());
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "event not confirmed; will publish again");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                }
            }
        }
    }
}
