//! The agent killed with SIGKILL at each step: after a restart, `current` points to a
//! complete release and the command reaches one definite result, exactly once.

mod common;

use common::Host;
use convoy_message::{DeployOutcome, DeployResult};
use convoy_testkit::{Tap, wait_until};
use std::time::Duration;

/// The distinct results (by message id) for command `id` that arrive within a quiet window
/// after the first. A redelivered command is answered again with the same recorded result
/// message, which consumers drop as a duplicate: it counts once.
async fn all_results(tap: &mut Tap, id: uuid::Uuid) -> anyhow::Result<Vec<DeployResult>> {
    let mut found: Vec<(uuid::Uuid, DeployResult)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let wait = if found.is_empty() {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_secs(2)
        };
        let Ok(t) = tap.next(wait).await else { break };
        let message = t.message()?;
        if let convoy_message::Body::Result(r) = message.body
            && r.command_id == id
            && !found.iter().any(|(mid, _)| *mid == message.id)
        {
            found.push((message.id, r));
        }
    }
    anyhow::ensure!(!found.is_empty(), "no result for {id}");
    Ok(found.into_iter().map(|(_, r)| r).collect())
}

fn assert_complete_current(h: &Host, expected: &str) {
    assert_eq!(h.current().as_deref(), Some(expected), "current");
    assert!(
        h.root.join(expected).join(".convoy-release.json").exists(),
        "current points to a complete release"
    );
}

/// Starts the agent with `fault`, orders v2 as r2, and waits for the agent to kill itself.
async fn deploy_v2_dying_at(h: &mut Host, fault: &str) -> anyhow::Result<convoy_message::Command> {
    h.start_agent(&[("CONVOY_FAULT", fault)])?;
    let cmd = h.command(h.deploy_action("v2", "r2")?);
    h.order(&cmd).await?;
    let agent = h.agent.as_mut().expect("agent");
    let status = agent.wait(Duration::from_secs(30)).await?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the agent died at {fault}"
    );
    Ok(cmd)
}

/// Deploys v1 as r1, then v2 as r2 with the agent dying at `fault`; restarts it.
async fn crash_at(fault: &str) -> anyhow::Result<(Host, Vec<DeployResult>)> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.agent.take();

    h.release("v2", "app.txt", "v2\n")?;
    let cmd = deploy_v2_dying_at(&mut h, fault).await?;
    h.start_agent(&[])?;
    let found = all_results(&mut results, cmd.id).await?;
    Ok((h, found))
}

#[tokio::test]
async fn killed_before_the_switch() -> anyhow::Result<()> {
    let (h, results) = crash_at("before_switch").await?;
    assert_eq!(results.len(), 1, "exactly one result: {results:?}");
    assert_eq!(results[0].outcome, DeployOutcome::Failed);
    assert!(!results[0].rolled_back);
    assert_complete_current(&h, "releases/r1");
    assert!(
        !h.root.join("releases/r2").exists(),
        "the half-done release is removed"
    );
    Ok(())
}

#[tokio::test]
async fn killed_just_after_the_switch() -> anyhow::Result<()> {
    let (h, results) = crash_at("after_switch").await?;
    assert_eq!(results.len(), 1, "exactly one result: {results:?}");
    assert_eq!(results[0].outcome, DeployOutcome::Failed);
    assert!(
        results[0].rolled_back,
        "switched back: {:?}",
        results[0].error
    );
    assert_complete_current(&h, "releases/r1");
    let lines = h.hook_lines();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("restart r1 ")),
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test]
async fn killed_after_every_step_before_the_result() -> anyhow::Result<()> {
    let (h, results) = crash_at("before_result").await?;
    assert_eq!(results.len(), 1, "exactly one result: {results:?}");
    assert_eq!(
        results[0].outcome,
        DeployOutcome::Succeeded,
        "{:?}",
        results[0].error
    );
    assert_complete_current(&h, "releases/r2");
    let post = h
        .hook_lines()
        .iter()
        .filter(|l| l.starts_with("post_switch r2"))
        .count();
    assert_eq!(post, 1, "no step ran twice");
    Ok(())
}

#[tokio::test]
async fn killed_after_the_result_was_written_but_not_published() -> anyhow::Result<()> {
    let (h, results) = crash_at("after_result").await?;
    assert_eq!(results.len(), 1, "exactly one result: {results:?}");
    assert_eq!(results[0].outcome, DeployOutcome::Succeeded);
    assert_complete_current(&h, "releases/r2");
    Ok(())
}

