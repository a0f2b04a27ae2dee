//! A host under test: a real git origin and mirror, a signing key, an agent process.
#![allow(dead_code)]

use chrono::Utc;
use convoy_bus::{Bus, Outgoing, Publisher, Retry};
use convoy_message::names::{HostName, Name, RefName, ReleaseId, Sha};
use convoy_message::{Action, Body, Command, DeployResult, DeploySpec, KeyPair, Message, routing};
use convoy_testkit::git::{self, git};
use convoy_testkit::{Daemon, Tap, TestBus};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

pub struct Host {
    pub key: KeyPair,
    pub host: HostName,
    pub work: PathBuf,
    pub origin: PathBuf,
    pub mirror: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    pub hook_log: PathBuf,
    pub agent: Option<Daemon>,
    publisher: Publisher,
    // Dropped last (fields drop in order): the agent is stopped first, or it would declare
    // its queue again after the bus cleanup deleted it, and leave it on the broker.
    pub tb: TestBus,
    pub dir: tempfile::TempDir,
}

/// The default hooks: each appends `<step> <release> <commit> <ref> <app> <host>` to hooks.log.
/// A health check passing while the release has a file `healthy` (v1 has one; remove it
/// from the work tree to make the next release unhealthy).
pub const HEALTHY_FILE_CHECK: &str =
    "[apps.web.health]\ncommand = \"test -f healthy\"\ninterval_ms = 100\ndeadline_s = 1\n";

pub fn recording_hooks(log: &Path) -> String {
    let line = |step: &str| {
        format!(
            "{step} = \"echo {step} $CONVOY_RELEASE $CONVOY_COMMIT $CONVOY_REF $CONVOY_APP $CONVOY_HOST $CONVOY_PREVIOUS_RELEASE >> {}\"\n",
            log.display()
        )
    };
    format!(
        "[apps.web.hooks]\n{}{}{}{}",
        line("build"),
        line("pre_switch"),
        line("restart"),
        line("post_switch")
    )
}

impl Host {
    /// A host with app `web` whose repo has tag v1 (with a `healthy` file).
    pub async fn new() -> anyhow::Result<Self> {
        Self::with_extra("").await
    }

