//! The post-receive hook in a real bare repository, pushed to with the real git CLI.

use convoy_message::{Body, PushChange, PushEvent, RefKind};
use convoy_testkit::git::{self, git};
use convoy_testkit::{Tap, TestBus};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const HOOK: &str = env!("CARGO_BIN_EXE_convoy-hook");

struct Repo {
    dir: tempfile::TempDir,
    work: PathBuf,
}

fn setup() -> anyhow::Result<Repo> {
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("shop.git");
    git::init_bare(&bare)?;
    let out = Command::new(HOOK).args(["install"]).arg(&bare).output()?;
    anyhow::ensure!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = dir.path().join("work");
    git::init(&work)?;
    git(
        &work,
        &["remote", "add", "origin", bare.to_str().unwrap_or_default()],
    )?;
    Ok(Repo { dir, work })
}

/// `git push …` with the hook's environment; returns (elapsed, stderr).
fn push(
    repo: &Repo,
    env: &[(String, String)],
    args: &[&str],
) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let out = Command::new("git")
        .current_dir(&repo.work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("push")
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(out.status.success(), "git push {args:?} failed: {stderr}");
    Ok((started.elapsed(), stderr))
}

fn env(tb: &TestBus, spool: &Path) -> Vec<(String, String)> {
    let mut env = tb.env();
    env.push(("CONVOY_SPOOL_DIR".into(), spool.to_string_lossy().into()));
    env
}

async fn next_push(tap: &mut Tap) -> anyhow::Result<(String, PushEvent, uuid::Uuid)> {
    let t = tap.next(Duration::from_secs(15)).await?;
    let m = t.message()?;
    match m.body {
        Body::Push(p) => Ok((t.routing_key, p, m.id)),
        other => anyhow::bail!("not a push: {other:?}"),
    }
}

#[tokio::test]
async fn pushes_of_a_branch_a_tag_a_force_push_and_a_deletion_are_announced() -> anyhow::Result<()>
{
    let tb = TestBus::new();
    let repo = setup()?;
    let spool = repo.dir.path().join("spool");
    let env = env(&tb, &spool);
    let mut tap = tb.tap(&["push.#"]).await?;

    let first = git::commit_file(&repo.work, "a.txt", "1", "first commit")?;
    let second = git::commit_file(&repo.work, "a.txt", "2", "second commit\n\nwith a body")?;
    push(&repo, &env, &["-q", "origin", "main"])?;
    let (key, e, _) = next_push(&mut tap).await?;
    assert_eq!(key, "push.shop");
    assert_eq!(e.git_ref.as_str(), "refs/heads/main");
    assert_eq!(
        (e.change, e.ref_kind),
        (PushChange::Created, RefKind::Branch)
    );
    assert!(e.old.is_zero());
    assert_eq!(e.new.as_str(), second);
    let shas: Vec<&str> = e.commits.iter().map(|c| c.sha.as_str()).collect();
    assert_eq!(shas, vec![second.as_str(), first.as_str()], "newest first");
    assert_eq!(e.commits[0].summary, "second commit");
    assert_eq!(e.commits[0].author, "Test Author");

    git(&repo.work, &["tag", "-a", "v1.0", "-m", "release"])?;
    push(&repo, &env, &["-q", "origin", "v1.0"])?;
    let (_, e, _) = next_push(&mut tap).await?;
    assert_eq!(e.git_ref.as_str(), "refs/tags/v1.0");
    assert_eq!((e.change, e.ref_kind), (PushChange::Created, RefKind::Tag));

    git(&repo.work, &["commit", "-q", "--amend", "-m", "rewritten"])?;
    let rewritten = git::rev_parse(&repo.work, "HEAD")?;
    push(&repo, &env, &["-q", "--force", "origin", "main"])?;
    let (_, e, _) = next_push(&mut tap).await?;
    assert_eq!(e.change, PushChange::Forced);
    assert_eq!(e.old.as_str(), second);
    assert_eq!(e.new.as_str(), rewritten);

    let third = git::commit_file(&repo.work, "a.txt", "3", "third")?;
    push(&repo, &env, &["-q", "origin", "main"])?;
    let (_, e, _) = next_push(&mut tap).await?;
    assert_eq!(e.change, PushChange::Updated);
    assert_eq!(e.commits.len(), 1);
    assert_eq!(e.commits[0].sha.as_str(), third);

    push(&repo, &env, &["-q", "origin", "main:refs/heads/feature"])?;
    next_push(&mut tap).await?;
    push(&repo, &env, &["-q", "origin", ":refs/heads/feature"])?;
    let (_, e, _) = next_push(&mut tap).await?;
    assert_eq!(e.change, PushChange::Deleted);
    assert!(e.new.is_zero());
    assert!(e.commits.is_empty());
    tap.expect_silence(Duration::from_millis(300)).await?;
    Ok(())
}

