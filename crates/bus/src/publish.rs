//! Confirmed, mandatory publishing.
//!
//! A message counts as sent only when the broker confirmed it (`basic.ack`) and did not
//! return it as unroutable (lapin reports a return as `Confirmation::Ack(Some(_))`). Every
//! wait is bounded. The caller keeps the message until [`Publisher::publish`] returns, so a
//! publish interrupted by a broker restart is simply sent again on the next connection;
//! consumers de-duplicate by message id.

use crate::backoff::Backoff;
use crate::connection::Bus;
use crate::error::{BusError, PublishError};
use crate::topology;
use convoy_message::{Message, Rejection, routing};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A message ready to publish: its bytes, where it goes, and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Publish to this exchange instead of the main one (dead letters).
    pub exchange: Option<String>,
    pub routing_key: String,
    pub id: Uuid,
    pub kind: String,
    pub payload: Vec<u8>,
    /// Extra string headers (the dead-letter reason).
    pub headers: Vec<(String, String)>,
    /// Not written to disk by the broker (delivery mode 1): progress events, which ride
    /// the conductor's live queue. Everything else is persistent.
    pub transient: bool,
}

impl Outgoing {
    /// Encodes a message under its natural routing key (see [`routing::for_message`]).
    /// Commands have no natural key: use [`Outgoing::with_key`] and [`routing::command`].
    pub fn message(message: &Message) -> Result<Self, Rejection> {
        let key = routing::for_message(message).ok_or_else(|| {
            Rejection::new(
                convoy_message::RejectionCode::Unexpected,
                "commands are routed by host: use Outgoing::with_key",
            )
        })?;
        Self::with_key(message, key)
    }

    pub fn with_key(message: &Message, routing_key: impl Into<String>) -> Result<Self, Rejection> {
        Ok(Self {
            exchange: None,
            routing_key: routing_key.into(),
            id: message.id,
            kind: message.kind().to_owned(),
            payload: message.encode()?,
            headers: Vec::new(),
            transient: matches!(message.body, convoy_message::Body::Progress(_)),
        })
    }

    fn properties(&self) -> BasicProperties {
        let mut props = BasicProperties::default()
            .with_delivery_mode(if self.transient { 1 } else { 2 })
            .with_content_type("application/json".into())
            .with_message_id(self.id.to_string().into())
            .with_type(self.kind.as_str().into())
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
        if !self.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &self.headers {
                table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
            }
            props = props.with_headers(table);
        }
        props
    }
}

/// How long [`Publisher::publish`] keeps trying.
#[derive(Clone, Debug, Default)]
pub struct Retry {
    deadline: Option<Instant>,
    cancel: Option<CancellationToken>,
    once: bool,
}

impl Retry {
    /// One attempt (itself bounded by the connect and confirm timeouts).
    pub fn once() -> Self {
        Self {
            once: true,
            ..Self::default()
        }
    }

    /// Attempts until `budget` has passed; the last attempt is cut off at the deadline.
    pub fn within(budget: Duration) -> Self {
        Self {
            deadline: Some(Instant::now() + budget),
            ..Self::default()
        }
    }

    /// Attempts until confirmed or `cancel` fires (daemons shutting down).
    pub fn until_cancelled(cancel: CancellationToken) -> Self {
        Self {
            cancel: Some(cancel),
            ..Self::default()
        }
    }

    fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

struct Slot {
    conn: Arc<Connection>,
    channel: Channel,
}

/// Publishes in confirm mode on its own channel of the shared connection. Share it (it is
/// `Sync`): publishes from many tasks are pipelined, each awaiting its own confirm.
pub struct Publisher {
    bus: Bus,
    slot: Mutex<Option<Slot>>,
}

impl Publisher {
    pub fn new(bus: Bus) -> Self {
        Self {
            bus,
            slot: Mutex::new(None),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Publishes `out` and waits for the broker's confirm, retrying per `retry`.
    pub async fn publish(&self, out: &Outgoing, retry: Retry) -> Result<(), PublishError> {
        let mut backoff = Backoff::new(self.bus.config().max_backoff());
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = self.publish_once(out);
            let result = match retry.remaining() {
                Some(left) => match tokio::time::timeout(left, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(PublishError::ConfirmTimeout {
                        routing_key: out.routing_key.clone(),
                        timeout: left,
                    }),
                },
                None => match &retry.cancel {
                    Some(cancel) => tokio::select! {
                        r = attempt => r,
                        _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                    },
                    None => attempt.await,
                },
            };
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let delay = backoff.next_delay();
            let out_of_time = retry.remaining().is_some_and(|left| left <= delay);
            if retry.once || out_of_time {
                return Err(if attempts == 1 {
                    err
                } else {
                    PublishError::GaveUp {
                        attempts,
                        last: Box::new(err),
                    }
                });
            }
            tracing::warn!(
                error = %err, routing_key = %out.routing_key, id = %out.id, retry_in = ?delay,
                "publish not confirmed; will publish again"
            );
            match &retry.cancel {
                Some(cancel) => tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                },
                None => tokio::time::sleep(delay).await,
            }
        }
    }

