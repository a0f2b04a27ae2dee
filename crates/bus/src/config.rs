//! What a daemon needs to reach the bus.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The broker every daemon and the CLI use unless `CONVOY_AMQP_URL` says otherwise.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The exchange every daemon and the CLI use unless `CONVOY_EXCHANGE` says otherwise.
pub const DEFAULT_EXCHANGE: &str = "convoy";

/// The broker, the exchange, and the tuning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusConfig {
    /// `amqp://user:pass@host:port/vhost` or `amqps://…` for TLS.
    pub amqp_url: String,
    /// The durable topic exchange; queue names are prefixed with it.
    pub exchange: String,
    pub tuning: BusTuning,
}

/// Timeouts and limits. The `[bus]` table of every daemon's config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusTuning {
    /// AMQP heartbeat: a silent network cut is noticed within about twice this.
    pub heartbeat_s: u16,
    /// How long one connection attempt may take (a booting broker can hang a connect).
    pub connect_timeout_ms: u64,
    /// How long to wait for the broker to confirm one publish.
    pub confirm_timeout_ms: u64,
    /// Unacked deliveries a consumer holds at most.
    pub prefetch: u16,
    /// The longest pause between two reconnection attempts.
    pub max_backoff_ms: u64,
    /// The largest AMQP frame (a bigger message travels in several). lapin keeps 32
    /// frames of buffer each way, resident once traffic has gone round them, so this sets
    /// a daemon's memory: 4 KiB (AMQP's minimum, the default) → 256 KiB, 16 KiB → 1 MiB.
    pub frame_max: u32,
    /// A PEM file of CA certificates for `amqps://` brokers with a private CA.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for BusTuning {
    fn default() -> Self {
        Self {
            heartbeat_s: 30,
            connect_timeout_ms: 5_000,
            confirm_timeout_ms: 5_000,
            prefetch: 32,
            max_backoff_ms: 5_000,
            frame_max: 4_096,
            tls_ca_file: None,
        }
    }
}

impl BusConfig {
    pub fn new(amqp_url: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            exchange: exchange.into(),
            tuning: BusTuning::default(),
        }
    }

    /// The bus part of a daemon's config: its `amqp_url`, `exchange` and `[bus]` table.
    pub fn from_settings(amqp_url: &str, exchange: &str, tuning: &BusTuning) -> Self {
        Self {
            amqp_url: amqp_url.to_owned(),
            exchange: exchange.to_owned(),
            tuning: tuning.clone(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.tuning.connect_timeout_ms)
    }

    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_millis(self.tuning.confirm_timeout_ms)
    }

    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.tuning.max_backoff_ms)
    }

    /// The URL with its password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.amqp_url)
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self::new(DEFAULT_AMQP_URL, DEFAULT_EXCHANGE)
    }
}

/// Hides the password of `scheme://user:password@host…`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            super::redact("amqp://agent:s3cret@mq:5672/%2f"),
            "amqp://agent:***@mq:5672/%2f"
        );
        assert_eq!(super::redact("amqp://mq/%2f"), "amqp://mq/%2f");
    }
}
