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

/// A broker that does not answer one request within this has stopped answering.
const STUCK: Duration = Duration::from_secs(30);

/// The most of a body listed with each letter (the whole body comes with one letter).
pub const PREVIEW: usize = 2048;

/// The most of a header's text kept: anyone who may publish dead letters writes them.
const MAX_HEADER: usize = 4096;

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
    /// The body's first [`PREVIEW`] bytes, as text (bytes that are not UTF-8 shown as
    /// U+FFFD).
    pub preview: String,
    /// The body as text, its first [`MAX_BODY`] bytes (`body_cut` when there were more):
    /// stored apart, and given only with one letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub body_cut: bool,
}

impl DeadLetter {
    /// Reads one delivery of the dead-letter queue; never fails.
    pub fn of(delivery: &Delivery, kept_at: DateTime<Utc>) -> (Self, String) {
        let props = &delivery.properties;
        let headers = props.headers().clone().unwrap_or_default();
        let text = |name: &str| header_text(&headers, name);
        let broker_reason = x_death(&headers, "reason");
        let reason = text("x-convoy-reason")
            .or_else(|| broker_reason.as_ref().map(|r| format!("broker:{r}")))
            .unwrap_or_else(|| "unknown".into());
        let detail = text("x-convoy-detail")
            .or_else(|| broker_reason.as_deref().map(broker_detail))
            .unwrap_or_default();
        let data = &delivery.data;
        let text_of = |n: usize| String::from_utf8_lossy(&data[..data.len().min(n)]).into_owned();
        let letter = Self {
            id: 0,
            kept_at,
            reason,
            detail,
            queue: text("x-convoy-queue").or_else(|| x_death(&headers, "queue")),
            routing_key: text("x-convoy-routing-key")
                .unwrap_or_else(|| delivery.routing_key.to_string()),
            rejected_by: text("x-convoy-rejected-by"),
            rejected_at: text("x-convoy-rejected-at"),
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            kind: props.kind().as_ref().map(|s| s.to_string()),
            size: data.len(),
            truncated_from: text("x-convoy-truncated-from").and_then(|s| s.parse().ok()),
            preview: text_of(PREVIEW),
            body: Some(text_of(MAX_BODY)),
            body_cut: data.len() > MAX_BODY,
        };
        // What makes it this message, and stays the same when it is given back and taken
        // again (the conductor stopped between storing and acking): its bytes, id and the
        // headers of its refusal — not the counts a quorum queue adds on each delivery
        // (`x-delivery-count`, `x-acquired-count`).
        let mut digest = Sha256::new();
        let mut part = |name: &str, value: Option<&str>| {
            digest.update(name.as_bytes());
            digest.update(b"\0");
            digest.update(value.unwrap_or("\u{1}").as_bytes());
            digest.update(b"\0");
        };
        for name in headers.inner().keys().map(|k| k.as_str()) {
            if name.starts_with("x-convoy-") || name.starts_with("x-first-death-") {
                part(name, header_text(&headers, name).as_deref());
            }
        }
        part("message-id", letter.message_id.as_deref());
        part("routing-key", Some(delivery.routing_key.as_str()));
        digest.update(data);
        (letter, hex::encode(digest.finalize()))
    }
}

