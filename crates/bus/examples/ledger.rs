//! A consumer that records every processed message id in a ledger file before it acks —
//! the pattern every convoy consumer follows (effect durable, then ack) in its smallest form.
//! A successor started on the same ledger skips what its predecessor already recorded.
//!
//! ```sh
//! CONVOY_AMQP_URL=… CONVOY_EXCHANGE=… cargo run -p convoy-bus --example ledger -- QUEUE KEY LEDGER [DELAY_MS]
//! ```

use convoy_bus::{Bus, BusConfig, Consumer, Disposition, Incoming, QueueSpec};
use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

struct Ledger {
    file: Mutex<std::fs::File>,
    seen: Mutex<HashSet<String>>,
    delay: Duration,
}

impl convoy_bus::Handler for Ledger {
    async fn handle(&self, incoming: Incoming) -> Disposition {
        let id = incoming.message.id.to_string();
        if self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
        {
            return Disposition::Ack;
        }
        tokio::time::sleep(self.delay).await;
        let written = {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            file.write_all(format!("{id}\n").as_bytes())
                .and_then(|()| file.sync_data())
        };
        match written {
            Ok(()) => {
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                Disposition::Ack
            }
            Err(_) => Disposition::Retry,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [queue, key, ledger, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: ledger QUEUE KEY LEDGER [DELAY_MS]");
    };
    let delay = Duration::from_millis(rest.first().map_or(Ok(0), |d| d.parse())?);
    let config = BusConfig::new(
        std::env::var("CONVOY_AMQP_URL").unwrap_or_else(|_| convoy_bus::DEFAULT_AMQP_URL.into()),
        std::env::var("CONVOY_EXCHANGE").unwrap_or_else(|_| convoy_bus::DEFAULT_EXCHANGE.into()),
    );
    let seen: HashSet<String> = std::fs::read_to_string(ledger)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger)?;
    let handler = Ledger {
        file: Mutex::new(file),
        seen: Mutex::new(seen),
        delay,
    };
    let bus = Bus::new(config, "ledger")?;
    let consumer = Consumer::new(bus, QueueSpec::new(queue.clone(), vec![key.clone()]));
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
        }
    });
    consumer.run(&handler, cancel).await?;
    Ok(())
}
