//! convoy's wire format: everything that crosses the bus, and nothing that moves it.
//!
//! # Layout
//!
//! - [`envelope`]: the versioned JSON envelope (`v`, `id`, `kind`, `at`, `from`, `body`),
//!   encoding and the strict decoder that turns bytes from the network into a [`Message`].
//! - [`body`]: the typed bodies, one per kind: push, build, fetch, command, progress,
//!   result, inventory, heartbeat.
//! - [`command`]: what the conductor orders a host to do, and its signed form.
//! - [`signing`]: ed25519 keys, key files, the trust set and command verification.
//! - [`names`]: validation of every name that ends up in a path, a routing key or a git call.
//! - [`routing`]: the one list of routing keys and queue names.
//! - [`rejection`]: why a message was refused, as it is written on the dead-letter queue.
//!
//! Every serialisable type here is an interface between daemons that may run different
//! versions: add optional fields freely, never rename or repurpose one.
#![forbid(unsafe_code)]

pub mod body;
pub mod command;
pub mod envelope;
pub mod names;
pub mod rejection;
pub mod routing;
pub mod signing;

pub use body::{
    AppRelease, BuildEvent, BuildStatus, CommitSummary, DeployOutcome, DeployProgress,
    DeployResult, FetchReport, FetchStatus, Heartbeat, InventoryReport, PushChange, PushEvent,
    RefKind, Step, StepReport, StepState,
};
pub use command::{Action, Command, DeploySpec, SignedCommand};
pub use envelope::{Body, MAX_MESSAGE_BYTES, Message, VERSION};
pub use rejection::{Rejection, RejectionCode};
pub use signing::{CommandVerifier, KeyPair, TrustSet};
