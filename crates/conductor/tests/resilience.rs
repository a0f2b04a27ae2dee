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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_killed_mid_rollout_resumes_and_deploys_no_host_twice() -> anyhow::Result<()> {
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
    // SIGKILL while the second batch is in its build hooks.
    if let Some(c) = fleet.conductor.as_mut() {
        c.kill9();
    }
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
