//! Errors an operator can act on.

use std::time::Duration;

/// Failures reaching or talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid amqp_url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid exchange name {0:?}: it must be 1 to 200 printable characters")]
    BadExchange(String),
    #[error("cannot read bus.tls_ca_file {path}: {source}")]
    TlsCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("could not connect to {url} within {timeout:?} (is the broker running and reachable?)")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("could not connect to {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("{context}: {source}")]
    Amqp {
        context: String,
        source: lapin::Error,
    },
    #[error("the broker cancelled the consumer on queue {0} (queue deleted, or node restarting)")]
    ConsumerCancelled(String),
    #[error("could not dead-letter message {id}; it goes back to its queue: {reason}")]
    DeadLetter { id: uuid::Uuid, reason: String },
    #[error("shutting down")]
    Cancelled,
}

impl BusError {
    /// The configuration's fault (the URL, the exchange name, the CA file): retrying will
    /// not help, so a daemon exits with EX_CONFIG (78), which its unit does not restart.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::BadUrl { .. } | Self::BadExchange(_) | Self::TlsCa { .. }
        )
    }

    pub(crate) fn amqp(context: impl Into<String>) -> impl FnOnce(lapin::Error) -> BusError {
        let context = context.into();
        move |source| BusError::Amqp { context, source }
    }
}

/// Why a publish did not count as sent.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "no queue is bound to routing key {routing_key:?} on exchange {exchange:?}; the message was returned (run `convoy bus setup`, or start the consumer that declares the queue)"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker refused (nacked) the message for {routing_key:?}")]
    Nacked { routing_key: String },
    #[error(
        "the broker did not confirm the message for {routing_key:?} within {timeout:?} (broker blocked by a resource alarm, or the connection is dead)"
    )]
    ConfirmTimeout {
        routing_key: String,
        timeout: Duration,
    },
    #[error("{0}")]
    Bus(#[from] BusError),
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp {
        attempts: u32,
        last: Box<PublishError>,
    },
    #[error("cannot encode the message: {0}")]
    Encode(#[from] convoy_message::Rejection),
    #[error("shutting down before the message was confirmed")]
    Cancelled,
}
