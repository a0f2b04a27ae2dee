//! Commands that must not be obeyed end in the dead-letter queue, and nothing on disk
//! changes; a full disk fails a deploy cleanly.

mod common;

use chrono::Utc;
use common::{Host, next_result};
use convoy_message::{Body, DeployOutcome, KeyPair, Message};
use std::time::Duration;

/// Orders `cmd` (a deploy of r2 over r1) and checks it is refused with `why`, r1 still
/// current and no r2 on disk.
async fn refused_leaving_r1(
    h: &Host,
    results: &mut convoy_testkit::Tap,
    cmd: &convoy_message::Command,
    why: &str,
) -> anyhow::Result<()> {
    h.order(cmd).await?;
    let r = next_result(results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Refused, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains(why),
        "{:?}",
        r.error
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(!h.root.join("releases/r2").exists());
    Ok(())
}

fn snapshot(h: &Host) -> Vec<String> {
    let mut names: Vec<String> = walk(&h.root);
    names.sort();
    names
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

#[tokio::test]
async fn forged_expired_misaddressed_replayed_and_traversing_commands_are_dead_lettered()
-> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    let mut dead = h.tb.dead_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    let before = snapshot(&h);
    let hooks_before = h.hook_lines().len();

    let impostor = KeyPair::generate("test-signer")?; // the trusted id, another key
    let forged = impostor.command_message("x", &h.command(h.deploy_action("v1", "r9")?));

    let mut expired_cmd = h.command(h.deploy_action("v1", "r9")?);
    expired_cmd.issued_at = Utc::now() - chrono::Duration::hours(2);
    expired_cmd.expires_at = Utc::now() - chrono::Duration::hours(1);
    let expired = h.key.command_message("x", &expired_cmd);

    let mut elsewhere_cmd = h.command(h.deploy_action("v1", "r9")?);
    elsewhere_cmd.host = "some-other-host".parse()?;
    let elsewhere = h.key.command_message("x", &elsewhere_cmd);

    // The first deploy's id again, with other (validly signed) content.
    let replay_cmd = h.command(h.deploy_action("v1", "r8")?);
    let mut reused = replay_cmd.clone();
    reused.issuer = "mallory".into();
    let replayed = h.key.command_message("x", &reused);

    // Validly signed payloads that try to escape the app root.
    let traversal = |field: &str, value: &str| -> anyhow::Result<Message> {
        let cmd = h.command(h.deploy_action("v1", "r7")?);
        let mut json: serde_json::Value = serde_json::to_value(&cmd)?;
        json[field] = serde_json::Value::String(value.to_owned());
        let signed = h.key.sign_payload(serde_json::to_string(&json)?);
        Ok(Message::with_id(cmd.id, "x", Body::Command(signed)))
    };
    let bad_app = traversal("app", "../../etc")?;
    let bad_ref = traversal("ref", "refs/tags/../../x")?;
    let bad_release = traversal("release", "../current")?;

    h.order(&replay_cmd).await?;
    let ok = next_result(&mut results, replay_cmd.id).await?;
    assert_eq!(ok.outcome, DeployOutcome::Succeeded);
    let after_replay_target = snapshot(&h);
    let cases = [
        ("bad_signature", &forged),
        ("expired", &expired),
        ("wrong_host", &elsewhere),
        ("replayed", &replayed),
        ("invalid_field", &bad_app),
        ("invalid_field", &bad_ref),
        ("invalid_field", &bad_release),
    ];
    for (_, message) in &cases {
        h.send(message).await?;
    }
    for (reason, message) in &cases {
        let letter = dead.next(Duration::from_secs(20)).await?;
        assert_eq!(
            letter.header("x-convoy-reason"),
            Some(*reason),
            "{:?}",
            letter.headers
        );
        assert_eq!(
            letter.message_id.as_deref(),
            Some(message.id.to_string().as_str())
        );
    }
    dead.expect_silence(Duration::from_millis(500)).await?;
    assert_eq!(snapshot(&h), after_replay_target, "nothing on disk changed");
    assert!(before.len() <= after_replay_target.len());
    assert_eq!(
        h.hook_lines().len(),
        hooks_before + 4,
        "only the legitimate deploy ran hooks"
    );
    Ok(())
}

#[tokio::test]
async fn a_tag_moved_after_signing_is_refused() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    let mut dead = h.tb.dead_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.release("v2", "app.txt", "v2\n")?;
    let cmd = h.command(h.deploy_action("v2", "r2")?);
    // Someone moves the tag after the command was signed.
    convoy_testkit::git::commit_file(&h.work, "app.txt", "evil\n", "evil")?;
    convoy_testkit::git::git(&h.work, &["tag", "-f", "v2"])?;
    convoy_testkit::git::git(&h.work, &["push", "-q", "-f", "origin", "main", "--tags"])?;
    convoy_testkit::git::git(
        &h.mirror,
        &[
            "fetch",
            "-q",
            "--prune",
            "--force",
            "origin",
            "+refs/tags/*:refs/tags/*",
        ],
    )?;
    refused_leaving_r1(&h, &mut results, &cmd, "not to the signed commit").await?;
    let letter = dead.next(Duration::from_secs(10)).await?;
    assert_eq!(letter.header("x-convoy-reason"), Some("ref_moved"));
    Ok(())
}

