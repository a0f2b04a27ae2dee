//! The faults the bus must survive: a broker restarted mid-stream, a consumer process
//! killed holding unacked deliveries.

use convoy_bus::{Bus, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::names::{HostName, Name, Sha};
use convoy_message::{Body, FetchReport, FetchStatus, Message};
use convoy_testkit::{BrokerNode, Daemon, TestBus, wait_until};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn report(n: usize) -> Message {
    Message::new(
        "fetcher@test",
        Body::Fetch(FetchReport {
            host: HostName::new("h1").unwrap(),
            repo: Name::new("web").unwrap(),
            status: FetchStatus::Fetched,
            refs: [(
                "refs/heads/main".to_owned(),
                Sha::new(format!("{n:040x}")).unwrap(),
            )]
            .into(),
            for_events: vec![],
            error: None,
            duration_ms: n as u64,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    if !BrokerNode::available() {
        anyhow::bail!("needs a private RabbitMQ node: run scripts/test as root");
    }
    let mut node = BrokerNode::start().await?;
    let tb = TestBus::on(&node.url());
    let bus = Bus::new(tb.config(), "restart-test")?;
    let consumer = Consumer::new(
        bus.clone(),
        QueueSpec::new(tb.queue("events"), vec!["fetch.#".into()]),
    );
    consumer.declare().await?;

    let counts: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
    let handler = {
        let counts = counts.clone();
        move |incoming: Incoming| {
            *counts
                .lock()
                .unwrap()
                .entry(incoming.message.id)
                .or_default() += 1;
            async { Disposition::Ack }
        }
    };
    let cancel = CancellationToken::new();
    let consuming = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });

    // The publisher keeps each message until confirmed; 8 publish concurrently.
    const N: usize = 1000;
    let messages: Vec<Message> = (0..N).map(report).collect();
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let publisher = Arc::new(Publisher::new(bus.clone()));
    let confirmed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishing = tokio::spawn({
        let publisher = publisher.clone();
        let confirmed = confirmed.clone();
        let cancel = cancel.clone();
        async move {
            let chunks: Vec<Vec<Message>> =
                messages.chunks(N / 8).map(<[Message]>::to_vec).collect();
            let mut tasks = Vec::new();
            for chunk in chunks {
                let publisher = publisher.clone();
                let confirmed = confirmed.clone();
                let cancel = cancel.clone();
                tasks.push(tokio::spawn(async move {
                    for m in chunk {
                        let out = Outgoing::message(&m)?;
                        publisher
                            .publish(&out, Retry::until_cancelled(cancel.clone()))
                            .await?;
                        confirmed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok::<_, anyhow::Error>(())
        }
    });

    wait_until(Duration::from_secs(30), "a third of the stream", || {
        let n = confirmed.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= N / 3).then_some(()) }
    })
    .await?;
    node.stop().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.boot().await?;

    tokio::time::timeout(Duration::from_secs(120), publishing).await???;
    wait_until(Duration::from_secs(60), "every message consumed", || {
        let n = counts.lock().unwrap().len();
        async move { (n >= N).then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    consuming.await??;

    let counts = counts.lock().unwrap();
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "message {id} processed {:?} times",
            counts.get(id)
        );
    }
    assert_eq!(counts.len(), N, "no message that was never sent");
    Ok(())
}

/// The path of one of this crate's examples, built first if a filtered `cargo test` run
/// did not build it.
fn example(name: &str) -> anyhow::Result<PathBuf> {
    // Integration tests live in target/<profile>/deps; cargo puts examples beside them.
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|p| p.join("examples").join(name))
        .ok_or_else(|| anyhow::anyhow!("no target dir above {}", exe.display()))?;
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "convoy-bus", "--example", name])
            .status()?;
        anyhow::ensure!(status.success(), "building example {name} failed");
    }
    Ok(path)
}

#[tokio::test]
async fn a_killed_consumer_hands_its_unacked_deliveries_to_its_successor() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let dir = tempfile::tempdir()?;
    let ledger = dir.path().join("ledger");
    let queue = tb.queue("work");
    let bus = Bus::new(tb.config(), "kill-test")?;
    Consumer::new(
        bus.clone(),
        QueueSpec::new(queue.clone(), vec!["fetch.#".into()]),
    )
    .declare()
    .await?;
    const N: usize = 200;
    let publisher = Publisher::new(bus);
    let mut ids = Vec::new();
    for n in 0..N {
        let m = report(n);
        ids.push(m.id.to_string());
        publisher
            .publish(&Outgoing::message(&m)?, Retry::once())
            .await?;
    }
    let bin = example("ledger")?;
    let ledger_arg = ledger.to_string_lossy().to_string();
    let args = [queue.as_str(), "fetch.#", ledger_arg.as_str(), "10"];
    let mut first = Daemon::spawn("ledger-1", &bin, &args, &tb.env(), dir.path())?;
    let lines = |p: &PathBuf| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until(
        Duration::from_secs(20),
        "the first consumer to process some",
        || {
            let n = lines(&ledger);
            async move { (n >= 30).then_some(()) }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; log: {}", first.log()))?;
    first.kill9();
    let done_by_first = lines(&ledger);
    assert!(
        done_by_first < N,
        "the first consumer must die holding work"
    );

    let _second = Daemon::spawn("ledger-2", &bin, &args, &tb.env(), dir.path())?;
    wait_until(Duration::from_secs(30), "the successor to finish", || {
        let n = lines(&ledger);
        async move { (n >= N).then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&ledger)?;
    let mut recorded: Vec<&str> = text.lines().collect();
    assert_eq!(recorded.len(), N, "each message recorded exactly once");
    recorded.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(recorded, expected);
    Ok(())
}
