//! [`Bus`]: the daemon's one connection to the broker, shared by its publishers and
//! consumers, re-established with backoff whenever it dies.
//!
//! lapin's automatic recovery is deliberately not enabled: after a broker restart it is
//! reported to leave channels broken (lapin #450, #434) and `connect` can hang while the
//! broker boots (#468). Instead every user asks [`Bus::connection`] for a live connection,
//! every attempt is bounded by `connect_timeout_ms`, and the users (consumer loops,
//! publisher retries) own what to re-declare and re-send.

use crate::backoff::Backoff;
use crate::config::BusConfig;
use crate::error::BusError;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connect, Connection, ConnectionProperties};
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// A cheap handle (clone it freely) to the shared, reconnecting connection.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    config: BusConfig,
    uri: AMQPUri,
    tls: Option<String>,
    name: String,
    current: Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("url", &self.inner.config.redacted_url())
            .field("exchange", &self.inner.config.exchange)
            .finish()
    }
}

impl Bus {
    /// Validates the configuration; connects lazily on first use. `name` shows in the
    /// broker's connection list (e.g. `convoy-agent@web1`).
    pub fn new(config: BusConfig, name: impl Into<String>) -> Result<Self, BusError> {
        let bad_url = |reason: String| BusError::BadUrl {
            url: config.redacted_url(),
            reason,
        };
        let mut uri: AMQPUri = config.amqp_url.parse().map_err(bad_url)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(config.tuning.heartbeat_s);
        }
        if uri.query.frame_max.is_none() {
            // RabbitMQ refuses frames under 4096 bytes.
            uri.query.frame_max = Some(config.tuning.frame_max.max(4096));
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(config.tuning.connect_timeout_ms);
        }
        let ex = &config.exchange;
        if ex.is_empty() || ex.len() > 200 || ex.chars().any(|c| c.is_control() || c == ' ') {
            return Err(BusError::BadExchange(ex.clone()));
        }
        let tls = match &config.tuning.tls_ca_file {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| BusError::TlsCa {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                uri,
                tls,
                name: name.into(),
                current: Mutex::new(None),
            }),
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    pub fn exchange(&self) -> &str {
        &self.inner.config.exchange
    }

    /// The live connection, connecting once if there is none. One bounded attempt: callers
    /// that must not give up use [`Bus::connection_retrying`].
    pub async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        let mut current = self.inner.current.lock().await;
        if let Some(conn) = current.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        if let Some(dead) = current.take() {
            tracing::debug!(
                errored = dead.status().errored(),
                "dropping dead connection"
            );
        }
        let conn = Arc::new(self.connect_once().await?);
        tracing::info!(url = %self.inner.config.redacted_url(), "connected to the broker");
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// The live connection, retrying with backoff until connected or cancelled.
    pub async fn connection_retrying(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Arc<Connection>, BusError> {
        let mut backoff = Backoff::new(self.inner.config.max_backoff());
        loop {
            match self.connection().await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "broker unreachable");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(BusError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Forgets `conn` if it is still the current connection, so the next user reconnects.
    /// Used when a channel operation on it failed or timed out.
    pub async fn discard(&self, conn: &Arc<Connection>) {
        let mut current = self.inner.current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *current = None;
        }
    }

    /// Closes the connection politely (on shutdown).
    pub async fn close(&self) {
        if let Some(conn) = self.inner.current.lock().await.take()
            && conn.status().connected()
        {
            let _ = conn.close(200, "convoy shutting down".into()).await;
        }
    }

    async fn connect_once(&self) -> Result<Connection, BusError> {
        let url = self.inner.config.redacted_url();
        let props = ConnectionProperties::default()
            .with_connection_name(self.inner.name.clone().into())
            .with_client_property("product".into(), "convoy".into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.inner.tls.clone(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|source| BusError::Connect {
            url: url.clone(),
            source,
        })?;
        let timeout = self.inner.config.connect_timeout();
        let attempt = self
            .inner
            .uri
            .clone()
            .connect_with_config(props, tls, runtime);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(source)) => Err(BusError::Connect { url, source }),
            Err(_) => Err(BusError::ConnectTimeout { url, timeout }),
        }
    }
}
