//! Everything the agent publishes goes through one ordered outbox: progress events and
//! results are handed to the broker in the order they were produced (up to 32 awaiting
//! their confirms at once), each retried until the broker confirms.
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

/// Publishes awaiting their confirms at once.
const IN_FLIGHT: usize = 32;

/// Publishes one message: an event until confirmed or unroutable, a result until confirmed
/// (then marked published in its journal entry).
async fn send(
    publisher: Arc<Publisher>,
    item: Outbound,
    cancel: CancellationToken,
) -> Result<(), convoy_bus::PublishError> {
    match item {
        Outbound::Event(out) => publisher.publish_event(&out, &cancel).await.map(|_| ()),
        Outbound::Result(out, entry) => {
            let sent = publisher
                .publish(&out, Retry::until_cancelled(cancel.clone()))
                .await;
            if sent.is_ok()
                && let Err(e) = entry.mark_published()
            {
                tracing::warn!(error = %e, "could not mark a result published; it may be sent again");
            }
            sent
        }
    }
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
            // Publishes are issued in queue order (the publisher's channel lock is fair) and
            // their confirms awaited together: a result does not wait for each progress
            // event before it to be confirmed one after the other.
            let mut inflight = futures_util::stream::FuturesOrdered::new();
            let mut open = true;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    next = rx.recv(), if open && inflight.len() < IN_FLIGHT => match next {
                        Some(item) => inflight.push_back(send(publisher.clone(), item, cancel.clone())),
                        None => open = false,
                    },
                    Some(published) = futures_util::StreamExt::next(&mut inflight), if !inflight.is_empty() => {
                        if let Err(e) = published {
                            tracing::info!(error = %e, "stopping the outbox with messages unpublished");
                            break;
                        }
                    }
                    else => break,
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
