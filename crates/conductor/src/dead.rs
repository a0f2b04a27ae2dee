//! The dead-letter keeper: moves what any convoy consumer refused — the queue
//! `<exchange>.dead` — into the store, where `convoy dead-letters`, the API and the
//! dashboard show each with its reason, and `convoy_dead_letters_total` counts them.
//!
//! Every few seconds it takes what waits there (`basic.get`, up to [`BATCH`] at a time),
//! hands the batch to the engine, and acknowledges it only after the engine's transaction
//! committed: a conductor killed in between finds the same messages again, and the store
//! keeps one copy of each (its digest is unique). The body is kept as it arrived, up to
//! [`MAX_BODY`] bytes (the whole size is noted); the store keeps the newest
//! [`crate::store::DEAD_LETTERS_KEPT`].
//!
//! Nothing here decodes the message: a dead letter is often not a convoy message at all.

use crate::engine::{Input, Shared};
use chrono::{DateTime, Utc};
use convoy_bus::Bus;
use convoy_message::routing::queue;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Messages taken from the queue per transaction.
pub const BATCH: usize = 100;

/// The most of a body the store keeps (bodies reach the queue cut at 1 MiB already).
pub const MAX_BODY: usize = 64 * 1024;

/// One pass that takes longer has a broker that stopped answering.
const STUCK: Duration = Duration::from_secs(60);

/// How often the queue is looked at.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// One refused message, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The store's number for it (0 until stored).
    #[serde(default)]
    pub id: i64,
    /// When the conductor took it from the queue.
    pub kept_at: DateTime<Utc>,
    /// The refusal's code (`bad_signature`, `malformed`, …), or, for a message RabbitMQ
    /// dead-lettered by itself, `broker:<its reason>` (`broker:delivery_limit`).
    pub reason: String,
    /// What the refusing consumer said.
    pub detail: String,
    /// The queue it was refused from.
    pub queue: Option<String>,
    pub routing_key: String,
    /// The consumer that refused it (`<queue>@<pid>-<random>`, `agent@<host>`).
    pub rejected_by: Option<String>,
    pub rejected_at: Option<String>,
    /// The message's own id and kind, when it had them.
    pub message_id: Option<String>,
    pub kind: Option<String>,
    /// The body's size as it reached the dead-letter queue, and its size when it was
    /// refused if the refusing consumer cut it (over 1 MiB).
    pub size: usize,
    pub truncated_from: Option<u64>,
    /// The body, as text (bytes that are not UTF-8 shown as U+FFFD): its first
    /// [`MAX_BODY`] bytes, `body_cut` when there were more.
    pub body: String,
    #[serde(default)]
    pub body_cut: bool,
}

impl DeadLetter {
    /// Reads one delivery of the dead-letter queue; never fails.
    pub fn of(delivery: &Delivery, kept_at: DateTime<Utc>) -> (Self, String) {
        let props = &delivery.properties;
        let headers = props.headers().clone().unwrap_or_default();
        let text = |name: &str| header_text(&headers, name);
        let reason = text("x-convoy-reason")
            .or_else(|| broker_reason(&headers).map(|r| format!("broker:{r}")))
            .unwrap_or_else(|| "unknown".into());
        let detail = text("x-convoy-detail")
            .or_else(|| broker_reason(&headers).map(|r| broker_detail(&r)))
            .unwrap_or_default();
        let data = &delivery.data;
        let body = String::from_utf8_lossy(&data[..data.len().min(MAX_BODY)]).into_owned();
        let letter = Self {
            id: 0,
            kept_at,
            reason,
            detail,
            queue: text("x-convoy-queue").or_else(|| broker_queue(&headers)),
            routing_key: text("x-convoy-routing-key")
                .unwrap_or_else(|| delivery.routing_key.to_string()),
            rejected_by: text("x-convoy-rejected-by"),
            rejected_at: text("x-convoy-rejected-at"),
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            kind: props.kind().as_ref().map(|s| s.to_string()),
            size: data.len(),
            truncated_from: text("x-convoy-truncated-from").and_then(|s| s.parse().ok()),
            body,
            body_cut: data.len() > MAX_BODY,
        };
        // The same message redelivered (its ack lost) has the same headers and bytes.
        let mut digest = Sha256::new();
        digest.update(format!("{headers:?}").as_bytes());
        digest.update(data);
        (letter, hex::encode(digest.finalize()))
    }
}

fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The newest `x-death` entry's field `name`, as text.
fn x_death(headers: &FieldTable, name: &str) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_text(first, name)
}

/// What RabbitMQ's own dead-lettering reason means.
fn broker_detail(reason: &str) -> String {
    match reason {
        "delivery_limit" => "RabbitMQ dead-lettered it after 1000 deliveries nobody acknowledged \
            (x-delivery-limit): a consumer crashed on it again and again"
            .into(),
        other => format!("RabbitMQ dead-lettered it itself ({other})"),
    }
}

fn broker_reason(headers: &FieldTable) -> Option<String> {
    x_death(headers, "reason")
}

fn broker_queue(headers: &FieldTable) -> Option<String> {
    x_death(headers, "queue")
}

