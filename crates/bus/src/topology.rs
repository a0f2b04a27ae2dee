//! The broker objects convoy uses. Declarations are idempotent and repeated on every
//! (re)connection, so a broker that lost its definitions gets them back.
//!
//! - the exchange (`CONVOY_EXCHANGE`, default `convoy`): durable, topic;
//! - the dead-letter exchange `<exchange>.dead` (durable, fanout) and queue `<exchange>.dead`
//!   (durable quorum), where refused messages wait with `x-convoy-reason` headers;
//! - one durable quorum queue per consumer role, bound to the keys it needs, with no TTL and
//!   no expiry: a host that is down finds its commands waiting;
//! - except the conductor's progress queue `<exchange>.progress`: a durable *classic* queue,
//!   bounded, taking transient messages (see [`QueueSpec::live`]) — progress only feeds the
//!   live view, and a quorum queue's Raft commit per event slowed the results behind it.
//!
//! The shared objects (both exchanges and the dead-letter queue) are first checked
//! passively ([`shared_channel`]), which needs no permission, and declared only when
//! missing. So a daemon whose broker user may not configure them (see
//! [`crate::permissions`] and `convoy bus setup`) starts as long as they exist, and cannot
//! delete or redefine them.
//!
//! The queue of every consumer role is defined here once ([`QueueSpec::commands`],
//! [`QueueSpec::fetcher`], [`QueueSpec::ci`], [`QueueSpec::conductor_events`],
//! [`QueueSpec::conductor_progress`], [`QueueSpec::conductor_heartbeats`]), so the daemons and `convoy bus setup` declare them
//! with the same arguments.

use crate::error::BusError;
use convoy_message::names::{HostName, Name};
use convoy_message::routing::{self, queue};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

/// A queue a consumer reads, with the routing keys bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    /// Topic binding keys on the main exchange.
    pub bindings: Vec<String>,
    /// Only one consumer receives at a time; the others wait as hot standbys.
    pub single_active_consumer: bool,
    /// Keep at most this many messages, dropping the oldest (heartbeats, progress).
    pub max_length: Option<u32>,
    /// A classic queue for transient messages nobody needs after a broker restart (the
    /// live progress view): no Raft round and no fsync per message. Everything else is a
    /// quorum queue.
    pub live: bool,
    /// Bindings earlier versions made that this one must not have: removed on declare.
    pub retired_bindings: Vec<String>,
    /// The dead-letter queue: nothing lies beyond it, so its delivery limit is as high as
    /// it goes ([`DEAD_QUEUE_DELIVERY_LIMIT`]).
    pub sink: bool,
}

impl QueueSpec {
    pub fn new(name: impl Into<String>, bindings: Vec<String>) -> Self {
        Self {
            name: name.into(),
            bindings,
            single_active_consumer: false,
            max_length: None,
            live: false,
            retired_bindings: Vec::new(),
            sink: false,
        }
    }

    /// The dead-letter queue `<exchange>.dead`, bound (by `""`) to the fanout dead-letter
    /// exchange.
    pub fn dead(exchange: &str) -> Self {
        Self {
            sink: true,
            ..Self::new(queue::dead(exchange), vec!["".into()])
        }
    }

    /// A host's command queue: `cmd.<host>`, single active consumer.
    pub fn commands(exchange: &str, host: &HostName) -> Self {
        Self {
            single_active_consumer: true,
            ..Self::new(
                queue::commands(exchange, host),
                vec![convoy_message::routing::command(host)],
            )
        }
    }

