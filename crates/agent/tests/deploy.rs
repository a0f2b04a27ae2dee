//! Deploys on a real host layout, by a real agent process, from a real git mirror.

mod common;

use common::{Host, next_result};
use convoy_message::names::ReleaseId;
use convoy_message::{Action, DeployOutcome, Step, StepState};
use std::time::Duration;

#[tokio::test]
async fn a_tag_is_deployed_hooks_run_in_order_and_a_redelivery_changes_nothing()
-> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    let mut progress = h.tb.tap(&["deploy.web.*.*"]).await?;

    let cmd = h.command(h.deploy_action("v1", "r1")?);
    let message = h.order(&cmd).await?;
    let first = next_result(&mut results, cmd.id).await?;
    assert_eq!(
        first.outcome,
        DeployOutcome::Succeeded,
        "{:?}\n{}",
        first.error,
        h.agent_log()
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(
        h.root.join("current/healthy").exists(),
        "the tree was exported"
    );
    assert!(h.root.join("releases/r1/.convoy-release.json").exists());
    assert!(
        std::fs::symlink_metadata(h.root.join("releases/r1/log"))?
            .file_type()
            .is_symlink()
    );

    let sha = h.sha_of("v1")?;
    let expected: Vec<String> = ["build", "pre_switch", "restart", "post_switch"]
        .iter()
        .map(|step| format!("{step} r1 {sha} refs/tags/v1 web {}", h.host))
        .collect();
    assert_eq!(
        h.hook_lines(),
        expected,
        "hooks in order with their CONVOY_* context"
    );
    let steps: Vec<(Step, StepState)> = first.steps.iter().map(|s| (s.step, s.state)).collect();
    assert_eq!(
        steps,
        vec![
            (Step::Export, StepState::Succeeded),
            (Step::Build, StepState::Succeeded),
            (Step::PreSwitch, StepState::Succeeded),
            (Step::Switch, StepState::Succeeded),
            (Step::Restart, StepState::Succeeded),
            (Step::Health, StepState::Skipped),
            (Step::PostSwitch, StepState::Succeeded),
        ]
    );
    assert_eq!(first.current, Some(ReleaseId::new("r1")?));
    assert_eq!(first.rollout.as_deref(), Some("r-1"));
    // Progress was published per step.
    let mut seen = Vec::new();
    while let Ok(t) = progress.next(Duration::from_millis(500)).await {
        seen.push(t.routing_key);
    }
    assert!(seen.iter().any(|k| k.ends_with(".build")), "{seen:?}");
    assert!(seen.iter().any(|k| k.ends_with(".result")), "{seen:?}");

    // The same command again (as after a lost ack or a conductor restart).
    h.send(&message).await?;
    let again = next_result(&mut results, cmd.id).await?;
    assert_eq!(again, first, "the recorded result, unchanged");
    // Re-wrapped in a new envelope (a new `at`, as a restarted conductor sends it).
    h.order(&cmd).await?;
    let again = next_result(&mut results, cmd.id).await?;
    assert_eq!(again, first, "the recorded result, unchanged");
    assert_eq!(h.hook_lines().len(), 4, "no hook ran twice");
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    Ok(())
}

#[tokio::test]
async fn a_failing_health_check_switches_back_to_the_previous_release() -> anyhow::Result<()> {
    let mut h = Host::with_extra(common::HEALTHY_FILE_CHECK).await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;

    // v2 has no `healthy` file.
    convoy_testkit::git::git(&h.work, &["rm", "-q", "healthy"])?;
    h.release("v2", "app.txt", "v2\n")?;
    let cmd = h.command(h.deploy_action("v2", "r2")?);
    h.order(&cmd).await?;
    let result = next_result(&mut results, cmd.id).await?;
    assert_eq!(result.outcome, DeployOutcome::Failed);
    assert!(result.rolled_back, "{result:?}");
    assert!(
        result.error.as_deref().unwrap_or("").contains("health"),
        "{:?}",
        result.error
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert_eq!(result.current, Some(ReleaseId::new("r1")?));
    assert!(
        !h.root.join("releases/r2").exists(),
        "the failed release is removed"
    );
    let last = h.hook_lines().last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("restart r1 "),
        "the previous release was restarted: {last}"
    );
    Ok(())
}