#[tokio::test]
async fn a_ref_not_yet_in_the_mirror_is_fetched() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    // Pushed to the origin, but the mirror has not fetched it.
    convoy_testkit::git::commit_file(&h.work, "app.txt", "v2\n", "v2")?;
    convoy_testkit::git::git(&h.work, &["tag", "v2"])?;
    convoy_testkit::git::git(&h.work, &["push", "-q", "origin", "main", "--tags"])?;
    let r = h.deploy_ok(&mut results, "v2", "r2").await?;
    assert!(
        r.steps[0].output_tail.contains("fetched"),
        "{:?}",
        r.steps[0]
    );
    assert_eq!(h.current().as_deref(), Some("releases/r2"));
    Ok(())
}

#[tokio::test]
async fn a_full_disk_fails_the_deploy_cleanly() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "mounting a small tmpfs needs root: run scripts/test as root"
    );
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    // Move r1 aside, mount a 1 MiB tmpfs on releases/, put r1 back on it.
    let releases = h.root.join("releases");
    let aside = h.path().join("aside");
    std::fs::rename(&releases, &aside)?;
    std::fs::create_dir(&releases)?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&releases)
        .status()?;
    anyhow::ensure!(status.success(), "mount tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(releases.clone());
    let copy = std::process::Command::new("cp")
        .arg("-a")
        .arg(aside.join("r1"))
        .arg(&releases)
        .status()?;
    anyhow::ensure!(copy.success());

    // v2 carries 3 MiB of data: it cannot fit.
    let big: String = "x".repeat(3 * 1024 * 1024);
    h.release("v2", "big.bin", &big)?;
    let cmd = h.command(h.deploy_action("v2", "r2")?);
    h.order(&cmd).await?;
    let r = next_result(&mut results, cmd.id).await?;
    assert_eq!(r.outcome, DeployOutcome::Failed, "{r:?}");
    assert!(
        r.error.as_deref().unwrap_or("").contains("export failed"),
        "{:?}",
        r.error
    );
    assert_eq!(h.current().as_deref(), Some("releases/r1"));
    assert!(
        h.root.join("current/healthy").exists(),
        "current is still complete"
    );
    assert!(
        !releases.join("r2").exists(),
        "the partial export was removed"
    );
    Ok(())
}

#[tokio::test]
async fn two_agents_for_one_host_deploy_each_command_once() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let first = h.agent.take();
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.release("v2", "a.txt", "2")?;
    h.deploy_ok(&mut results, "v2", "r2").await?;
    h.release("v3", "a.txt", "3")?;
    h.deploy_ok(&mut results, "v3", "r3").await?;
    let builds = h
        .hook_lines()
        .iter()
        .filter(|l| l.starts_with("build "))
        .count();
    assert_eq!(builds, 3, "each command built once: {:?}", h.hook_lines());
    drop(first);
    Ok(())
}

/// A signed deploy of app `web` from another repository on the host is refused: an app's
/// code comes only from its configured repository.
#[tokio::test]
async fn a_deploy_from_another_repository_than_the_apps_is_refused() -> anyhow::Result<()> {
    let mut h = Host::new().await?;
    h.start_agent(&[])?;
    let mut results = h.results_tap().await?;
    h.deploy_ok(&mut results, "v1", "r1").await?;
    h.release("v2", "app.txt", "v2\n")?;
    let mut action = h.deploy_action("v2", "r2")?;
    if let convoy_message::Action::Deploy(spec) = &mut action {
        spec.repo = convoy_message::names::Name::new("other")?;
    }
    let cmd = h.command(action);
    refused_leaving_r1(&h, &mut results, &cmd, "apps.web.repo is web").await
}