    /// A host's fetcher queue, bound to the push keys of the repos it mirrors.
    pub fn fetcher<'a>(
        exchange: &str,
        host: &HostName,
        repos: impl IntoIterator<Item = &'a Name>,
    ) -> Self {
        Self::new(
            queue::fetcher(exchange, host),
            repos
                .into_iter()
                .map(convoy_message::routing::push)
                .collect(),
        )
    }

    /// The CI bridge's queue: every push.
    pub fn ci(exchange: &str) -> Self {
        Self::new(queue::ci(exchange), vec!["push.#".into()])
    }

    /// The conductor's event queue: pushes, builds, fetch reports, results and inventories.
    /// (Up to 0.1 it took progress too, by `deploy.#`: that binding is removed.)
    pub fn conductor_events(exchange: &str) -> Self {
        Self {
            retired_bindings: vec!["deploy.#".into()],
            ..Self::new(
                queue::conductor(exchange),
                [
                    "push.#",
                    "build.#",
                    "fetch.#",
                    routing::RESULTS,
                    "inventory.#",
                ]
                .map(String::from)
                .to_vec(),
            )
        }
    }

    /// The conductor's progress queue: live (classic, transient messages), bounded. Progress
    /// only feeds the live view, and on the durable event queue each event cost a Raft
    /// commit: ten agents' progress delayed a batch's results by tens of milliseconds.
    pub fn conductor_progress(exchange: &str) -> Self {
        Self {
            live: true,
            max_length: Some(PROGRESS_QUEUE_MAX),
            ..Self::new(queue::progress(exchange), routing::progress_bindings())
        }
    }

    /// The conductor's heartbeat queue: bounded, dropping the oldest (only the newest
    /// heartbeat of a host matters).
    pub fn conductor_heartbeats(exchange: &str) -> Self {
        Self {
            max_length: Some(HEARTBEAT_QUEUE_MAX),
            ..Self::new(queue::heartbeats(exchange), vec!["heartbeat.#".into()])
        }
    }

    fn arguments(&self, dead_letter_exchange: Option<&str>) -> FieldTable {
        let mut args = FieldTable::default();
        let kind = if self.live { "classic" } else { "quorum" };
        args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        if self.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        if let (None, false, Some(dlx)) = (self.max_length, self.live, dead_letter_exchange) {
            // Set explicitly (RabbitMQ 4 defaults quorum queues to 20 and drops beyond it):
            // far above the consumer's own poison check, with the dead-letter exchange as
            // the net, so nothing is dropped silently.
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(1000));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.into()),
            );
        }
        if self.sink {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(DEAD_QUEUE_DELIVERY_LIMIT),
            );
        }
        if let Some(max) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongInt(max.min(i32::MAX as u32) as i32),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("drop-head".into()),
            );
        }
        args
    }
}

/// The dead-letter queue's delivery limit: as high as it goes. Nothing lies beyond that
/// queue, and RabbitMQ 4 otherwise limits a quorum queue to 20 deliveries and then drops
/// the message: a letter the conductor failed to store 20 times (a full disk, a crash
/// loop) would be lost. (RabbitMQ 3 has no limit unless one is set.)
pub const DEAD_QUEUE_DELIVERY_LIMIT: i32 = i32::MAX;

/// Heartbeats kept waiting at most in the conductor's heartbeat queue.
pub const HEARTBEAT_QUEUE_MAX: u32 = 200_000;

/// Progress events kept waiting at most in the conductor's progress queue.
pub const PROGRESS_QUEUE_MAX: u32 = 20_000;

/// The dead-letter exchange's name for a given main exchange.
pub fn dead_exchange(exchange: &str) -> String {
    format!("{exchange}.dead")
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// A new channel on `conn`, once the exchanges — and the dead-letter queue too, for
/// consumers (`with_dead_queue`) — exist. They are checked passively on that very channel
/// (no permission needed, and no more round trips than declaring them); only when one is
/// missing (the broker then closes the channel) are they declared, on a channel of their
/// own, and a fresh channel returned. So users without `configure` permission on the shared
/// objects need none once `convoy bus setup` made them.
pub async fn shared_channel(
    conn: &Connection,
    exchange: &str,
    with_dead_queue: bool,
) -> Result<Channel, BusError> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(BusError::amqp("opening a channel"))
    };
    let channel = open().await?;
    if shared_exist(&channel, exchange, with_dead_queue).await {
        return Ok(channel);
    }
    drop(channel);
    let declaring = open().await?;
    declare_exchanges(&declaring, exchange).await?;
    let _ = declaring.close(200, "declared".into()).await;
    if with_dead_queue {
        // One an earlier version made (other arguments) is kept as it is.
        declare_dead_queue_or_keep(conn, exchange).await?;
    }
    tracing::info!(
        %exchange,
        "declared the exchanges{} (missing: the broker's NOT_FOUND just logged answered the check)",
        if with_dead_queue { " and the dead-letter queue" } else { "" }
    );
    open().await
}

