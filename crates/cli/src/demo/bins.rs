//! The programs the demo runs: convoy's daemons next to this `convoy` (the same cargo target
//! directory, or the same install prefix) or on `PATH`, and `git` and `python3`.

use anyhow::bail;
use std::path::{Path, PathBuf};

/// Paths of everything the demo starts.
pub struct Bins {
    pub conductor: PathBuf,
    pub agent: PathBuf,
    pub fetcher: PathBuf,
    pub heartbeat: PathBuf,
    pub hook: PathBuf,
    pub ci: PathBuf,
    /// `convoy-git`, handed to agent and fetcher as `CONVOY_GIT` (they would otherwise look
    /// only beside themselves).
    pub git_helper: PathBuf,
    /// The git CLI.
    pub git: PathBuf,
    pub python: PathBuf,
}

const DAEMONS: [&str; 7] = [
    "convoy-conductor",
    "convoy-agent",
    "convoy-fetcher",
    "convoy-heartbeat",
    "convoy-hook",
    "convoy-ci",
    // Not started by the demo: agent and fetcher run it beside themselves for their git work.
    "convoy-git",
];

impl Bins {
    /// Finds them all, or names each one missing and how to get it.
    pub fn find() -> anyhow::Result<Self> {
        let here = std::env::current_exe()
            .ok()
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for name in DAEMONS {
            match here
                .as_ref()
                .map(|d| d.join(name))
                .filter(|p| p.is_file())
                .or_else(|| on_path(name))
            {
                Some(p) => found.push(p),
                None => missing.push(name),
            }
        }
        if !missing.is_empty() {
            let dir = here
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "this program's directory".into());
            // A cargo target directory (`target/<profile>/`) names the profile to build.
            let profile = here
                .as_ref()
                .filter(|d| d.parent().and_then(Path::file_name) == Some("target".as_ref()))
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                .map(|n| match n {
                    "release" => " --release".to_string(),
                    "debug" => String::new(),
                    other => format!(" --profile {other}"),
                })
                .unwrap_or_default();
            bail!(
                "the demo needs {} next to this convoy ({dir}) or on PATH: build them with \
                 `cargo build{profile} --workspace --bins` (scripts/demo does), or install the \
                 convoy-agent, convoy-conductor, convoy-hook and convoy-ci packages",
                missing.join(", ")
            );
        }
        let git = on_path("git")
            .ok_or_else(|| anyhow::anyhow!("the demo needs git on PATH (apt install git)"))?;
        let python = on_path("python3").ok_or_else(|| {
            anyhow::anyhow!(
                "the demo's web app runs on python3, which is not on PATH (apt install python3)"
            )
        })?;
        let mut it = found.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Ok(Self {
            conductor: next(),
            agent: next(),
            fetcher: next(),
            heartbeat: next(),
            hook: next(),
            ci: next(),
            git_helper: next(),
            git,
            python,
        })
    }
}

/// The first `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
