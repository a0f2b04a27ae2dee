//! Bad input ends in the dead-letter queue with its reason, and the consumer keeps going.

use chrono::Utc;
use convoy_bus::{Bus, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::names::HostName;
use convoy_message::signing::CommandVerifier;
use convoy_message::{Action, Command, KeyPair, TrustSet, routing};
use convoy_testkit::TestBus;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn command(host: &str, ttl_s: i64) -> Command {
    let now = Utc::now();
    Command {
        id: Uuid::now_v7(),
        host: HostName::new(host).unwrap(),
        issued_at: now,
        expires_at: now + chrono::Duration::seconds(ttl_s),
        issuer: "test".into(),
        rollout: None,
        action: Action::Inventory,
    }
}

fn raw(key: &str, payload: Vec<u8>) -> Outgoing {
    Outgoing {
        exchange: None,
        routing_key: key.into(),
        id: Uuid::new_v4(),
        kind: "command".into(),
        payload,
        headers: vec![],
        transient: false,
    }
}

#[tokio::test]
async fn every_kind_of_bad_input_is_dead_lettered_with_its_reason() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "dlq-test")?;
    let host = HostName::new("web1")?;
    let spec = QueueSpec::commands(&tb.exchange, &host);
    tb.track(spec.name.clone());
    let consumer = Consumer::new(bus.clone(), spec);
    consumer.declare().await?;
    let mut dead = tb.dead_tap().await?;

    let key = KeyPair::generate("ops-1")?;
    let rogue = KeyPair::generate("rogue")?;
    let impostor = KeyPair::generate("ops-1")?; // same id, other key
    let mut trust = TrustSet::new();
    trust.insert(key.key_id(), key.verifying_key()).unwrap();
    let verifier = CommandVerifier::new(trust, host.clone());

    let rk = routing::command(&host);
    let good = command("web1", 60);
    let valid = key.command_message("conductor@test", &good).encode()?;
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 20);
    let v2 = String::from_utf8(valid.clone())?.replacen("\"v\":1", "\"v\":2", 1);

    let cases: Vec<(&str, Outgoing)> = vec![
        ("malformed", raw(&rk, b"{not json".to_vec())),
        ("malformed", raw(&rk, truncated)),
        ("unsupported_version", raw(&rk, v2.into_bytes())),
        ("oversized", raw(&rk, vec![b'x'; 300 * 1024])),
        (
            "bad_signature",
            Outgoing::with_key(&impostor.command_message("x", &command("web1", 60)), &rk)?,
        ),
        (
            "unknown_key",
            Outgoing::with_key(&rogue.command_message("x", &command("web1", 60)), &rk)?,
        ),
        (
            "expired",
            Outgoing::with_key(&key.command_message("x", &command("web1", -3600)), &rk)?,
        ),
        (
            "wrong_host",
            Outgoing::with_key(&key.command_message("x", &command("web2", 60)), &rk)?,
        ),
    ];
    let publisher = Publisher::new(bus.clone());
    for (_, out) in &cases {
        publisher.publish(out, Retry::once()).await?;
    }
    // A good command last: the consumer must still be going.
    publisher
        .publish(
            &Outgoing::with_key(&key.command_message("x", &good), &rk)?,
            Retry::once(),
        )
        .await?;

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let accepted = accepted.clone();
        move |incoming: Incoming| {
            let accepted = accepted.clone();
            let verdict = verifier.verify(&incoming.message, Utc::now());
            async move {
                match verdict {
                    Ok(cmd) => {
                        accepted.lock().unwrap().push(cmd);
                        Disposition::Ack
                    }
                    Err(rejection) => Disposition::DeadLetter(rejection),
                }
            }
        }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });

    for (reason, out) in &cases {
        let letter = dead.next(Duration::from_secs(10)).await?;
        assert_eq!(
            letter.header("x-convoy-reason"),
            Some(*reason),
            "{:?}",
            letter.headers
        );
        assert!(!letter.header("x-convoy-detail").unwrap_or("").is_empty());
        assert_eq!(letter.header("x-convoy-routing-key"), Some(rk.as_str()));
        if *reason == "oversized" {
            assert_eq!(
                letter.data.len(),
                out.payload.len(),
                "kept whole below 1 MiB"
            );
        } else {
            assert_eq!(letter.data, out.payload, "the original bytes are kept");
        }
    }
    convoy_testkit::wait_until(Duration::from_secs(10), "the good command", || {
        let n = accepted.lock().unwrap().len();
        async move { (n == 1).then_some(()) }
    })
    .await?;
    assert_eq!(accepted.lock().unwrap()[0], good);
    dead.expect_silence(Duration::from_millis(300)).await?;
    cancel.cancel();
    task.await??;
    Ok(())
}

#[tokio::test]
async fn a_reused_id_with_other_bytes_is_a_replay() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let bus = Bus::new(tb.config(), "replay-test")?;
    let spec = QueueSpec::new(tb.queue("replay"), vec!["cmd.#".into()]);
    let consumer = Consumer::new(bus.clone(), spec);
    consumer.declare().await?;
    let mut dead = tb.dead_tap().await?;
    let key = KeyPair::generate("k")?;
    let cmd = command("web1", 60);
    let first = key.command_message("x", &cmd);
    let mut second_cmd = cmd.clone();
    second_cmd.issuer = "mallory".into();
    let second = key.command_message("x", &second_cmd);
    let publisher = Publisher::new(bus.clone());
    for m in [&first, &first, &second] {
        publisher
            .publish(&Outgoing::with_key(m, "cmd.web1")?, Retry::once())
            .await?;
    }
    let handled = Arc::new(Mutex::new(0));
    let handler = {
        let handled = handled.clone();
        move |_: Incoming| {
            *handled.lock().unwrap() += 1;
            async { Disposition::Ack }
        }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });
    let letter = dead.next(Duration::from_secs(10)).await?;
    assert_eq!(letter.header("x-convoy-reason"), Some("replayed"));
    assert_eq!(
        *handled.lock().unwrap(),
        1,
        "the exact duplicate is skipped, not handled"
    );
    cancel.cancel();
    task.await??;
    Ok(())
}