/// Whether the shared objects exist, asked passively on `channel` (no permission needed);
/// a missing one closes the channel.
async fn shared_exist(channel: &Channel, exchange: &str, with_dead_queue: bool) -> bool {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let dead = dead_exchange(exchange);
    let exchanges = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok()
        && channel
            .exchange_declare(
                dead.as_str().into(),
                ExchangeKind::Fanout,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
    if !exchanges || !with_dead_queue {
        return exchanges;
    }
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            queue::dead(exchange).as_str().into(),
            options,
            FieldTable::default(),
        )
        .await
        .is_ok()
}

/// Declares the main exchange and the dead-letter exchange (cheap: what publishers need).
pub async fn declare_exchanges(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("declaring exchange {exchange}")))?;
    let dead = dead_exchange(exchange);
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(BusError::amqp(format!("declaring exchange {dead}")))?;
    Ok(())
}

/// Declares the dead-letter queue and binds it to the dead-letter exchange. Consumers do
/// this (a quorum queue declaration costs a round of consensus, too much for every
/// short-lived publisher such as the git hook).
pub async fn declare_dead_queue(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    let spec = QueueSpec::dead(exchange);
    declare_queue_on(
        channel,
        &dead_exchange(exchange),
        &spec,
        &spec.bindings,
        None,
    )
    .await
}

/// How the dead-letter queue stands after [`declare_dead_queue_or_keep`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadQueue {
    /// Declared with its delivery limit as an argument (new, or made so before).
    Limited,
    /// It existed with other arguments — made by a convoy before the limit — and was kept
    /// as it is (a queue's arguments cannot change): the limit must come from a policy.
    Older,
}

/// Declares the dead-letter queue like [`declare_dead_queue`], but keeps one an earlier
/// version made with other arguments (the broker answers PRECONDITION_FAILED) instead of
/// failing. For `convoy bus setup`, which declares everything; the daemons only check it.
pub async fn declare_dead_queue_or_keep(
    conn: &Connection,
    exchange: &str,
) -> Result<DeadQueue, BusError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(BusError::amqp("opening a channel"))?;
    match declare_dead_queue(&channel, exchange).await {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(DeadQueue::Limited)
        }
        Err(BusError::Amqp { source, .. }) if is_precondition_failed(&source) => {
            let channel = conn
                .create_channel()
                .await
                .map_err(BusError::amqp("opening a channel"))?;
            let name = queue::dead(exchange);
            channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(BusError::amqp(format!("checking queue {name}")))?;
            channel
                .queue_bind(
                    name.as_str().into(),
                    dead_exchange(exchange).as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BusError::amqp(format!("binding queue {name}")))?;
            let _ = channel.close(200, "checked".into()).await;
            Ok(DeadQueue::Older)
        }
        Err(e) => Err(e),
    }
}

/// The broker refused a declaration because the object exists with other properties.
fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 406)
}

/// Declares a consumer's queue and binds its keys on the main exchange.
pub async fn declare_queue(
    channel: &Channel,
    exchange: &str,
    spec: &QueueSpec,
) -> Result<(), BusError> {
    let dlx = dead_exchange(exchange);
    declare_queue_on(channel, exchange, spec, &spec.bindings, Some(&dlx)).await
}

async fn declare_queue_on(
    channel: &Channel,
    exchange: &str,
    spec: &QueueSpec,
    bindings: &[String],
    dead_letter_exchange: Option<&str>,
) -> Result<(), BusError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(spec.name.as_str().into(), options, spec.arguments(dead_letter_exchange))
        .await
        .map_err(BusError::amqp(format!(
            "declaring queue {} (if it exists with other arguments, delete it or run `convoy bus setup`)",
            spec.name
        )))?;
    for key in bindings {
        channel
            .queue_bind(
                spec.name.as_str().into(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp(format!(
                "binding {key:?} to queue {}",
                spec.name
            )))?;
    }
    for key in &spec.retired_bindings {
        // Unbinding what is not bound is not an error for RabbitMQ.
        channel
            .queue_unbind(
                spec.name.as_str().into(),
                exchange.into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp(format!(
                "removing the old binding {key:?} from queue {}",
                spec.name
            )))?;
    }
    Ok(())
}
