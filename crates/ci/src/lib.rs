//! convoy-ci: the Jenkins bridge.
//!
//! # Layout
//!
//! - [`config`]: the configuration, `/etc/convoy/ci.toml`: Jenkins, job rules, notify.
//! - [`jenkins`]: the remote-access API calls (trigger, queue item, build, crumb).
//! - [`bridge`]: push events → durable triggers → followed builds → build events.
//! - [`notify`]: `convoy-ci notify` and `POST /notify` for jobs that report themselves.
#![forbid(unsafe_code)]

pub mod bridge;
pub mod config;
pub mod jenkins;
pub mod notify;
