//! Consuming: manual acks after the effect is durable, bounded prefetch, de-duplication by
//! message id, dead-lettering with the reason, and a loop that outlives the broker.
//!
//! The loop (re)connects with backoff, re-declares the exchange and its queue, sets the
//! prefetch, and consumes. When the channel or connection dies, unacked deliveries go back
//! to the queue and come again (`redelivered`); delivery tags of the dead channel are never
//! used again. Deliveries are handled one at a time, in queue order, unless the consumer is
//! made [`Consumer::concurrent`].

use crate::backoff::Backoff;
use crate::connection::Bus;
use crate::error::BusError;
use crate::publish::{Outgoing, Publisher, Retry};
use crate::topology::{self, QueueSpec};
use convoy_message::{Message, Rejection, RejectionCode};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A delivery that decoded into a valid envelope.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub message: Message,
    pub routing_key: String,
    /// The broker delivered it before (to this or another consumer) without an ack.
    pub redelivered: bool,
    /// The exact bytes received (for journals that republish them unchanged).
    pub raw: Vec<u8>,
}

/// What to do with a delivery once the handler is done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The effect is durable: acknowledge.
    Ack,
    /// Refuse it for good: copy it to the dead-letter queue with the reason, then ack.
    DeadLetter(Rejection),
    /// A transient failure (e.g. a disk or database busy): requeue after a pause.
    Retry,
}

/// What a consumer does with each message.
pub trait Handler: Send + Sync {
    fn handle(&self, incoming: Incoming) -> impl Future<Output = Disposition> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(Incoming) -> Fut + Send + Sync,
    Fut: Future<Output = Disposition> + Send,
{
    fn handle(&self, incoming: Incoming) -> impl Future<Output = Disposition> + Send {
        self(incoming)
    }
}

/// A message delivered this many times without an outcome is dead-lettered instead of
/// crashing its consumer forever.
pub const POISON_DELIVERIES: i64 = 200;

/// Dead-lettered copies keep at most this many bytes of the original body.
const DEAD_LETTER_MAX_BYTES: usize = 1024 * 1024;

/// Ids already processed, with a fingerprint of their bytes: the same id with the same bytes
/// is a duplicate; the same id with other bytes is a replay.
struct Seen {
    map: HashMap<Uuid, u64>,
    order: VecDeque<Uuid>,
    capacity: usize,
}

impl Seen {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, id: &Uuid) -> Option<u64> {
        self.map.get(id).copied()
    }

    fn insert(&mut self, id: Uuid, fingerprint: u64) {
        if self.map.insert(id, fingerprint).is_none() {
            self.order.push_back(id);
            if self.order.len() > self.capacity
                && let Some(old) = self.order.pop_front()
            {
                self.map.remove(&old);
            }
        }
    }
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A delivery admitted for its handler.
struct Work {
    delivery: Delivery,
    id: Uuid,
    print: u64,
    incoming: Incoming,
}

/// A delivery and what its handler decided.
struct Done {
    delivery: Delivery,
    id: Uuid,
    print: u64,
    disposition: Disposition,
}

impl Work {
    async fn run<H: Handler>(self, handler: &H) -> Done {
        let count = delivery_count(&self.delivery);
        let disposition = handler.handle(self.incoming).await;
        if disposition == Disposition::Retry {
            // Back off as the deliveries add up (1 s, 2 s, 4 s … 30 s): a transient fault
            // (disk full, database busy) is waited out rather than spun on.
            let count = count.clamp(0, 5) as u32;
            tokio::time::sleep(Duration::from_secs(2u64.pow(count).min(30))).await;
        }
        Done {
            delivery: self.delivery,
            id: self.id,
            print: self.print,
            disposition,
        }
    }
}

/// Consumes one queue until cancelled, surviving broker restarts.
pub struct Consumer {
    bus: Bus,
    spec: QueueSpec,
    dead: Publisher,
    seen: Option<Seen>,
    tag: String,
    /// Deliveries handled at once (1: one at a time, in queue order).
    concurrency: usize,
    /// Ids being handled now, with their fingerprint (de-duplicating consumers only).
    handling: HashMap<Uuid, u64>,
}

impl Consumer {
    /// A consumer of `spec`, de-duplicating the last 100,000 ids in memory.
    pub fn new(bus: Bus, spec: QueueSpec) -> Self {
        let tag = format!(
            "{}@{}-{}",
            spec.name,
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            dead: Publisher::new(bus.clone()),
            bus,
            spec,
            seen: Some(Seen::new(100_000)),
            tag,
            concurrency: 1,
            handling: HashMap::new(),
        }
    }