/// Takes what waits in the dead-letter queue into the store until cancelled.
pub async fn keep(
    bus: Bus,
    shared: Arc<Shared>,
    engine: mpsc::Sender<Input>,
    token: CancellationToken,
) {
    let queue = queue::dead(bus.exchange());
    let mut failing = false;
    loop {
        match drain(&bus, &queue, &engine).await {
            Ok(0) => failing = false,
            Ok(n) => {
                failing = false;
                tracing::warn!(count = n, %queue,
                    "dead letters kept: `convoy dead-letters` shows them with their reasons");
                shared.emit("dead_letters", json!({ "kept": n }));
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(%queue, error = %e, "cannot take the dead letters (trying again every 5 s)");
            }
            Err(e) => tracing::debug!(%queue, error = %e, "still cannot take the dead letters"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// One pass: every message waiting, in batches; returns how many were kept.
async fn drain(bus: &Bus, queue: &str, engine: &mpsc::Sender<Input>) -> Result<usize, String> {
    let conn = bus.connection().await.map_err(|e| e.to_string())?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    let Ok(outcome) = tokio::time::timeout(STUCK, drain_on(&channel, queue, engine)).await else {
        // A connection that stops answering: the next user reconnects, and the broker
        // gives back what this channel held.
        bus.discard(&conn).await;
        return Err(format!("the broker did not answer within {STUCK:?}"));
    };
    // Closing gives back whatever was taken and not acknowledged.
    let _ = tokio::time::timeout(STUCK, channel.close(200, "done".into())).await;
    outcome
}

async fn drain_on(
    channel: &lapin::Channel,
    queue: &str,
    engine: &mpsc::Sender<Input>,
) -> Result<usize, String> {
    let mut kept = 0;
    loop {
        let mut letters = Vec::new();
        let mut last = None;
        while letters.len() < BATCH {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|e| {
                    format!(
                        "reading {queue}: {e} (ACCESS_REFUSED: the conductor's broker user predates \
                         dead-letter keeping — run `convoy bus setup` again; NOT_FOUND: run it once)"
                    )
                })?;
            let Some(message) = got else { break };
            last = Some(message.delivery.delivery_tag);
            letters.push(DeadLetter::of(&message.delivery, Utc::now()));
        }
        let (Some(tag), n) = (last, letters.len()) else {
            return Ok(kept);
        };
        let (done, stored) = oneshot::channel();
        engine
            .send(Input::DeadLetters { letters, done })
            .await
            .map_err(|_| "the conductor is stopping".to_owned())?;
        if stored.await != Ok(true) {
            return Err("the store did not take them; they stay in the queue".into());
        }
        channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| format!("acknowledging: {e}"))?;
        kept += n;
        if n < BATCH {
            return Ok(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DEAD_LETTERS_KEPT, Store};

    fn letter(n: i64) -> DeadLetter {
        DeadLetter {
            id: 0,
            kept_at: Utc::now(),
            reason: if n % 2 == 0 { "malformed" } else { "expired" }.into(),
            detail: format!("letter {n}"),
            queue: Some("convoy.conductor".into()),
            routing_key: "deploy.web.h1.result".into(),
            rejected_by: None,
            rejected_at: None,
            message_id: None,
            kind: None,
            size: 3,
            truncated_from: None,
            body: "{}}".into(),
            body_cut: false,
        }
    }

    #[test]
    fn one_copy_each_the_newest_kept_and_cleared_up_to_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let added = store
            .write(|tx| {
                let first = tx.insert_dead_letter(&letter(0), "d0")?;
                let again = tx.insert_dead_letter(&letter(0), "d0")?;
                Ok((first, again))
            })
            .unwrap();
        assert_eq!(added, (true, false), "a redelivered letter is kept once");

        store
            .write(|tx| {
                for n in 1..=DEAD_LETTERS_KEPT {
                    tx.insert_dead_letter(&letter(n), &format!("d{n}"))?;
                }
                Ok(())
            })
            .unwrap();
        let (all, counts) = store.dead_letters(None, 10_000).unwrap();
        assert_eq!(all.len() as i64, DEAD_LETTERS_KEPT, "the oldest went");
        assert_eq!(all[0].detail, format!("letter {DEAD_LETTERS_KEPT}"));
        assert_eq!(all.last().map(|l| l.detail.as_str()), Some("letter 1"));
        let total: i64 = counts.iter().map(|(_, n)| n).sum();
        assert_eq!(total, DEAD_LETTERS_KEPT);
        let (expired, _) = store.dead_letters(Some("expired"), 3).unwrap();
        assert!(expired.iter().all(|l| l.reason == "expired") && expired.len() == 3);

        let middle = all[100].id;
        let cleared = store
            .write(|tx| tx.clear_dead_letters(Some(middle)))
            .unwrap();
        assert_eq!(cleared as i64, DEAD_LETTERS_KEPT - 100);
        assert!(store.dead_letter(middle).unwrap().is_none());
        assert_eq!(store.dead_letters(None, 10_000).unwrap().0.len(), 100);
        assert_eq!(store.write(|tx| tx.clear_dead_letters(None)).unwrap(), 100);
    }
}
