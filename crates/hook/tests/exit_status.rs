//! Exit statuses of the real binary: a configuration that cannot be used stops `drain`,
//! `serve` and `install` with 78 (EX_CONFIG, which the units do not restart in a loop) and
//! a message naming the file or key; the post-receive hook still lets the push through.

use convoy_testkit::git::{self, git};
use std::path::Path;
use std::process::{Command, Output};

const HOOK: &str = env!("CARGO_BIN_EXE_convoy-hook");

/// `convoy-hook --config CONFIG ARGS…`, with no `CONVOY_*` variable of the caller's.
fn hook(config: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(HOOK);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONVOY_") {
            cmd.env_remove(name);
        }
    }
    Ok(cmd.arg("--config").arg(config).args(args).output()?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A hook.toml with `text`, its spool in the same temporary directory.
fn config(dir: &Path, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("hook.toml");
    std::fs::write(
        &path,
        format!(
            "spool_dir = \"{}\"\n{text}",
            dir.join("spool").to_string_lossy()
        ),
    )?;
    Ok(path)
}

#[test]
fn drain_with_a_bad_config_exits_78_naming_the_file_and_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = config(dir.path(), "budget_msec = 2000\n")?;
    for args in [&["drain"][..], &["drain", "--watch"]] {
        let out = hook(&path, args)?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        assert!(err.starts_with("convoy-hook: config file "), "{err}");
        assert!(err.contains(&path.to_string_lossy().into_owned()), "{err}");
        assert!(err.contains("budget_msec"), "{err}");
    }
    // A value that fails validation, not only parsing.
    let path = config(dir.path(), "repo = \"../shop\"\n")?;
    let out = hook(&path, &["drain"])?;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("config key `repo`"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn a_missing_config_file_exits_78() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nowhere.toml");
    let out = hook(&missing, &["drain"])?;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&missing.to_string_lossy().into_owned()),
        "{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn serve_without_a_usable_forge_secret_or_address_exits_78() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (text, expected) in [
        ("[serve]\nlisten = \"127.0.0.1:0\"\n", "no forge is enabled"),
        (
            "[serve]\nlisten = \"127.0.0.1:0\"\ngithub_secret = \"short\"\n",
            "config key `serve.github_secret` is shorter than 16 characters",
        ),
        (
            "[serve]\nlisten = \"webhooks\"\ngitlab_token = \"a-long-enough-token\"\n",
            "config key `serve.listen`",
        ),
        ("[serve]\nlisten = 8091\n", "serve.listen"),
    ] {
        let path = config(dir.path(), text)?;
        let out = hook(&path, &["serve"])?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
    }
    Ok(())
}

#[test]
fn a_failure_that_is_not_the_config_still_exits_1() -> anyhow::Result<()> {
    // The spool directory cannot be made (its parent is a file): systemd may retry that.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("file"), "")?;
    let path = dir.path().join("hook.toml");
    std::fs::write(
        &path,
        format!(
            "spool_dir = \"{}\"\n",
            dir.path().join("file/spool").to_string_lossy()
        ),
    )?;
    let out = hook(&path, &["drain"])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    Ok(())
}

#[test]
fn install_refuses_a_bad_config_and_writes_no_hook() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("shop.git");
    git::init_bare(&bare)?;
    let path = config(dir.path(), "max_commits = \"many\"\n")?;
    let out = hook(&path, &["install", &bare.to_string_lossy()])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("max_commits"), "{err}");
    assert!(err.contains(&path.to_string_lossy().into_owned()), "{err}");
    assert!(err.contains("the hook was not installed"), "{err}");
    assert!(!bare.join("hooks/post-receive").exists());
    Ok(())
}

/// A config broken after install: the push still succeeds, with one line saying why it was
/// not announced (docs/git-hooks.md: the hook exits 0 whatever happens).
#[test]
fn the_hook_with_a_broken_config_lets_the_push_through() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("shop.git");
    git::init_bare(&bare)?;
    let path = config(dir.path(), "budget_ms = 300\n")?;
    let out = hook(&path, &["install", &bare.to_string_lossy()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    config(dir.path(), "budget_msec = 300\n")?;

    let work = dir.path().join("work");
    git::init(&work)?;
    git::commit_file(&work, "a.txt", "1", "first")?;
    let out = Command::new("git")
        .current_dir(&work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("CONVOY_CONFIG")
        .args(["push", "-q"])
        .arg(&bare)
        .arg("main")
        .output()?;
    let err = stderr(&out);
    assert!(out.status.success(), "the push must not fail: {err}");
    assert!(
        err.contains("convoy: push not announced: config file") && err.contains("budget_msec"),
        "{err}"
    );
    assert_eq!(
        git(&bare, &["rev-parse", "main"])?,
        git(&work, &["rev-parse", "HEAD"])?
    );
    Ok(())
}