    /// Publishes an event until confirmed or cancelled — unless nobody is bound to receive
    /// it: then it is dropped at once (`Ok(false)`) rather than retried, so it never holds
    /// up what comes after it. For events that matter only to a listener that exists
    /// (progress, fetch reports, build status before any conductor was ever started).
    pub async fn publish_event(
        &self,
        out: &Outgoing,
        cancel: &CancellationToken,
    ) -> Result<bool, PublishError> {
        let mut backoff = Backoff::new(self.bus.config().max_backoff());
        loop {
            match self.publish_once(out).await {
                Ok(()) => return Ok(true),
                Err(PublishError::Unroutable { routing_key, .. }) => {
                    tracing::debug!(%routing_key, "no queue bound for this event; dropped");
                    return Ok(false);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, routing_key = %out.routing_key, retry_in = ?delay,
                        "event not confirmed; will publish again");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                    }
                }
            }
        }
    }

    /// Publishes a message under its natural routing key until confirmed or cancelled.
    pub async fn send(
        &self,
        message: &Message,
        cancel: &CancellationToken,
    ) -> Result<(), PublishError> {
        let out = Outgoing::message(message)?;
        self.publish(&out, Retry::until_cancelled(cancel.clone()))
            .await
    }

    /// One attempt: get (or open) the confirm channel, publish, await the confirm.
    pub async fn publish_once(&self, out: &Outgoing) -> Result<(), PublishError> {
        let exchange = out.exchange.as_deref().unwrap_or(self.bus.exchange());
        let (conn, confirm) = {
            let mut slot = self.slot.lock().await;
            let s = match slot.take() {
                Some(s) if s.channel.status().connected() => s,
                _ => self.open().await?,
            };
            let s = slot.insert(s);
            let publish = s.channel.basic_publish(
                exchange.into(),
                out.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &out.payload,
                out.properties(),
            );
            match tokio::time::timeout(self.bus.config().confirm_timeout(), publish).await {
                Ok(Ok(confirm)) => (s.conn.clone(), confirm),
                Ok(Err(source)) => {
                    // The channel is closed; the next publish opens another (and
                    // reconnects if the connection went with it).
                    *slot = None;
                    return Err(BusError::Amqp {
                        context: format!("publishing to {exchange}/{}", out.routing_key),
                        source,
                    }
                    .into());
                }
                Err(_) => {
                    *slot = None;
                    return Err(PublishError::ConfirmTimeout {
                        routing_key: out.routing_key.clone(),
                        timeout: self.bus.config().confirm_timeout(),
                    });
                }
            }
        };
        let timeout = self.bus.config().confirm_timeout();
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: out.routing_key.clone(),
            }),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked {
                routing_key: out.routing_key.clone(),
            }),
            Ok(Ok(Confirmation::NotRequested)) => {
                self.reset(&conn, false).await;
                Err(PublishError::Nacked {
                    routing_key: out.routing_key.clone(),
                })
            }
            Ok(Err(source)) => {
                // Often another publish's timeout closed the shared channel: a blocked
                // broker is alive, keep its connection.
                self.reset(&conn, !conn.status().blocked()).await;
                Err(BusError::Amqp {
                    context: format!("awaiting confirm for {}", out.routing_key),
                    source,
                }
                .into())
            }
            Err(_) => {
                // A blocked broker (resource alarm) is alive: keep the connection. Anything
                // else that cannot confirm in time is treated as dead.
                self.reset(&conn, !conn.status().blocked()).await;
                Err(PublishError::ConfirmTimeout {
                    routing_key: out.routing_key.clone(),
                    timeout,
                })
            }
        }
    }

    async fn reset(&self, conn: &Arc<Connection>, discard_connection: bool) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(&s.conn, conn)) {
            *slot = None;
        }
        drop(slot);
        if discard_connection {
            self.bus.discard(conn).await;
        }
    }

    async fn open(&self) -> Result<Slot, BusError> {
        let conn = self.bus.connection().await?;
        let timeout = self.bus.config().connect_timeout();
        let exchange = self.bus.exchange().to_owned();
        let setup = async {
            let channel = topology::shared_channel(&conn, &exchange, false).await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(BusError::amqp("enabling publisher confirms"))?;
            Ok::<_, BusError>(channel)
        };
        match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(channel)) => Ok(Slot { conn, channel }),
            // A refused channel does not make the connection unhealthy.
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.bus.discard(&conn).await;
                Err(BusError::ConnectTimeout {
                    url: self.bus.config().redacted_url(),
                    timeout,
                })
            }
        }
    }
}