    /// `extra` is appended to agent.toml (more hooks, health checks, timeouts).
    pub async fn with_extra(extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let origin = d.join("origin/web.git");
        git::init_bare(&origin)?;
        let work = d.join("work");
        git::init(&work)?;
        git::commit_file(&work, "healthy", "yes\n", "v1")?;
        git(&work, &["tag", "v1"])?;
        git(
            &work,
            &[
                "remote",
                "add",
                "origin",
                origin.to_str().unwrap_or_default(),
            ],
        )?;
        git(&work, &["push", "-q", "origin", "main", "--tags"])?;
        let mirrors = d.join("mirrors");
        std::fs::create_dir_all(&mirrors)?;
        let mirror = mirrors.join("web.git");
        git(
            d,
            &[
                "clone",
                "-q",
                "--mirror",
                origin.to_str().unwrap_or_default(),
                mirror.to_str().unwrap_or_default(),
            ],
        )?;

        let keys = d.join("keys");
        std::fs::create_dir_all(&keys)?;
        let key = KeyPair::generate("test-signer")?;
        key.write_files(&keys)?;
        let tb = TestBus::new();
        let host = HostName::new(convoy_testkit::unique("host").replace('_', "-"))?;
        tb.track(convoy_message::routing::queue::commands(
            &tb.exchange,
            &host,
        ));
        let root = d.join("apps/web");
        let hook_log = d.join("hooks.log");
        let config = d.join("agent.toml");
        let toml = format!(
            "host = \"{host}\"\nstate_dir = \"{state}\"\nmirror_dir = \"{mirrors}\"\ntrusted_keys_dir = \"{keys}\"\nkeep_releases = 3\n\n[apps.web]\nroot = \"{root}\"\nshared = [\"log/\"]\nenv = {{ APP_MODE = \"test\" }}\n{hooks}\n{extra}\n",
            state = d.join("state").display(),
            mirrors = mirrors.display(),
            keys = keys.display(),
            root = root.display(),
            hooks = recording_hooks(&hook_log),
        );
        std::fs::write(&config, toml)?;
        let publisher = Publisher::new(Bus::new(tb.config(), "test-conductor")?);
        Ok(Self {
            dir,
            tb,
            key,
            host,
            work,
            origin,
            mirror,
            root,
            config,
            hook_log,
            agent: None,
            publisher,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the agent process (with optional extra environment, e.g. CONVOY_FAULT).
    pub fn start_agent(&mut self, extra_env: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut env = self.tb.env();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let config = self.config.to_string_lossy().to_string();
        // The agent runs convoy-git (beside it) for its exports.
        convoy_testkit::workspace_bin("convoy-git", "convoy-git");
        let n = std::fs::read_dir(self.path())?.count();
        let agent = Daemon::spawn(
            &format!("agent-{n}"),
            Path::new(env!("CARGO_BIN_EXE_convoy-agent")),
            &["--config", &config],
            &env,
            self.dir.path(),
        )?;
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Commits a file in the work tree, tags it, pushes, and updates the mirror.
    pub fn release(&self, tag: &str, file: &str, content: &str) -> anyhow::Result<Sha> {
        let sha = git::commit_file(&self.work, file, content, tag)?;
        git(&self.work, &["tag", tag])?;
        git(&self.work, &["push", "-q", "origin", "main", "--tags"])?;
        git(&self.mirror, &["fetch", "-q", "--prune", "origin"])?;
        Ok(Sha::new(sha)?)
    }

    pub fn sha_of(&self, rev: &str) -> anyhow::Result<Sha> {
        Ok(Sha::new(git::rev_parse(&self.work, rev)?)?)
    }

    pub fn command(&self, action: Action) -> Command {
        let now = Utc::now();
        Command {
            id: Uuid::now_v7(),
            host: self.host.clone(),
            issued_at: now,
            expires_at: now + chrono::Duration::minutes(10),
            issuer: "tester".into(),
            rollout: Some("r-1".into()),
            action,
        }
    }

    pub fn deploy_action(&self, tag: &str, release: &str) -> anyhow::Result<Action> {
        Ok(Action::Deploy(DeploySpec {
            app: Name::new("web")?,
            repo: Name::new("web")?,
            git_ref: RefName::new(format!("refs/tags/{tag}"))?,
            commit: self.sha_of(tag)?,
            release: ReleaseId::new(release)?,
            no_switch: false,
        }))
    }

    /// Publishes a message on `cmd.<host>` (waiting for the agent to declare its queue).
    pub async fn send(&self, message: &Message) -> anyhow::Result<()> {
        self.send_raw(Outgoing::with_key(message, routing::command(&self.host))?)
            .await
    }

    pub async fn send_raw(&self, out: Outgoing) -> anyhow::Result<()> {
        self.publisher
            .publish(&out, Retry::within(Duration::from_secs(20)))
            .await?;
        Ok(())
    }

    /// Signs and sends a command; returns its message.
    pub async fn order(&self, command: &Command) -> anyhow::Result<Message> {
        let message = self.key.command_message("conductor@test", command);
        self.send(&message).await?;
        Ok(message)
    }

    pub async fn results_tap(&self) -> anyhow::Result<Tap> {
        self.tb.tap(&["deploy.*.*.result"]).await
    }

    pub fn current(&self) -> Option<String> {
        std::fs::read_link(self.root.join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    pub fn hook_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.hook_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Deploys `tag` as `release` and waits for a successful result.
    pub async fn deploy_ok(
        &self,
        tap: &mut Tap,
        tag: &str,
        release: &str,
    ) -> anyhow::Result<DeployResult> {
        let cmd = self.command(self.deploy_action(tag, release)?);
        self.order(&cmd).await?;
        let result = next_result(tap, cmd.id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}\nagent log:\n{}", self.agent_log()))?;
        anyhow::ensure!(
            result.outcome == convoy_message::DeployOutcome::Succeeded,
            "deploy of {tag} failed: {:?}\n{}",
            result.error,
            self.agent_log()
        );
        Ok(result)
    }
}

/// The next result for `command_id` on a results tap (others are skipped).
pub async fn next_result(tap: &mut Tap, command_id: Uuid) -> anyhow::Result<DeployResult> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let tapped = tap.next(left).await?;
        if let Body::Result(r) = tapped.message()?.body
            && r.command_id == command_id
        {
            return Ok(r);
        }
    }
}
