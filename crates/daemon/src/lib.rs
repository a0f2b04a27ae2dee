//! What every convoy daemon shares, so each daemon's `main` is a few lines.
//!
//! # Layout
//!
//! - [`settings`]: layered configuration — built-in defaults < `/etc/convoy/<daemon>.toml`
//!   (or `--config`) < `CONVOY_<KEY>` environment variables < `--set key=value` flags. An
//!   unknown key or a bad value is an error that names the key.
//! - [`logging`]: `tracing` to journald under systemd, human-readable on a terminal.
//! - [`lifecycle`]: SIGTERM/SIGINT → graceful shutdown with a deadline, SIGHUP → reload,
//!   `sd_notify` READY / RELOADING / STOPPING / WATCHDOG.
#![forbid(unsafe_code)]

pub mod lifecycle;
pub mod logging;
pub mod settings;

pub use lifecycle::Lifecycle;
pub use settings::{ConfigArgs, ConfigError, load};
