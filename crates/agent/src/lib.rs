//! convoy-agent: executes signed deploy, rollback, switch and inventory commands addressed
//! to its own host, one app at a time, and reports progress and results.
//!
//! # Layout
//!
//! - [`config`]: `/etc/convoy/agent.toml` — apps, their roots, hooks, health checks.
//! - [`agent`]: the command-queue handler: verify, journal, ack, execute; recovery on start.
//! - [`journal`]: the on-disk record of every command, its progress and its result.
//! - [`execute`]: the steps of a deploy and the convergence after a crash.
//! - [`export`]: the signed commit out of the host's own git mirror.
//! - [`ownership`]: handing a new release (and the shared dirs it needs) to the app's user.
//! - [`hooks`], [`health`]: running the app's hooks and health checks.
//! - [`outbox`]: ordered, confirmed publication of progress and results.
//! - [`fault`]: fault injection for the crash tests.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod execute;
pub mod export;
pub mod fault;
pub mod health;
pub mod hooks;
pub mod journal;
pub mod outbox;
pub mod ownership;

pub use agent::Agent;
pub use config::AgentConfig;
