//! [`Bus`]: the daemon's one connection to the broker, shared by its publishers and
//! consumers, re-established with backoff whenever it dies.
//!
//! lapin's automatic recovery is deliberately not enabled: after a broker restart it is
//! reported to leave channels broken (lapin #450, #434) and `connect` can hang while the
//! broker boots (#468). Instead every user asks [`Bus::connection`] for a live connection,
//! every attempt is bounded by `connect_timeout_ms`, and the users (consumer loops,
//! publisher retries) own what to re-declare and re-send.
//!
//! lapin runs each connection's I/O on its own thread, which nothing outside it can stop
//! while the AMQP handshake is under way, and which keeps answering heartbeats for a
//! connection nobody reads any more. So [`Bus`] keeps a duplicate of every connection's
//! socket descriptor ([`Socket`]) and shuts the socket down itself when a connect times
//! out or a connection is discarded: a stalled broker costs no leaked sockets or threads,
//! and a consumer whose setup timed out cannot stay registered on a channel nobody reads,
//! holding deliveries unacknowledged.

use crate::backoff::Backoff;
use crate::config::BusConfig;
use crate::error::BusError;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
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
    current: Mutex<Option<Live>>,
}

/// The current connection and the means to cut it.
struct Live {
    conn: Arc<Connection>,
    socket: Arc<Socket>,
}

/// How long a discarded connection gets to close politely before its socket is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
        if let Some(live) = current.as_ref()
            && live.conn.status().connected()
        {
            return Ok(live.conn.clone());
        }
        if let Some(dead) = current.take() {
            tracing::debug!(
                errored = dead.conn.status().errored(),
                "dropping dead connection"
            );
            dead.socket.cut();
        }
        let live = self.connect_once().await?;
        tracing::info!(url = %self.inner.config.redacted_url(), "connected to the broker");
        let conn = live.conn.clone();
        *current = Some(live);
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

    /// Gives up on `conn` when an operation on it failed or timed out in a way that says
    /// the connection itself is unhealthy: the next user reconnects, and `conn` is closed
    /// (politely if the broker answers within [`CLOSE_GRACE`], else its socket is cut), so
    /// every channel and consumer still on it ends and the broker requeues what they held.
    pub async fn discard(&self, conn: &Arc<Connection>) {
        let mut current = self.inner.current.lock().await;
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(&c.conn, conn)) {
            return;
        }
        let Some(live) = current.take() else { return };
        drop(current);
        tracing::debug!("discarding the broker connection");
        // Callers are on an error path and go on to reconnect: they need not wait for this.
        tokio::spawn(async move {
            if live.conn.status().connected() {
                let close = live
                    .conn
                    .close(200, "convoy: connection stopped answering".into());
                let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
            }
            live.socket.cut();
        });
    }

    /// Closes the connection politely (on shutdown).
    pub async fn close(&self) {
        if let Some(live) = self.inner.current.lock().await.take() {
            if live.conn.status().connected() {
                let close = live.conn.close(200, "convoy shutting down".into());
                let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
            }
            live.socket.cut();
        }
    }

    async fn connect_once(&self) -> Result<Live, BusError> {
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
        let socket = Arc::new(Socket::default());
        let keep = socket.clone();
        // What lapin's own `connect_with_config` does, but keeping the socket's descriptor.
        let attempt = Connection::connector(
            self.inner.uri.clone(),
            runtime,
            async move |uri: AMQPUri, runtime| {
                let mut plain = uri.clone();
                plain.scheme = AMQPScheme::AMQP;
                let stream = plain
                    .connect_with_config_async(tls.as_ref(), &runtime)
                    .await?;
                if let AsyncTcpStream::Plain(tcp) = &stream {
                    keep.keep(tcp.get_ref().as_fd().try_clone_to_owned()?)?;
                }
                let stream = match uri.scheme {
                    AMQPScheme::AMQPS => stream.into_tls(&uri.authority.host, tls.as_ref()).await?,
                    AMQPScheme::AMQP => stream,
                };
                Ok(stream)
            },
            props,
        );
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(conn)) => Ok(Live {
                conn: Arc::new(conn),
                socket,
            }),
            Ok(Err(source)) => {
                socket.cut();
                Err(BusError::Connect { url, source })
            }
            Err(_) => {
                // lapin's I/O thread would go on waiting for the handshake: end it.
                socket.cut();
                Err(BusError::ConnectTimeout { url, timeout })
            }
        }
    }
}

/// A duplicate of a connection's socket descriptor. [`Socket::cut`] shuts the socket down,
/// which ends lapin's I/O loop for it (reads see end-of-file, writes fail) whatever state
/// it is in; the duplicate keeps the descriptor number from being reused under us.
#[derive(Default)]
struct Socket {
    fd: std::sync::Mutex<Option<OwnedFd>>,
    cut: AtomicBool,
}

impl Socket {
    /// Called from lapin's I/O thread once TCP is connected. Refuses (and cuts at once)
    /// when the attempt was already given up while the TCP connect was under way.
    fn keep(&self, fd: OwnedFd) -> std::io::Result<()> {
        let mut slot = self
            .fd
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.cut.load(Ordering::SeqCst) {
            shutdown(fd);
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        *slot = Some(fd);
        Ok(())
    }

    fn cut(&self) {
        let mut slot = self
            .fd
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.cut.store(true, Ordering::SeqCst);
        if let Some(fd) = slot.take() {
            shutdown(fd);
        }
    }
}

fn shutdown(fd: OwnedFd) {
    // NotConnected just means the broker or lapin closed it first.
    let _ = std::net::TcpStream::from(fd).shutdown(std::net::Shutdown::Both);
}
