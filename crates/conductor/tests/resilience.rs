//! A conductor killed with SIGKILL, and a broker restarted, in the middle of a rollout.

mod common;

use common::{Fleet, Setup};
use convoy_testkit::BrokerNode;
use serde_json::json;
use std::time::Duration;

fn assert_each_host_ran_once(fleet: &Fleet, release: &str) {
    for h in &fleet.hosts {
        assert_eq!(
            h.current().as_deref(),
            Some(release),
            "{} runs {:?}",
            h.name,
            h.current()
        );
        assert_eq!(
            h.builds_of(release),
            1,
            "{} built {release} {} times",
            h.name,
            h.builds_of(release)
        );
        assert_eq!(
            h.journal_entries(),
            1,
            "{} journaled more than one command",
            h.name
        );
    }
}

/// Six hosts rolling `v1` out in batches of two, the conductor SIGKILLed while the second
/// batch is in its build hooks: the fleet, the rollout and its release.
async fn killed_in_the_second_batch() -> anyhow::Result<(Fleet, i64, String)> {
    let mut fleet = Fleet::new(Setup {
        hosts: 6,
        build_sleep: 0.6,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    let id = fleet.deploy("v1", "prod", json!({ "batches": 2 }))?;
    let r = fleet.wait_partway(id, 2).await?;
    let release = r["release"].as_str().unwrap_or_default().to_owned();
    if let Some(c) = fleet.conductor.as_mut() {
        c.kill9();
    }
    Ok((fleet, id, release))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_killed_mid_rollout_resumes_and_deploys_no_host_twice() -> anyhow::Result<()> {
    let (mut fleet, id, release) = killed_in_the_second_batch().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.start_conductor().await?;
    let r = fleet
        .wait_state(id, &["succeeded"], Duration::from_secs(90))
        .await?;
    assert_eq!(r["summary"]["counts"]["succeeded"], 6);
    assert_each_host_ran_once(&fleet, &release);
    assert!(
        fleet.conductor_log().contains("resuming rollout"),
        "{}",
        fleet.conductor_log()
    );
    Ok(())
}

/// After a restore an operator starts the conductor paused (`<state_dir>/start-paused`):
/// the rollout the store shows running is paused on disk, the batch in flight is recorded
/// as it reports, no new batch starts until `convoy resume` — not across a restart either —
/// and then it finishes with no host deployed twice. The first resume removes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_started_paused_holds_the_rollout_until_an_operator_resumes_it()
-> anyhow::Result<()> {
    let (mut fleet, id, release) = killed_in_the_second_batch().await?;
    let marker = fleet.path().join("conductor").join("start-paused");
    std::fs::write(&marker, "")?;
    fleet.start_conductor().await?;
    fleet
        .wait_state(id, &["paused"], Duration::from_secs(10))
        .await?;
    // A restart before anyone looked is paused again.
    if let Some(c) = fleet.conductor.as_mut() {
        c.kill9();
    }
    fleet.start_conductor().await?;
    fleet
        .wait_state(id, &["paused"], Duration::from_secs(10))
        .await?;
    assert!(
        marker.exists(),
        "the start-paused file stays until a resume"
    );
    assert!(
        fleet.conductor_log().contains("started paused"),
        "{}",
        fleet.conductor_log()
    );

    // Longer than the second batch needs (its build hooks sleep 0.6 s): it is recorded,
    // and the third does not start.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = fleet.get(&format!("/api/rollouts/{id}"))?;
    assert_eq!(r["state"], "paused", "{}", r["summary"]);
    let pending = r["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["state"] == "pending")
        .count();
    assert_eq!(pending, 2, "the last batch must wait: {}", r["summary"]);
    let audit = fleet.get("/api/audit")?;
    let held = |a: &serde_json::Value| {
        a["actor"] == "conductor"
            && a["action"] == "pause"
            && a["rollout"] == id
            && a["detail"].as_str().unwrap_or("").contains("convoy resume")
    };
    assert!(audit.as_array().into_iter().flatten().any(held), "{audit}");

    let out = fleet.cli(&["resume", &id.to_string()]).await?;
    assert!(out.status.success(), "{}", common::text(&out));
    let r = fleet
        .wait_state(id, &["succeeded"], Duration::from_secs(60))
        .await?;
    assert!(
        !marker.exists(),
        "the first resume removes the start-paused file"
    );
    assert_eq!(r["summary"]["counts"]["succeeded"], 6);
    assert_each_host_ran_once(&fleet, &release);

    // Without the file, the next start is an ordinary one.
    if let Some(c) = fleet.conductor.as_mut() {
        c.kill9();
    }
    fleet.start_conductor().await?;
    fleet.get("/api/apps")?;
    assert!(
        !fleet.conductor_log().contains("started paused"),
        "{}",
        fleet.conductor_log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_rollout_does_not_stop_it() -> anyhow::Result<()> {
    if !BrokerNode::available() {
        eprintln!("skipped: rabbitmq-server is not installed");
        return Ok(());
    }
    let mut broker = BrokerNode::start().await?;
    let mut fleet = Fleet::new(Setup {
        hosts: 6,
        build_sleep: 0.6,
        amqp_url: Some(broker.url()),
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    let id = fleet.deploy(
        "v1",
        "prod",
        json!({ "batches": 2, "host_deadline_s": 120 }),
    )?;
    let r = fleet.wait_partway(id, 2).await?;
    let release = r["release"].as_str().unwrap_or_default().to_owned();
    broker.stop().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.boot().await?;
    let r = fleet
        .wait_state(id, &["succeeded"], Duration::from_secs(120))
        .await?;
    assert_eq!(r["summary"]["counts"]["succeeded"], 6);
    assert_each_host_ran_once(&fleet, &release);
    Ok(())
}
