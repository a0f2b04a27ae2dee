//! A pipeline: build succeeded → stage 1 → tests gate → stage 2 → manual gate → promote →
//! stage 3.

mod common;

use common::{Fleet, Setup, text};
use convoy_bus::{Bus, Outgoing, Publisher, Retry};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, BuildEvent, BuildStatus, Message};
use std::time::Duration;

const APPS: &str = r#"
[apps.web.pipeline]
auto_deploy = true
refs = ["refs/tags/v*"]

[[apps.web.stages]]
name = "ci"
hosts = [{host0}]
gate = { kind = "tests", command = ["sh", "-c", "echo testing $CONVOY_STAGE $CONVOY_RELEASE on $CONVOY_HOSTS; test -n \"$CONVOY_COMMIT\""] }

[[apps.web.stages]]
name = "staging"
hosts = [{host1}]
gate = { kind = "manual" }

[[apps.web.stages]]
name = "prod"
hosts = [{host2}]
"#;

async fn pipeline(fleet: &Fleet, state: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = fleet.get("/api/pipelines?app=web")?;
        if list[0]["state"] == state {
            return Ok(list[0].clone());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "pipeline not {state}: {}\n{}",
            list,
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_build_flows_through_a_tests_gate_and_a_manual_gate() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        apps: &format!("[apps.web]\n{APPS}"),
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agents()?;
    let sha = fleet.release("v1")?;

    // What convoy-ci publishes when Jenkins reports success.
    let build = Message::new(
        "ci@test",
        Body::Build(BuildEvent {
            repo: Name::new("web")?,
            git_ref: Some(RefName::new("refs/tags/v1")?),
            commit: Sha::new(sha)?,
            status: BuildStatus::Succeeded,
            job: "web-build".into(),
            build_number: Some(7),
            url: Some("http://jenkins.test/job/web-build/7/".into()),
            detail: None,
        }),
    );
    let publisher = Publisher::new(Bus::new(fleet.tb.config(), "test-ci")?);
    publisher
        .publish(
            &Outgoing::message(&build)?,
            Retry::within(Duration::from_secs(20)),
        )
        .await?;
    // Delivered twice (a redelivery): still one pipeline.
    publisher
        .publish(
            &Outgoing::message(&build)?,
            Retry::within(Duration::from_secs(20)),
        )
        .await?;

    let p = pipeline(&fleet, "waiting_for_promotion").await?;
    let release = p["release"].as_str().unwrap_or_default().to_owned();
    assert_eq!(p["trigger"], "build web-build #7");
    assert_eq!(p["gates"][0]["kind"], "tests");
    assert_eq!(p["gates"][0]["state"], "passed");
    assert_eq!(p["gates"][0]["exit_code"], 0);
    let output = p["gates"][0]["output"].as_str().unwrap_or_default();
    assert!(
        output.contains(&format!("testing ci {release} on {}", fleet.hosts[0].name)),
        "{output}"
    );
    assert_eq!(p["gates"][1]["kind"], "manual");
    assert_eq!(p["gates"][1]["state"], "waiting");
    assert_eq!(fleet.hosts[0].current().as_deref(), Some(release.as_str()));
    assert_eq!(fleet.hosts[1].current().as_deref(), Some(release.as_str()));
    assert_eq!(
        fleet.hosts[2].current(),
        None,
        "prod deployed before the manual gate"
    );
    let list = fleet.get("/api/pipelines?app=web")?;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "a redelivered build started a second pipeline"
    );

    // The operator looks, then promotes.
    let status = fleet.cli(&["status", "web"]).await?;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("convoy promote web"),
        "{}",
        text(&status)
    );
    let out = fleet.cli(&["promote", "web"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    let p = pipeline(&fleet, "succeeded").await?;
    assert_eq!(p["gates"][1]["state"], "promoted");
    assert_eq!(p["gates"][1]["by"], "deployer");
    assert!(p["gates"][1]["finished_at"].is_string());
    assert_eq!(p["rollouts"].as_array().map(Vec::len), Some(3));
    assert_eq!(fleet.hosts[2].current().as_deref(), Some(release.as_str()));
    fleet.audited("promote", "deployer")?;
    // Nothing waits any more: promote again is refused (exit 3).
    let again = fleet.cli(&["promote", "web"]).await?;
    assert_eq!(again.status.code(), Some(3), "{}", text(&again));
    Ok(())
}