#[tokio::test]
async fn rollback_and_preview_then_switch() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.release("v2", "app.txt", "v2\n")?;
    h.deploy_ok(&mut results, "v2", "r2").await?;
    assert_eq!(h.current().as_deref(), Some("releases/r2"));

    let cmd = h.command(Action::Rollback {
        app: "web".parse()?,
        release: None,
    });
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Succeeded, "{:?}", r.error);
    assert_eq!(h.current().as_deref(), Some("releases/r1"));

    // A preview: exported and checked, current untouched; then switched.
    h.release("v3", "app.txt", "v3\n")?;
    let mut action = h.deploy_action("v3", "r3")?;
    if let Action::Deploy(spec) = &mut action {
        spec.no_switch = true;
    }
    let cmd = h.command(action);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Succeeded, "{:?}", r.error);
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(h.root.join("releases/r3/.convoy-release.json").exists());
    let cmd = h.command(Action::Switch {
        app: "web".parse()?,
        release: "r3".parse()?,
    });
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Succeeded, "{:?}", r.error);
    assert_eq!(h.current().as_deref(), Some("releases/r3"));
    assert_eq!(r.previous, Some(ReleaseId::new("r1")?));

    // A preview under the id of the release that runs is refused; nothing is touched.
    let mut action = h.deploy_action("v3", "r3")?;
    if let Action::Deploy(spec) = &mut action {
        spec.no_switch = true;
    }
    let cmd = h.command(action);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Refused, "{r:?}");
    assert!(h.root.join("current/.convoy-release.json").exists());

    // Inventory answers with current and previous.
    let mut inventory = h.tb.tap(&["inventory.*"]).await?;
    h.order(&h.command(Action::Inventory)).await?;
    let report = inventory.next(Duration::from_secs(20)).await?.message()?;
    let convoy_message::Body::Inventory(report) = report.body else {
        anyhow::bail!("not an inventory");
    };
    let web = &report.apps[&"web".parse()?];
    assert_eq!(web.current, Some(ReleaseId::new("r3")?));
    assert_eq!(web.previous, Some(ReleaseId::new("r1")?));
    Ok(())
}

#[tokio::test]
async fn a_hanging_hook_is_killed_at_its_timeout_with_its_children() -> anyhow::Result<()> {
    let pidfile_dir = tempfile::tempdir()?;
    let pidfile = pidfile_dir.path().join("child.pid");
    let mut h = Host::new().await?;
    // Replace the build hook by one that hangs, with a child.
    let config = std::fs::read_to_string(&h.config)?;
    let config = config
        .lines()
        .filter(|l| !l.starts_with("build = "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "[apps.web.hooks]",
            &format!(
                "[apps.web.timeouts]\nbuild_s = 1\n\n[apps.web.hooks]\nbuild = \"sleep 300 & echo $! > {}; wait\"",
                pidfile.display()
            ),
        );
    std::fs::write(&h.config, config)?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    let cmd = h.command(h.deploy_action("v1", "r1")?);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Failed);
    assert!(
        r.error.as_deref().unwrap_or("").contains("timed out"),
        "{:?}",
        r.error
    );
    assert_eq!(h.current(), None, "nothing was switched");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z"))
        .unwrap_or(false);
    assert!(!alive, "the hook's child {pid} survived");
    Ok(())
}

/// A command's validity (`expires_at - issued_at`, the stage's `host_deadline_s`) is how
/// long the conductor waits for the host, so the agent, counting from when it takes the
/// command, stops there too instead of finishing late: a hook hanging after the switch is stopped at
/// the deadline and the previous release is put back; one hanging before the switch leaves
/// `current` untouched and the half-made release removed. Both hooks' own timeouts (300 s)
/// are far beyond the deadlines here. A rollback command is never cut short.
#[tokio::test]
async fn the_agent_stops_at_the_host_deadline_and_leaves_the_host_as_it_was() -> anyhow::Result<()>
{
    let markers = tempfile::tempdir()?;
    let hang = |step: &str| {
        format!(
            "if [ -e {} ]; then sleep 600; fi; ",
            markers.path().join(step).display()
        )
    };
    let mut h = Host::new().await?;
    let config = std::fs::read_to_string(&h.config)?
        .replace("build = \"", &format!("build = \"{}", hang("build")))
        .replace(
            "post_switch = \"",
            &format!("post_switch = \"{}", hang("post_switch")),
        )
        .replace(
            "restart = \"",
            &format!(
                "restart = \"if [ -e {} ]; then sleep 4; fi; ",
                markers.path().join("slow_restart").display()
            ),
        )
        .replace(
            "[apps.web.hooks]",
            "[apps.web.timeouts]\nbuild_s = 300\npost_switch_s = 300\n\n[apps.web.hooks]",
        );
    std::fs::write(&h.config, config)?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.release("v2", "app.txt", "v2\n")?;

    // After the switch: post_switch hangs; stopped at the deadline, r1 is current again.
    std::fs::write(markers.path().join("post_switch"), "")?;
    let mut cmd = h.command(h.deploy_action("v2", "r2")?);
    // Room for export, build, pre_switch and restart on a loaded machine.
    cmd.expires_at = cmd.issued_at + chrono::Duration::seconds(10);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Failed, "{r:?}");
    assert!(r.rolled_back, "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("post_switch was stopped at the host deadline"),
        "{error}"
    );
    let post = r
        .steps
        .iter()
        .find(|s| s.step == Step::PostSwitch)
        .ok_or_else(|| anyhow::anyhow!("no post_switch step in {r:?}"))?;
    assert!(
        post.duration_ms < 60_000,
        "stopped by the deadline, not its own 300 s timeout: {post:?}"
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(!h.root.join("releases/r2").exists(), "r2 was removed");
    let last = h.hook_lines().last().cloned().unwrap_or_default();
    assert!(last.starts_with("restart r1 "), "r1 was restarted: {last}");

    // Before the switch: build hangs; nothing is switched, the new release is removed.
    std::fs::remove_file(markers.path().join("post_switch"))?;
    std::fs::write(markers.path().join("build"), "")?;
    let mut cmd = h.command(h.deploy_action("v2", "r3")?);
    cmd.expires_at = cmd.issued_at + chrono::Duration::seconds(8);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Failed, "{r:?}");
    assert!(!r.rolled_back, "nothing to roll back: {r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("build was stopped at the host deadline"),
        "{error}"
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(!h.root.join("releases/r3").exists(), "r3 was removed");
    assert!(
        !h.hook_lines().iter().any(|l| l.contains(" r3 ")),
        "no hook after build ran for r3: {:?}",
        h.hook_lines()
    );

    // Putting things back is never cut short: a rollback whose restart outlasts the
    // command's validity still finishes.
    std::fs::remove_file(markers.path().join("build"))?;
    h.deploy_ok(&mut results, "v2", "r4").await?;
    std::fs::write(markers.path().join("slow_restart"), "")?;
    let mut cmd = h.command(Action::Rollback {
        app: "web".parse()?,
        release: None,
    });
    cmd.expires_at = cmd.issued_at + chrono::Duration::seconds(2);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Succeeded, "{r:?}");
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    let restart = r
        .steps
        .iter()
        .find(|s| s.step == Step::Restart)
        .ok_or_else(|| anyhow::anyhow!("no restart step in {r:?}"))?;
    assert!(
        restart.duration_ms >= 3_000,
        "the restart ran its 4 s: {restart:?}"
    );
    Ok(())
}