#[tokio::test]
async fn with_the_broker_down_the_push_is_quick_and_the_spool_is_drained_later()
-> anyhow::Result<()> {
    let tb = TestBus::new();
    let repo = setup()?;
    let spool = repo.dir.path().join("spool");
    let mut down = env(&tb, &spool);
    let dead_port = convoy_testkit::free_port();
    down[0].1 = format!("amqp://guest:guest@127.0.0.1:{dead_port}/%2f");
    git::commit_file(&repo.work, "a.txt", "1", "first")?;
    let (elapsed, stderr) = push(&repo, &down, &["origin", "main"])?;
    assert!(
        elapsed < Duration::from_secs(3),
        "the push took {elapsed:?}"
    );
    assert!(
        stderr.contains("spooled"),
        "one warning line for the person pushing: {stderr}"
    );
    let spooled: Vec<_> = std::fs::read_dir(spool.join("new"))?.flatten().collect();
    assert_eq!(spooled.len(), 1);
    let bytes = std::fs::read(spooled[0].path())?;
    let spooled_id = convoy_message::Message::decode(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .id;

    // The broker is back: drain publishes it with the id it was born with, once.
    let mut tap = tb.tap(&["push.#"]).await?;
    let up = env(&tb, &spool);
    let drain = |env: &[(String, String)]| -> anyhow::Result<String> {
        let out = Command::new(HOOK)
            .arg("drain")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "drain: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(drain(&up)?.contains("sent 1"));
    let (_, e, id) = next_push(&mut tap).await?;
    assert_eq!(id, spooled_id, "the original event id");
    assert_eq!(e.change, PushChange::Created);
    assert!(drain(&up)?.contains("sent 0"));
    tap.expect_silence(Duration::from_millis(500)).await?;

    // The next push finds the spool empty and publishes directly.
    git::commit_file(&repo.work, "a.txt", "2", "second")?;
    let (_, stderr) = push(&repo, &up, &["origin", "main"])?;
    assert!(!stderr.contains("spooled"), "{stderr}");
    next_push(&mut tap).await?;
    Ok(())
}

#[test]
fn install_chains_an_existing_hook() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("app.git");
    git::init_bare(&bare)?;
    let old = bare.join("hooks/post-receive");
    let marker = dir.path().join("old-hook-ran");
    std::fs::write(&old, format!("#!/bin/sh\ncat > {}\n", marker.display()))?;
    Command::new("chmod").arg("755").arg(&old).status()?;
    let out = Command::new(HOOK).arg("install").arg(&bare).output()?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("post-receive.chained"));
    assert!(bare.join("hooks/post-receive.chained").exists());
    // Installing again replaces only convoy's hook.
    let again = Command::new(HOOK).arg("install").arg(&bare).output()?;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // The chained hook gets the same input.
    let work = dir.path().join("w");
    git::init(&work)?;
    git::commit_file(&work, "f", "x", "x")?;
    let spool = dir.path().join("spool");
    let status = Command::new("git")
        .current_dir(&work)
        .env(
            "CONVOY_AMQP_URL",
            format!(
                "amqp://guest:guest@127.0.0.1:{}/%2f",
                convoy_testkit::free_port()
            ),
        )
        .env("CONVOY_BUDGET_MS", "300")
        .env("CONVOY_SPOOL_DIR", &spool)
        .args(["push", "-q"])
        .arg(&bare)
        .arg("main")
        .status()?;
    assert!(status.success());
    assert!(std::fs::read_to_string(&marker)?.contains("refs/heads/main"));
    Ok(())
}

#[tokio::test]
async fn an_installed_hook_reads_the_config_file_it_was_installed_with() -> anyhow::Result<()> {
    let tb = TestBus::new();
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("central.git");
    git::init_bare(&bare)?;
    let config = dir.path().join("hook.toml");
    std::fs::write(
        &config,
        format!(
            "amqp_url = \"{}\"\nexchange = \"{}\"\nspool_dir = \"{}\"\n",
            tb.url,
            tb.exchange,
            dir.path().join("spool").display()
        ),
    )?;
    let out = Command::new(HOOK)
        .arg("--config")
        .arg(&config)
        .arg("install")
        .arg(&bare)
        .args(["--name", "storefront"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo = Repo {
        work: dir.path().join("work"),
        dir,
    };
    git::init(&repo.work)?;
    git(
        &repo.work,
        &["remote", "add", "origin", bare.to_str().unwrap_or_default()],
    )?;
    let mut tap = tb.tap(&["push.#"]).await?;
    git::commit_file(&repo.work, "a.txt", "1", "first")?;
    // No CONVOY_* in the environment: the broker and the exchange come from the file.
    let (_, stderr) = push(&repo, &[], &["-q", "origin", "main"])?;
    let (key, e, _) = next_push(&mut tap)
        .await
        .map_err(|err| anyhow::anyhow!("{err}; the push said: {stderr}"))?;
    assert_eq!(key, "push.storefront");
    assert_eq!(e.git_ref.as_str(), "refs/heads/main");
    Ok(())
}