    /// Handles up to `n` deliveries at once (at most the prefetch). Outcomes may then come
    /// out of queue order; a handler that gathers work (the conductor's engine commits the
    /// results waiting together in one transaction) sees several at a time. An id already
    /// being handled is held back until the first outcome (same bytes: a duplicate).
    pub fn concurrent(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Hands duplicates to the handler too. For handlers that keep their own durable journal
    /// and must answer a repeated command (the agent).
    pub fn without_dedup(mut self) -> Self {
        self.seen = None;
        self
    }

    pub fn queue(&self) -> &QueueSpec {
        &self.spec
    }

    /// Runs until `cancel` fires. In-flight handling finishes first; prefetched but
    /// unhandled deliveries go back to the queue when the channel closes.
    pub async fn run<H: Handler>(
        mut self,
        handler: &H,
        cancel: CancellationToken,
    ) -> Result<(), BusError> {
        let mut backoff = Backoff::new(self.bus.config().max_backoff());
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            match self.session(handler, &cancel, &mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(queue = %self.spec.name, error = %e, retry_in = ?delay,
                        "consumer lost its channel; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Declares the exchanges and this consumer's queue (also done on every reconnect).
    pub async fn declare(&self) -> Result<(), BusError> {
        let conn = self.bus.connection().await?;
        let declare = async {
            let channel = topology::shared_channel(&conn, self.bus.exchange(), true).await?;
            topology::declare_queue(&channel, self.bus.exchange(), &self.spec).await?;
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        };
        let timeout = self.bus.config().connect_timeout();
        match tokio::time::timeout(timeout, declare).await {
            Ok(result) => result,
            Err(_) => {
                self.bus.discard(&conn).await;
                Err(BusError::ConnectTimeout {
                    url: self.bus.config().redacted_url(),
                    timeout,
                })
            }
        }
    }

    async fn session<H: Handler>(
        &mut self,
        handler: &H,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), BusError> {
        let conn = self.bus.connection().await?;
        let exchange = self.bus.exchange().to_owned();
        let prefetch = self.bus.config().tuning.prefetch;
        let setup = async {
            let channel = topology::shared_channel(&conn, &exchange, true).await?;
            topology::declare_queue(&channel, &exchange, &self.spec).await?;
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(BusError::amqp("setting the prefetch"))?;
            let consumer = channel
                .basic_consume(
                    self.spec.name.as_str().into(),
                    self.tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BusError::amqp(format!("consuming from {}", self.spec.name)))?;
            Ok::<_, BusError>((channel, consumer))
        };
        let (channel, mut consumer) =
            match tokio::time::timeout(self.bus.config().connect_timeout(), setup).await {
                Ok(Ok(pair)) => pair,
                // A refusal (missing queue, permissions) ends only the channel: the
                // connection stays for the daemon's other users.
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // It may have got as far as basic_consume: close the connection so no
                    // consumer stays registered on a channel nobody reads.
                    self.bus.discard(&conn).await;
                    return Err(BusError::ConnectTimeout {
                        url: self.bus.config().redacted_url(),
                        timeout: self.bus.config().connect_timeout(),
                    });
                }
            };
        backoff.reset();
        let liveness =
            Duration::from_secs(u64::from(self.bus.config().tuning.heartbeat_s.clamp(1, 30)));
        tracing::info!(queue = %self.spec.name, "consuming");
        let limit = self.concurrency.min(usize::from(prefetch.max(1)));
        // Whatever a dead channel had in hand comes again: it is not being handled now.
        self.handling.clear();
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        loop {
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    // What is being handled finishes (and is acked) before the channel closes.
                    while let Some(done) = inflight.next().await {
                        let _ = self.settle(done).await;
                    }
                    let stop = async {
                        let _ = channel.basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default()).await;
                        let _ = channel.close(200, "shutting down".into()).await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), stop).await;
                    return Ok(());
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    if let Err(e) = self.settle(done).await {
                        self.bus.discard(&conn).await;
                        return Err(e);
                    }
                    continue;
                }
                next = consumer.next(), if inflight.len() < limit => next,
                // A stream can outlive its connection without ending (seen after a broker
                // restart): check the channel now and then, and start over if it is dead.
                _ = tokio::time::sleep(liveness) => {
                    if channel.status().connected() && conn.status().connected() {
                        continue;
                    }
                    self.bus.discard(&conn).await;
                    return Err(BusError::ConsumerCancelled(self.spec.name.clone()));
                }
            };
            match next {
                None => return Err(BusError::ConsumerCancelled(self.spec.name.clone())),
                Some(Err(source)) => {
                    self.bus.discard(&conn).await;
                    return Err(BusError::Amqp {
                        context: format!("receiving from {}", self.spec.name),
                        source,
                    });
                }
                Some(Ok(delivery)) => {
                    let admitted = match self.admit(delivery).await {
                        Ok(admitted) => admitted,
                        Err(e) => {
                            self.bus.discard(&conn).await;
                            return Err(e);
                        }
                    };
                    let Some(work) = admitted else { continue };
                    if limit == 1 {
                        let done = work.run(handler).await;
                        if let Err(e) = self.settle(done).await {
                            self.bus.discard(&conn).await;
                            return Err(e);
                        }
                    } else {
                        inflight.push(work.run(handler));
                    }
                }
            }
        }
    }

