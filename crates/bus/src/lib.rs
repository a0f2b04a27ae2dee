//! convoy's one careful AMQP client. Daemons stay thin because this crate owns the hard
//! part: nothing published is lost, nothing consumed is processed twice, nothing malformed
//! is silently dropped.
//!
//! # Layout
//!
//! - [`config`]: the broker URI, the exchange and the tuning knobs every daemon shares.
//! - [`connection`]: [`Bus`], one shared connection that reconnects with backoff. lapin's own
//!   recovery is not used (it is unreliable after a broker restart, lapin #450).
//! - [`topology`]: the durable topic exchange, the dead-letter exchange and queue, and the
//!   quorum queues each daemon declares for itself.
//! - [`publish`]: [`Publisher`], confirm-mode publishing with `mandatory`; an unroutable,
//!   nacked or unconfirmed message is an error, retried until confirmed or out of time.
//! - [`consume`]: [`Consumer`], manual acks, bounded prefetch, de-duplication by message id,
//!   dead-lettering with the reason in headers, and a loop that survives broker restarts.
//! - [`dedup`]: the bounded set of recently processed ids.
//! - [`permissions`]: the narrowest broker permissions of each role (`convoy bus setup`).
//! - [`backoff`]: the retry schedule shared by all of the above.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod connection;
pub mod consume;
pub mod dedup;
pub mod error;
pub mod permissions;
pub mod publish;
pub mod topology;

pub use config::{BusConfig, BusTuning, DEFAULT_AMQP_URL, DEFAULT_EXCHANGE};
pub use connection::Bus;
pub use consume::{Consumer, Disposition, Handler, Incoming};
pub use error::{BusError, PublishError};
pub use publish::{Outgoing, Publisher, Retry};
pub use topology::QueueSpec;
