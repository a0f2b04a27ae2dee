//! convoy-hook: where pushes enter convoy.
//!
//! # Layout
//!
//! - [`config`]: the configuration, `/etc/convoy/hook.toml`.
//! - [`event`]: `old new ref` lines → push events (created, updated, forced, deleted).
//! - [`spool`]: the on-disk queue of events the broker did not confirm in time.
//! - [`post_receive`]: the hook itself: publish within a budget, else spool; always exit 0.
//! - [`install`]: writing the hook into a bare repository, chaining an existing one.
//! - [`webhook`]: the GitHub / GitLab / Gitea receiver.
#![forbid(unsafe_code)]

pub mod config;
pub mod event;
pub mod install;
pub mod post_receive;
pub mod spool;
pub mod webhook;