#[tokio::test]
async fn killed_after_receipt_before_any_step() -> anyhow::Result<()> {
    let (h, results) = crash_at("after_record").await?;
    assert_eq!(results.len(), 1, "exactly one result: {results:?}");
    assert_eq!(
        results[0].outcome,
        DeployOutcome::Succeeded,
        "{:?}",
        results[0].error
    );
    assert_complete_current(&h, "releases/r2");
    assert_eq!(
        h.hook_lines()
            .iter()
            .filter(|l| l.starts_with("build r2"))
            .count(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn killed_during_the_build_hook() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    let marker = h.path().join("building");
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.agent.take();
    // v2's build announces itself, then takes its time.
    let config = std::fs::read_to_string(&h.config)?;
    let config: String = config
        .lines()
        .map(|l| {
            if l.starts_with("build = ") {
                format!("build = \"touch {} && sleep 120\"", marker.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&h.config, config)?;
    h.release("v2", "app.txt", "v2\n")?;
    h.start_agent(&[])?;
    let cmd = h.command(h.deploy_action("v2", "r2")?);
    h.order(&cmd).await?;
    wait_until(Duration::from_secs(20), "the build hook to start", || {
        let there = marker.exists();
        async move { there.then_some(()) }
    })
    .await?;
    // kill -9 the agent alone: its hook runs on in its own process group.
    h.agent
        .as_ref()
        .expect("agent")
        .signal(nix::sys::signal::Signal::SIGKILL);
    h.agent
        .as_mut()
        .expect("agent")
        .wait(Duration::from_secs(10))
        .await?;
    h.start_agent(&[])?;
    let found = all_results(&mut results, cmd.id).await?;
    assert_eq!(found.len(), 1, "exactly one result: {found:?}");
    assert_eq!(found[0].outcome, DeployOutcome::Failed);
    assert!(
        found[0].error.as_deref().unwrap_or("").contains("restart"),
        "{:?}",
        found[0].error
    );
    assert_complete_current(&h, "releases/r1");
    assert!(!h.root.join("releases/r2").exists());
    // The orphaned build hook was killed by the new agent.
    wait_until(
        Duration::from_secs(5),
        "the orphaned build hook to be killed",
        || async {
            let out = std::process::Command::new("pgrep")
                .args(["-f", "sleep 120"])
                .output()
                .ok()?;
            out.stdout.is_empty().then_some(())
        },
    )
    .await?;
    Ok(())
}

/// A failed health check switches back; the journal cannot record the revert (a full disk)
/// and the agent dies before the previous release is restarted. After a restart the agent
/// finishes that revert — restarts r1 — rather than taking `current` on r1 for somebody
/// else's doing and leaving r1 stopped.
#[tokio::test]
async fn killed_during_a_revert_the_journal_could_not_record() -> anyhow::Result<()> {
    let mut h = Host::with_extra(common::HEALTHY_FILE_CHECK).await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.agent.take();

    // v2 has no `healthy` file: its health check fails and the agent switches back.
    convoy_testkit::git::git(&h.work, &["rm", "-q", "healthy"])?;
    h.release("v2", "app.txt", "v2\n")?;
    let cmd = deploy_v2_dying_at(&mut h, "revert_unjournaled").await?;
    assert_eq!(h.current().as_deref(), Some("releases/r1"), "switched back");
    let restarts_of_r1 = |h: &Host| {
        h.hook_lines()
            .iter()
            .filter(|l| l.starts_with("restart r1 "))
            .count()
    };
    assert_eq!(
        restarts_of_r1(&h),
        1,
        "r1 not restarted since its own deploy: {:?}",
        h.hook_lines()
    );

    h.start_agent(&[])?;
    let found = all_results(&mut results, cmd.id).await?;
    assert_eq!(found.len(), 1, "exactly one result: {found:?}");
    assert_eq!(found[0].outcome, DeployOutcome::Failed);
    assert!(found[0].rolled_back, "{:?}", found[0].error);
    assert_complete_current(&h, "releases/r1");
    let lines = h.hook_lines();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("restart r1 ")),
        "the previous release was restarted: {lines:?}"
    );
    assert_eq!(restarts_of_r1(&h), 2, "once by the revert: {lines:?}");
    Ok(())
}
