//! convoy-conductor: rollouts batch by batch as agents acknowledge, stages, gates and
//! pipelines, persisted in SQLite, with an HTTP API and a live event stream.
//!
//! # Layout
//!
//! - [`config`]: `/etc/convoy/conductor.toml` — apps, stages, strategies, gates, tokens.
//! - [`plan`]: batch plans (`[1, "10%", "100%"]`, `serial`) and failure budgets.
//! - [`rollout`]: the rollout state machine, pure and serialisable — the one place that
//!   decides which host gets a command when.
//! - [`pipeline`]: pipelines through stages, and gates (`auto`, `manual`, `tests`, and the
//!   [`pipeline::GateCheck`] interface further checks implement).
//! - [`store`]: the SQLite store every change is written to before it is acted on.
//! - [`backup`]: a checked copy of the store taken while the conductor runs
//!   (`convoy-conductor backup DEST`).
//! - [`engine`]: the task that owns the store and the unfinished rollouts and pipelines and
//!   handles one input at a time.
//! - [`intake`]: the bus queues the conductor consumes.
//! - [`dead`]: the dead-letter keeper, moving what consumers refused into the store.
//! - [`fleet`]: hosts alive / stale / gone, from heartbeats.
//! - [`api`]: the HTTP JSON API, SSE events, health and metrics.
//! - [`web`]: the operators' pages (dashboard, deploy, rollouts, history, audit) and their
//!   login sessions.
#![forbid(unsafe_code)]

pub mod api;
pub mod backup;
pub mod config;
pub mod dead;
pub mod engine;
pub mod fleet;
pub mod intake;
pub mod pipeline;
pub mod plan;
pub mod rollout;
pub mod store;
pub mod web;
