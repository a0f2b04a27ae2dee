//! Publish → confirm → consume on a real broker: the physical floor of every later figure.
//!
//! `cargo bench -p convoy-bus --bench roundtrip` (needs RabbitMQ on 127.0.0.1:5672, or
//! `CONVOY_TEST_AMQP_URL`). Method in docs/benchmarks.md.

use convoy_bus::{Bus, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, Message, PushChange, PushEvent, RefKind};
use convoy_testkit::TestBus;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn push(n: u64) -> Message {
    Message::new(
        "bench@here",
        Body::Push(PushEvent {
            repo: Name::new("web").unwrap(),
            git_ref: RefName::new("refs/heads/main").unwrap(),
            ref_kind: RefKind::Branch,
            old: Sha::new(format!("{n:040x}")).unwrap(),
            new: Sha::new(format!("{:040x}", n + 1)).unwrap(),
            change: PushChange::Updated,
            commits: vec![],
            truncated: false,
            pusher: None,
        }),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let warmup = 200u64;
    let samples = 2_000u64;
    let idle_samples = 300u64;
    let bulk = 20_000u64;
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "bench")?;
    let consumer = Consumer::new(
        bus.clone(),
        QueueSpec::new(tb.queue("bench"), vec!["push.#".into()]),
    );
    consumer.declare().await?;
    let sent: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let handler = move |incoming: Incoming| {
        let _ = tx.send((incoming.message.id, Instant::now()));
        async { Disposition::Ack }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });
    let publisher = Arc::new(Publisher::new(bus.clone()));

    // 1. Latency, one message in flight: publish + confirm + delivery + handler; first
    //    back to back, then after 20 ms of quiet each (as a rollout's hops are: every
    //    process on the path has gone idle in between).
    let mut confirm = Histogram::<u64>::new(3)?;
    let mut round_trip = Histogram::<u64>::new(3)?;
    let mut idle_round_trip = Histogram::<u64>::new(3)?;
    for n in 0..warmup + samples + idle_samples {
        let idle = n >= warmup + samples;
        if idle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let m = push(n);
        let out = Outgoing::message(&m)?;
        let t0 = Instant::now();
        sent.lock().unwrap().insert(m.id, t0);
        publisher.publish(&out, Retry::once()).await?;
        let confirmed = t0.elapsed();
        let (id, at) = rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("consumer stopped"))?;
        anyhow::ensure!(id == m.id, "out of order");
        if idle {
            idle_round_trip.record((at - t0).as_micros() as u64)?;
        } else if n >= warmup {
            confirm.record(confirmed.as_micros() as u64)?;
            round_trip.record((at - t0).as_micros() as u64)?;
        }
    }

    // 2. Throughput: 20,000 confirmed publishes, 64 in flight, consumed as they arrive.
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for worker in 0..64u64 {
        let publisher = publisher.clone();
        handles.push(tokio::spawn(async move {
            let mut n = worker;
            while n < bulk {
                let out = Outgoing::message(&push(1_000_000 + n))?;
                publisher.publish(&out, Retry::once()).await?;
                n += 64;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let publish_elapsed = t0.elapsed();
    let mut consumed = 0u64;
    while consumed < bulk {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer stopped"))?;
        consumed += 1;
    }
    let total_elapsed = t0.elapsed();
    cancel.cancel();
    task.await??;

    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "convoy-bus round trip on {}",
        tb.url.split('@').next_back().unwrap_or("?")
    );
    println!(
        "  publish→confirm      p50 {:.3} ms  p99 {:.3} ms  (n={samples})",
        ms(confirm.value_at_quantile(0.5)),
        ms(confirm.value_at_quantile(0.99))
    );
    println!(
        "  publish→consume      p50 {:.3} ms  p99 {:.3} ms  (n={samples})",
        ms(round_trip.value_at_quantile(0.5)),
        ms(round_trip.value_at_quantile(0.99))
    );
    println!(
        "  publish→consume, each after 20 ms idle  p50 {:.3} ms  p99 {:.3} ms  (n={idle_samples})",
        ms(idle_round_trip.value_at_quantile(0.5)),
        ms(idle_round_trip.value_at_quantile(0.99))
    );
    println!(
        "  confirmed throughput {:.0} msg/s  ({bulk} msgs, 64 in flight, {:.2} s)",
        bulk as f64 / publish_elapsed.as_secs_f64(),
        publish_elapsed.as_secs_f64()
    );
    println!(
        "  end-to-end           {:.0} msg/s  (all {bulk} consumed after {:.2} s)",
        bulk as f64 / total_elapsed.as_secs_f64(),
        total_elapsed.as_secs_f64()
    );
    Ok(())
}