    /// Checks a delivery before its handler sees it: undecodable, replayed, duplicate or
    /// poison deliveries are settled here (`None`); the rest are work for the handler.
    async fn admit(&mut self, delivery: Delivery) -> Result<Option<Work>, BusError> {
        let message = match Message::decode(&delivery.data) {
            Ok(m) => m,
            Err(rejection) => {
                return self
                    .dead_letter(&delivery, rejection, None)
                    .await
                    .map(|_| None);
            }
        };
        let print = fingerprint(&delivery.data);
        let known = self.seen.as_ref().and_then(|seen| seen.get(&message.id));
        let handling = self.handling.get(&message.id).copied();
        if let Some(known) = known.or(handling) {
            if known == print {
                tracing::debug!(id = %message.id, "duplicate delivery skipped");
                return ack(&delivery).await.map(|_| None);
            }
            let rejection = Rejection::new(
                RejectionCode::Replayed,
                format!("id {} was already used by a different message", message.id),
            );
            return self
                .dead_letter(&delivery, rejection, None)
                .await
                .map(|_| None);
        }
        if delivery_count(&delivery) >= POISON_DELIVERIES {
            let rejection = Rejection::new(
                RejectionCode::Unexpected,
                format!(
                    "delivered {POISON_DELIVERIES} times without an outcome (its consumer keeps failing on it)"
                ),
            );
            return self
                .dead_letter(&delivery, rejection, None)
                .await
                .map(|_| None);
        }
        let id = message.id;
        if self.seen.is_some() {
            self.handling.insert(id, print);
        }
        let incoming = Incoming {
            message,
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            raw: delivery.data.clone(),
        };
        Ok(Some(Work {
            delivery,
            id,
            print,
            incoming,
        }))
    }

    /// Acts on a handler's outcome: ack, dead-letter, or requeue.
    async fn settle(&mut self, done: Done) -> Result<(), BusError> {
        let Done {
            delivery,
            id,
            print,
            disposition,
        } = done;
        self.handling.remove(&id);
        match disposition {
            // The effect happened whether or not the ack reaches the broker: remember the id
            // first, so a redelivery after a lost ack is recognised.
            Disposition::Ack => {
                if let Some(seen) = &mut self.seen {
                    seen.insert(id, print);
                }
                ack(&delivery).await
            }
            Disposition::DeadLetter(rejection) => {
                self.dead_letter(&delivery, rejection, Some((id, print)))
                    .await
            }
            Disposition::Retry => {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map_err(BusError::amqp("requeueing a delivery"))?;
                Ok(())
            }
        }
    }

    /// Copies the delivery to the dead-letter exchange with the reason, then acks it.
    async fn dead_letter(
        &mut self,
        delivery: &Delivery,
        rejection: Rejection,
        remember: Option<(Uuid, u64)>,
    ) -> Result<(), BusError> {
        let props = &delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .and_then(|s| Uuid::parse_str(s.as_str()).ok())
            .unwrap_or_else(Uuid::new_v4);
        let kind = props
            .kind()
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_else(|| "unknown".to_owned());
        let mut payload = delivery.data.clone();
        let mut headers = vec![
            (
                "x-convoy-reason".to_owned(),
                rejection.code.as_str().to_owned(),
            ),
            (
                "x-convoy-detail".to_owned(),
                convoy_message::rejection::header_detail(&rejection.detail),
            ),
            ("x-convoy-queue".to_owned(), self.spec.name.clone()),
            (
                "x-convoy-routing-key".to_owned(),
                delivery.routing_key.to_string(),
            ),
            ("x-convoy-rejected-by".to_owned(), self.tag.clone()),
            (
                "x-convoy-rejected-at".to_owned(),
                chrono::Utc::now().to_rfc3339(),
            ),
        ];
        if payload.len() > DEAD_LETTER_MAX_BYTES {
            headers.push((
                "x-convoy-truncated-from".to_owned(),
                payload.len().to_string(),
            ));
            payload.truncate(DEAD_LETTER_MAX_BYTES);
        }
        let out = Outgoing {
            exchange: Some(topology::dead_exchange(self.bus.exchange())),
            routing_key: delivery.routing_key.to_string(),
            id,
            kind,
            payload,
            headers,
            transient: false,
        };
        let budget = self.bus.config().confirm_timeout() * 2;
        if let Err(e) = self.dead.publish(&out, Retry::within(budget)).await {
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            return Err(BusError::DeadLetter {
                id,
                reason: e.to_string(),
            });
        }
        tracing::warn!(queue = %self.spec.name, %id, reason = %rejection.code,
            detail = %rejection.detail, "message refused and dead-lettered");
        if let (Some(seen), Some((id, print))) = (&mut self.seen, remember) {
            seen.insert(id, print);
        }
        ack(delivery).await
    }
}

async fn ack(delivery: &Delivery) -> Result<(), BusError> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        delivery.ack(BasicAckOptions::default()),
    )
    .await
    {
        Ok(result) => result
            .map(|_| ())
            .map_err(BusError::amqp("acknowledging a delivery")),
        // The delivery comes again on a new channel; the consumer recognises it.
        Err(_) => Err(BusError::ConsumerCancelled("ack timed out".into())),
    }
}

/// The quorum queue's count of earlier deliveries (`x-delivery-count`), 0 if absent.
fn delivery_count(delivery: &Delivery) -> i64 {
    let Some(headers) = delivery.properties.headers() else {
        return 0;
    };
    match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        _ => 0,
    }
}
