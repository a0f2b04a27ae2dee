//! Isolation on the shared broker: each test gets its own exchange, so its queues (all
//! prefixed with the exchange name) never meet another test's.

use anyhow::Context;
use convoy_bus::BusConfig;
use convoy_message::Message;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A unique exchange on a broker, and the queues to delete when the test ends.
pub struct TestBus {
    pub url: String,
    pub exchange: String,
    queues: Arc<Mutex<Vec<String>>>,
}

impl TestBus {
    /// A fresh exchange on the shared broker.
    pub fn new() -> Self {
        Self::on(&crate::shared_amqp_url())
    }

    /// A fresh exchange on the broker at `url` (a private node).
    pub fn on(url: &str) -> Self {
        let exchange = crate::unique("t");
        let queues = vec![format!("{exchange}.dead")];
        Self {
            url: url.to_owned(),
            exchange,
            queues: Arc::new(Mutex::new(queues)),
        }
    }

    /// A bus config for this exchange with short timeouts fit for tests.
    pub fn config(&self) -> BusConfig {
        let mut c = BusConfig::new(&self.url, &self.exchange);
        c.tuning.connect_timeout_ms = 3_000;
        c.tuning.confirm_timeout_ms = 3_000;
        c.tuning.max_backoff_ms = 1_000;
        c.tuning.heartbeat_s = 5;
        c
    }

    /// Environment for a daemon process under test.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CONVOY_AMQP_URL".into(), self.url.clone()),
            ("CONVOY_EXCHANGE".into(), self.exchange.clone()),
        ]
    }

    /// Deletes `queue` when the test ends.
    pub fn track(&self, queue: impl Into<String>) {
        if let Ok(mut q) = self.queues.lock() {
            q.push(queue.into());
        }
    }

    /// A queue name under this exchange, tracked for deletion.
    pub fn queue(&self, suffix: &str) -> String {
        let name = format!("{}.{suffix}", self.exchange);
        self.track(name.clone());
        name
    }

    /// Opens a tap bound to `keys` on this exchange.
    pub async fn tap(&self, keys: &[&str]) -> anyhow::Result<Tap> {
        Tap::open(&self.url, &self.exchange, keys).await
    }

    /// Opens a tap on the dead-letter exchange.
    pub async fn dead_tap(&self) -> anyhow::Result<Tap> {
        Tap::open(&self.url, &format!("{}.dead", self.exchange), &[""]).await
    }
}

impl Default for TestBus {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        let n = queues.len();
        let url = self.url.clone();
        let exchange = self.exchange.clone();
        // Drop may run inside a runtime: clean up from a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let run = async {
                    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                    let ch = conn.create_channel().await?;
                    // Issued together: deleting a quorum queue takes a while, one after the
                    // other a hundred agents' queues did not fit the time limit and stayed
                    // behind on the shared broker, holding its file handles.
                    let deletes = queues
                        .iter()
                        .map(|q| ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()));
                    let _ = futures_util::future::join_all(deletes).await;
                    for ex in [exchange.clone(), format!("{exchange}.dead")] {
                        let _ = ch
                            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                    let _ = conn.close(200, "test done".into()).await;
                    Ok::<_, lapin::Error>(())
                };
                let limit = Duration::from_secs(5) + Duration::from_millis(100) * n as u32;
                let _ = tokio::time::timeout(limit, run).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A server-named, exclusive queue bound to some keys: sees every message published under
/// them from the moment it is open. Reads raw deliveries, independent of convoy's consumer.
pub struct Tap {
    _conn: Connection,
    consumer: lapin::Consumer,
}

/// One delivery seen by a tap.
#[derive(Clone, Debug)]
pub struct Tapped {
    pub routing_key: String,
    pub data: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub message_id: Option<String>,
}

impl Tapped {
    pub fn message(&self) -> anyhow::Result<Message> {
        Message::decode(&self.data).map_err(|r| anyhow::anyhow!("undecodable: {r}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Tap {
    pub async fn open(url: &str, exchange: &str, keys: &[&str]) -> anyhow::Result<Self> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("tap: connecting")?;
        let ch = conn.create_channel().await?;
        // The exchange may not exist yet: declare it as convoy does.
        let kind = if exchange.ends_with(".dead") {
            lapin::ExchangeKind::Fanout
        } else {
            lapin::ExchangeKind::Topic
        };
        ch.exchange_declare(
            exchange.into(),
            kind,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("tap: declaring exchange")?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for key in keys {
            ch.queue_bind(
                q.name().clone(),
                exchange.into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            _conn: conn,
            consumer,
        })
    }

    /// The next delivery, or an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Tapped> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .context("tap: nothing arrived in time")?
            .context("tap: consumer closed")??;
        delivery.ack(BasicAckOptions::default()).await?;
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            lapin::types::AMQPValue::LongString(s) => s.to_string(),
                            other => format!("{other:?}"),
                        };
                        (k.to_string(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Tapped {
            routing_key: delivery.routing_key.to_string(),
            data: delivery.data.clone(),
            headers,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
        })
    }

    /// Asserts nothing arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(window, self.consumer.next()).await {
            Err(_) => Ok(()),
            Ok(None) => Ok(()),
            Ok(Some(d)) => {
                let d = d?;
                anyhow::bail!(
                    "expected silence, got {} bytes on {}",
                    d.data.len(),
                    d.routing_key
                )
            }
        }
    }
}
