//! Publish → consume through a real RabbitMQ, with confirms; unroutable is an error.

use convoy_bus::{
    Bus, Consumer, Disposition, Incoming, Outgoing, PublishError, Publisher, QueueSpec, Retry,
};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, Message, PushChange, PushEvent, RefKind, routing};
use convoy_testkit::{TestBus, wait_until};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn push(repo: &str, n: u8) -> Message {
    Message::new(
        "test@here",
        Body::Push(PushEvent {
            repo: Name::new(repo).unwrap(),
            git_ref: RefName::new("refs/heads/main").unwrap(),
            ref_kind: RefKind::Branch,
            old: Sha::new(format!("{:040x}", n)).unwrap(),
            new: Sha::new(format!("{:040x}", u32::from(n) + 1)).unwrap(),
            change: PushChange::Updated,
            commits: vec![],
            truncated: false,
            pusher: None,
        }),
    )
}

#[tokio::test]
async fn published_messages_arrive_once_in_order() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "roundtrip")?;
    let spec = QueueSpec::new(tb.queue("q"), vec!["push.web".into()]);
    let consumer = Consumer::new(bus.clone(), spec);
    consumer.declare().await?;

    let publisher = Publisher::new(bus.clone());
    let sent: Vec<Message> = (0..20).map(|n| push("web", n)).collect();
    for m in &sent {
        publisher
            .publish(&Outgoing::message(m)?, Retry::once())
            .await?;
    }
    // A duplicate publication of the first message (as after a lost confirm).
    publisher
        .publish(&Outgoing::message(&sent[0])?, Retry::once())
        .await?;

    let got = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let handler = {
        let got = got.clone();
        move |incoming: Incoming| {
            let got = got.clone();
            async move {
                got.lock().unwrap().push(incoming.message);
                Disposition::Ack
            }
        }
    };
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });
    wait_until(Duration::from_secs(10), "20 messages", || {
        let n = got.lock().unwrap().len();
        async move { (n >= 20).then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await??;
    let got = got.lock().unwrap().clone();
    assert_eq!(got, sent, "each message once, in publication order");
    Ok(())
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "unroutable")?;
    let publisher = Publisher::new(bus);
    let message = push("nobody-listens", 1);
    let err = publisher
        .publish(&Outgoing::message(&message)?, Retry::once())
        .await
        .expect_err("an unroutable message must not count as sent");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains("push.nobody-listens"), "{err}");

    // Retrying within a budget still fails, and says how often it tried.
    let err = publisher
        .publish(
            &Outgoing::message(&message)?,
            Retry::within(Duration::from_millis(800)),
        )
        .await
        .expect_err("still unroutable");
    assert!(matches!(err, PublishError::GaveUp { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_broker_fails_within_the_budget() -> anyhow::Result<()> {
    let port = convoy_testkit::free_port();
    let mut config = TestBus::new().config();
    config.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let publisher = Publisher::new(Bus::new(config, "nowhere")?);
    let started = std::time::Instant::now();
    let out = Outgoing::with_key(&push("web", 1), routing::push(&Name::new("web")?))?;
    let err = publisher
        .publish(&out, Retry::within(Duration::from_millis(700)))
        .await
        .expect_err("nothing listens on that port");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("connect"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_concurrent_consumer_handles_several_at_once_each_once() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "concurrent")?;
    let spec = QueueSpec::new(tb.queue("q"), vec!["push.web".into()]);
    let consumer = Consumer::new(bus.clone(), spec).concurrent(8);
    consumer.declare().await?;

    let publisher = Publisher::new(bus.clone());
    let sent: Vec<Message> = (0..40).map(|n| push("web", n)).collect();
    for m in &sent {
        publisher
            .publish(&Outgoing::message(m)?, Retry::once())
            .await?;
    }
    // The same message twice more, published while the first copy may be in hand.
    for _ in 0..2 {
        publisher
            .publish(&Outgoing::message(&sent[39])?, Retry::once())
            .await?;
    }

    // (messages handled, handlers running now, most running at once)
    let state = Arc::new(Mutex::new((Vec::new(), 0usize, 0usize)));
    let cancel = CancellationToken::new();
    let retried = sent[5].id;
    let handler = {
        let state = state.clone();
        move |incoming: Incoming| {
            let state = state.clone();
            async move {
                {
                    let mut s = state.lock().unwrap();
                    s.1 += 1;
                    s.2 = s.2.max(s.1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut s = state.lock().unwrap();
                s.1 -= 1;
                s.0.push(incoming.message.id);
                // The first try of message 5 fails transiently: it comes again.
                if incoming.message.id == retried && !incoming.redelivered {
                    s.0.pop();
                    return Disposition::Retry;
                }
                Disposition::Ack
            }
        }
    };
    let ids: Vec<uuid::Uuid> = sent.iter().map(|m| m.id).collect();
    let task = {
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    };
    let watch = async {
        wait_until(Duration::from_secs(20), "40 messages handled", || {
            let n = state.lock().unwrap().0.len();
            async move { (n >= 40).then_some(()) }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
        anyhow::Ok(())
    };
    let (ran, watched) = tokio::join!(task, watch);
    ran?;
    watched?;
    let (got, running, most) = state.lock().unwrap().clone();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(
        sorted, want,
        "each message handled to an ack once, the retried one too"
    );
    assert_eq!(running, 0);
    assert!(
        (2..=8).contains(&most),
        "handled several at once, never more than asked: {most}"
    );
    Ok(())
}

/// The conductor's queues as an upgrade finds them: the event queue still bound to
/// `deploy.#` from before progress had a queue of its own. Declaring today's specs removes
/// that binding; results then reach only the event queue and progress only the progress
/// queue, as transient messages.
#[tokio::test]
async fn progress_and_results_take_separate_queues_after_an_upgrade() -> anyhow::Result<()> {
    use convoy_message::names::{HostName, ReleaseId};
    use convoy_message::{DeployOutcome, DeployProgress, DeployResult, Step, StepState};
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "lanes")?;
    let events = QueueSpec::conductor_events(&tb.exchange);
    let progress = QueueSpec::conductor_progress(&tb.exchange);
    tb.track(events.name.clone());
    tb.track(progress.name.clone());
    let old = QueueSpec {
        retired_bindings: vec![],
        bindings: vec!["deploy.#".into()],
        ..events.clone()
    };
    Consumer::new(bus.clone(), old).declare().await?;
    Consumer::new(bus.clone(), events.clone()).declare().await?;

    let host = HostName::new("web-1")?;
    let app = Name::new("shop")?;
    let command_id = uuid::Uuid::new_v4();
    let step = Message::new(
        "agent@web-1",
        Body::Progress(DeployProgress {
            command_id,
            host: host.clone(),
            app: app.clone(),
            rollout: None,
            release: ReleaseId::new("v1")?,
            step: Step::Build,
            state: StepState::Started,
            duration_ms: None,
        }),
    );
    let publisher = Publisher::new(bus.clone());
    let out = Outgoing::message(&step)?;
    assert!(
        out.transient,
        "progress must not be written to disk by the broker"
    );
    let err = publisher
        .publish(&out, Retry::once())
        .await
        .expect_err("the old deploy.# binding must be gone from the event queue");
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");

    Consumer::new(bus.clone(), progress.clone())
        .declare()
        .await?;
    publisher.publish(&out, Retry::once()).await?;
    let result = Message::new(
        "agent@web-1",
        Body::Result(DeployResult {
            command_id,
            host,
            action: "deploy".into(),
            app: Some(app),
            rollout: None,
            release: None,
            outcome: DeployOutcome::Succeeded,
            rolled_back: false,
            current: None,
            previous: None,
            steps: vec![],
            error: None,
            started_at: chrono::Utc::now(),
            duration_ms: 1,
            finished_at: None,
        }),
    );
    let out = Outgoing::message(&result)?;
    assert!(!out.transient, "results are persistent");
    publisher.publish(&out, Retry::once()).await?;

    let got = |spec: QueueSpec| {
        let bus = bus.clone();
        async move {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let cancel = CancellationToken::new();
            let handler = {
                let seen = seen.clone();
                move |incoming: Incoming| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .unwrap()
                            .push(incoming.message.kind().to_owned());
                        Disposition::Ack
                    }
                }
            };
            let consumer = Consumer::new(bus, spec);
            let task = tokio::spawn({
                let cancel = cancel.clone();
                async move { consumer.run(&handler, cancel).await }
            });
            let _ = wait_until(Duration::from_secs(5), "a delivery", || {
                let n = seen.lock().unwrap().len();
                async move { (n >= 1).then_some(()) }
            })
            .await;
            // Anything more would arrive within this.
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
            let _ = task.await;
            seen.lock().unwrap().clone()
        }
    };
    assert_eq!(got(events).await, vec!["result".to_owned()]);
    assert_eq!(got(progress).await, vec!["progress".to_owned()]);
    Ok(())
}
