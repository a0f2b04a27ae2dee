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

/// A broker that accepts TCP connections and then never answers (what a broker out of
/// file descriptors or stuck in boot looks like): every connect attempt times out, and
/// each must close its socket rather than leave lapin's I/O thread waiting on it forever.
#[tokio::test]
async fn a_stalled_broker_leaves_no_sockets_open() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let mut config = convoy_bus::BusConfig::new(
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        "t-stalled",
    );
    config.tuning.connect_timeout_ms = 300;
    let bus = Bus::new(config, "stall-test")?;
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let err = bus.connection().await.err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("could not connect") && e.contains("within")),
            "connect to a silent broker must time out, got {err:?}"
        );
    }
    // Every accepted socket is closed by the client: reads reach end-of-file after the
    // protocol header, instead of blocking until the read timeout.
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Read;
        listener.set_nonblocking(false)?;
        for n in 0..ATTEMPTS {
            let (mut socket, _) = listener.accept()?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut received = Vec::new();
            match socket.read_to_end(&mut received) {
                Ok(_) => assert!(
                    received.starts_with(b"AMQP"),
                    "attempt {n} sent {received:?}, not an AMQP protocol header"
                ),
                Err(e) => anyhow::bail!("attempt {n}: the client left its socket open ({e})"),
            }
        }
        Ok(())
    })
    .await?
}

/// A discarded connection is closed, not just forgotten: whatever channels and consumers
/// were left on it end, so the broker requeues what they held.
#[tokio::test]
async fn a_discarded_connection_is_closed() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "discard-test")?;
    let first = bus.connection().await?;
    let channel = first.create_channel().await?;
    bus.discard(&first).await;
    wait_until(
        Duration::from_secs(5),
        "the discarded connection and its channel to close",
        || async { (!first.status().connected() && !channel.status().connected()).then_some(()) },
    )
    .await?;
    let second = bus.connection().await?;
    assert!(
        !Arc::ptr_eq(&first, &second),
        "discard must make the next user reconnect"
    );
    assert!(second.status().connected());
    Ok(())
}
