//! Repositories made with the real git CLI, with a fixed identity and no user config.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;

/// Runs `git <args>` in `dir` and returns its trimmed stdout; fails with stderr.
pub fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Test Author")
        .env("GIT_COMMITTER_EMAIL", "author@example.com")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `git init --bare <path>`.
pub fn init_bare(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    git(path, &["init", "--bare", "-q"])?;
    Ok(())
}

/// `git init <path>` (a work tree).
pub fn init(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    git(path, &["init", "-q"])?;
    Ok(())
}

/// Writes `file` with `content`, commits everything, returns the new commit id.
pub fn commit_file(
    work: &Path,
    file: &str,
    content: &str,
    message: &str,
) -> anyhow::Result<String> {
    let path = work.join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, content)?;
    git(work, &["add", "-A"])?;
    git(work, &["commit", "-q", "-m", message])?;
    git(work, &["rev-parse", "HEAD"])
}

/// The commit `rev` resolves to.
pub fn rev_parse(dir: &Path, rev: &str) -> anyhow::Result<String> {
    git(dir, &["rev-parse", rev])
}