/// A header as text, at most [`MAX_HEADER`] bytes of it.
fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    let mut text = match headers.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    };
    if text.len() > MAX_HEADER {
        let mut end = MAX_HEADER;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    Some(text)
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
        let outcome = drain(&bus, &queue, &engine).await;
        shared.set_dead_letters_blocked(outcome.as_ref().err().cloned());
        match outcome {
            Ok(0) => failing = false,
            Ok(n) => {
                failing = false;
                tracing::warn!(count = n, %queue,
                    "took refused messages into the store: `convoy dead-letters` shows them with their reasons");
                shared.emit("dead_letters", json!({ "taken": n }));
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

/// Why a pass ended early.
enum Stop {
    /// The broker did not answer a request within [`STUCK`]: its connection goes.
    Silent,
    Failed(String),
}

impl Stop {
    fn why(self) -> String {
        match self {
            Stop::Silent => format!("the broker did not answer within {STUCK:?}"),
            Stop::Failed(why) => why,
        }
    }
}

/// One pass: every message waiting, in batches; returns how many were taken.
async fn drain(bus: &Bus, queue: &str, engine: &mpsc::Sender<Input>) -> Result<usize, String> {
    let conn = bus.connection().await.map_err(|e| e.to_string())?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    let outcome = drain_on(&channel, queue, engine).await;
    if let Err(Stop::Silent) = outcome {
        // The next user reconnects, and the broker gives back what this channel held.
        bus.discard(&conn).await;
    } else {
        // Closing gives back whatever was taken and not acknowledged.
        let _ = tokio::time::timeout(STUCK, channel.close(200, "done".into())).await;
    }
    outcome.map_err(Stop::why)
}

/// A request to the broker, answered within [`STUCK`].
async fn asked<T>(
    request: impl std::future::Future<Output = lapin::Result<T>>,
    what: impl FnOnce(lapin::Error) -> String,
) -> Result<T, Stop> {
    match tokio::time::timeout(STUCK, request).await {
        Err(_) => Err(Stop::Silent),
        Ok(answer) => answer.map_err(|e| Stop::Failed(what(e))),
    }
}

async fn drain_on(
    channel: &lapin::Channel,
    queue: &str,
    engine: &mpsc::Sender<Input>,
) -> Result<usize, Stop> {
    let mut taken = 0;
    loop {
        let mut letters = Vec::new();
        let mut last = None;
        while letters.len() < BATCH {
            let got = asked(
                channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
                |e| {
                    format!(
                        "reading {queue}: {e} (ACCESS_REFUSED: the conductor's broker user \
                         predates dead-letter keeping — run `convoy bus setup` again; \
                         NOT_FOUND: run it once)"
                    )
                },
            )
            .await?;
            let Some(message) = got else { break };
            last = Some(message.delivery.delivery_tag);
            letters.push(DeadLetter::of(&message.delivery, Utc::now()));
        }
        let (Some(tag), n) = (last, letters.len()) else {
            return Ok(taken);
        };
        // The engine may be busy with a batch of results: it is waited for, not timed.
        let (done, stored) = oneshot::channel();
        engine
            .send(Input::DeadLetters { letters, done })
            .await
            .map_err(|_| Stop::Failed("the conductor is stopping".into()))?;
        if stored.await != Ok(true) {
            return Err(Stop::Failed(
                "the store did not take them; they stay in the queue".into(),
            ));
        }
        asked(
            channel.basic_ack(tag, BasicAckOptions { multiple: true }),
            |e| format!("acknowledging: {e}"),
        )
        .await?;
        taken += n;
        if n < BATCH {
            return Ok(taken);
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
            preview: "{}}".into(),
            body: Some("{}}".into()),
            body_cut: false,
        }
    }

    #[test]
    fn one_copy_each_the_newest_kept_and_cleared_up_to_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let added = store
            .write(|tx| {
                let ids = tx.insert_dead_letters(&[
                    (letter(0), "d0".to_owned()),
                    (letter(0), "d0".to_owned()),
                ])?;
                Ok((ids[0], ids[1]))
            })
            .unwrap();
        assert!(
            matches!(added, (Some(_), None)),
            "a redelivered letter is kept once: {added:?}"
        );

        store
            .write(|tx| {
                let letters: Vec<_> = (1..=DEAD_LETTERS_KEPT)
                    .map(|n| (letter(n), format!("d{n}")))
                    .collect();
                tx.insert_dead_letters(&letters).map(drop)
            })
            .unwrap();
        let (newest, counts) = store.dead_letters(None, 10_000).unwrap();
        assert_eq!(
            newest.len(),
            crate::store::MAX_LISTED,
            "one list is bounded"
        );
        assert!(
            newest.iter().all(|l| l.body.is_none()),
            "lists leave bodies out"
        );
        let all: Vec<DeadLetter> = (1..=newest[0].id)
            .filter_map(|id| store.dead_letter(id).unwrap())
            .rev()
            .collect();
        assert_eq!(
            all[0].body.as_deref(),
            Some("{}}"),
            "one letter comes with its body"
        );
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
        let newest = all[0].id;
        assert_eq!(store.write(|tx| tx.clear_dead_letters(None)).unwrap(), 100);
        // Numbers are never given again: an old `--clear-through` cannot reach new ones.
        store
            .write(|tx| tx.insert_dead_letters(&[(letter(0), "after".to_owned())]))
            .unwrap();
        let (after, _) = store.dead_letters(None, 1).unwrap();
        assert!(after[0].id > newest, "{} after {newest}", after[0].id);
    }
}