/// The release is the app user's: the build hook, run as that user, writes into its own
/// release and into the shared dirs the agent made, as `bundle install --deployment` does;
/// a symlink in the commit changes hands itself, never what it points to.
#[tokio::test]
async fn hooks_run_as_the_configured_user_who_owns_the_new_release() -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "switching users needs root: run scripts/test as root"
    );
    let mut h = Host::new().await?;
    // `nobody` must be able to reach the release and append to the hook log.
    std::fs::set_permissions(h.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(&h.hook_log, "")?;
    std::fs::set_permissions(&h.hook_log, std::fs::Permissions::from_mode(0o666))?;
    // A commit with a symlink out of the app root, to a file of root's.
    let outside = h.path().join("outside-file");
    std::fs::write(&outside, "root's\n")?;
    std::os::unix::fs::symlink(&outside, h.work.join("escape"))?;
    h.release("v2", "app.txt", "v2\n")?;
    let config = std::fs::read_to_string(&h.config)?
        .replace("[apps.web]\n", "[apps.web]\nuser = \"nobody\"\n")
        .lines()
        .map(|l| {
            if l.starts_with("build = ") {
                // Writes into the release (top level and a new directory) and into a
                // shared directory the agent created.
                r#"build = "id -un > \"$CONVOY_RELEASE_DIR/built-by\" && mkdir -p vendor/bundle && echo ok > vendor/bundle/ok && echo built >> log/build.log""#.to_owned()
            } else if l.starts_with("post_switch = ") {
                format!(
                    "post_switch = \"id -un >> {} && echo $HOME >> {}\"",
                    h.hook_log.display(),
                    h.hook_log.display()
                )
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&h.config, config)?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v2", "r1").await?;
    let lines = h.hook_lines();
    let n = lines.len();
    anyhow::ensure!(n >= 2, "{lines:?}");
    assert_eq!(
        lines[n - 2],
        "nobody",
        "the hook ran as the configured user"
    );
    let nobody =
        nix::unistd::User::from_name("nobody")?.ok_or_else(|| anyhow::anyhow!("no user nobody"))?;
    assert_eq!(
        std::path::Path::new(&lines[n - 1]),
        nobody.dir,
        "with that user's HOME"
    );

    let release = h.root.join("releases/r1");
    assert_eq!(
        std::fs::read_to_string(release.join("built-by"))?.trim(),
        "nobody"
    );
    assert_eq!(
        std::fs::read_to_string(release.join("vendor/bundle/ok"))?,
        "ok\n"
    );
    assert_eq!(
        std::fs::read_to_string(h.root.join("shared/log/build.log"))?,
        "built\n"
    );
    let owner = |p: &std::path::Path| -> anyhow::Result<(u32, u32)> {
        let m = std::fs::symlink_metadata(p)?;
        Ok((m.uid(), m.gid()))
    };
    let user = (nobody.uid.as_raw(), nobody.gid.as_raw());
    for p in [
        "",
        "healthy",
        "app.txt",
        "escape",
        "log",
        "vendor/bundle/ok",
    ] {
        assert_eq!(owner(&release.join(p))?, user, "releases/r1/{p}");
    }
    assert_eq!(owner(&h.root.join("shared/log"))?, user, "shared/log");
    // What the agent keeps: the root, releases/, shared/, the links, the marker; and
    // whatever a committed symlink points to.
    for p in [
        "",
        "releases",
        "shared",
        "current",
        "releases/r1/.convoy-release.json",
    ] {
        assert_eq!(owner(&h.root.join(p))?, (0, 0), "{p}");
    }
    assert_eq!(owner(&outside)?, (0, 0), "the symlink's target");
    Ok(())
}
