//! A whole fleet under test: a real origin repository with the real convoy-hook installed,
//! one shared mirror, N hosts each with a real convoy-agent process, a conductor process,
//! and the `convoy` CLI — all on a unique exchange of the shared broker (or a private node).
#![allow(dead_code)]

use convoy_message::KeyPair;
use convoy_testkit::git::{self, git};
use convoy_testkit::{Daemon, TestBus, wait_until};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const DEPLOYER_TOKEN: &str = "test-deployer-token-0001";
pub const VIEWER_TOKEN: &str = "test-viewer-token-00001";

pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub agent: Option<Daemon>,
    /// With [`Setup::host_daemons`]: the host's own convoy-fetcher and convoy-heartbeat.
    pub fetcher: Option<Daemon>,
    pub heartbeat: Option<Daemon>,
    pub fetcher_config: PathBuf,
    pub heartbeat_config: PathBuf,
}

impl Host {
    /// `current` as a release id.
    pub fn current(&self) -> Option<String> {
        std::fs::read_link(self.root.join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Lines the hooks wrote: `<step> <release> <nanoseconds>`.
    pub fn hook_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many times the build hook ran for `release`.
    pub fn builds_of(&self, release: &str) -> usize {
        self.hook_lines()
            .iter()
            .filter(|l| l.starts_with(&format!("build {release} ")))
            .count()
    }

    /// The time (ns) a hook step first ran for `release`.
    pub fn time_of(&self, step: &str, release: &str) -> Option<u128> {
        self.hook_lines().iter().find_map(|l| {
            let mut parts = l.split(' ');
            (parts.next() == Some(step) && parts.next() == Some(release))
                .then(|| parts.next().and_then(|t| t.parse().ok()))
                .flatten()
        })
    }

    /// Makes the health check fail (or pass again).
    pub fn set_unhealthy(&self, unhealthy: bool) {
        let marker = self.dir.join("unhealthy");
        if unhealthy {
            let _ = std::fs::write(marker, "");
        } else {
            let _ = std::fs::remove_file(marker);
        }
    }

    /// The next build stops this host's agent (SIGSTOP) and then fails, as a host that
    /// hangs mid-deploy; [`Host::thaw`] lets the agent go on.
    pub fn freeze_next_build(&self) -> anyhow::Result<()> {
        Ok(std::fs::write(self.dir.join("freeze"), "")?)
    }

    /// Sends SIGCONT to the agent a frozen build stopped.
    pub fn thaw(&self) {
        if let Some(agent) = &self.agent {
            agent.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Command directories in the agent's journal.
    pub fn journal_entries(&self) -> usize {
        std::fs::read_dir(self.dir.join("state/journal"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

pub struct Fleet {
    pub origin: PathBuf,
    pub work: PathBuf,
    pub mirrors: PathBuf,
    pub hosts: Vec<Host>,
    pub conductor: Option<Daemon>,
    pub conductor_config: PathBuf,
    pub port: u16,
    http: ureq::Agent,
    // Dropped last (fields drop in order): agents and conductor are stopped first, or they
    // would declare their queues again after the bus cleanup deleted them.
    pub tb: TestBus,
    pub dir: tempfile::TempDir,
}

/// Options for [`Fleet::new`].
pub struct Setup<'a> {
    pub hosts: usize,
    /// `[apps.web]` and its stages, as TOML, with `{hosts}` replaced by the host list.
    pub apps: &'a str,
    /// Seconds the build hook sleeps (to give a test time to act mid-rollout).
    pub build_sleep: f64,
    pub amqp_url: Option<String>,
    /// Each host gets its own mirror kept by a real convoy-fetcher (which reports its refs
    /// to the conductor) and a real convoy-heartbeat with label `role=web`; otherwise the
    /// hosts share one mirror the test fetches itself.
    pub host_daemons: bool,
    /// More conductor configuration (TOML appended to the file), e.g. `[[users]]`.
    pub conductor_extra: String,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Self {
            hosts: 3,
            apps: "[apps.web]\n[[apps.web.stages]]\nname = \"prod\"\nhosts = {hosts}\n",
            build_sleep: 0.0,
            amqp_url: None,
            host_daemons: false,
            conductor_extra: String::new(),
        }
    }
}

impl Fleet {
    pub async fn new(setup: Setup<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().to_path_buf();
        let tb = match &setup.amqp_url {
            Some(url) => TestBus::on(url),
            None => TestBus::new(),
        };
        let origin = d.join("origin/web.git");
        git::init_bare(&origin)?;
        let hook = convoy_testkit::workspace_bin("convoy-hook", "convoy-hook");
        let out = Command::new(&hook).arg("install").arg(&origin).output()?;
        anyhow::ensure!(
            out.status.success(),
            "hook install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let work = d.join("work");
        git::init(&work)?;
        git(
            &work,
            &[
                "remote",
                "add",
                "origin",
                origin.to_str().unwrap_or_default(),
            ],
        )?;
        git::commit_file(&work, "index.html", "v0\n", "first")?;
        git(&work, &["tag", "v0"])?;
        let mirrors = d.join("mirrors");
        std::fs::create_dir_all(&mirrors)?;

        let keys = d.join("keys");
        std::fs::create_dir_all(&keys)?;
        let key = KeyPair::generate("test-conductor")?;
        let (private, _) = key.write_files(&keys)?;
        let trusted = d.join("trusted");
        std::fs::create_dir_all(&trusted)?;
        std::fs::copy(
            keys.join("test-conductor.pub"),
            trusted.join("test-conductor.pub"),
        )?;

        let prefix = convoy_testkit::unique("h").replace('_', "-");
        let mut hosts = Vec::new();
        for i in 0..setup.hosts {
            let name = format!("{prefix}-{i:02}");
            let hdir = d.join(&name);
            std::fs::create_dir_all(&hdir)?;
            let log = hdir.join("hooks.log");
            let root = hdir.join("apps/web");
            let config = hdir.join("agent.toml");
            let host_mirrors = if setup.host_daemons {
                hdir.join("mirrors")
            } else {
                mirrors.clone()
            };
            let line = |step: &str| {
                format!(
                    "{step} = \"echo {step} $CONVOY_RELEASE $(date +%s%N) >> {}\"\n",
                    log.display()
                )
            };
            // With a `freeze` marker the build stops its agent (SIGSTOP; the test sends
            // SIGCONT) and fails, once.
            let build = format!(
                "build = \"echo build $CONVOY_RELEASE $(date +%s%N) >> {log}; sleep {sleep}; \
                 if [ -e {freeze} ]; then rm -f {freeze}; kill -STOP $PPID; exit 1; fi\"\n",
                log = log.display(),
                sleep = setup.build_sleep,
                freeze = hdir.join("freeze").display(),
            );
            let toml = format!(
                "host = \"{name}\"\nstate_dir = \"{state}\"\nmirror_dir = \"{mirrors}\"\ntrusted_keys_dir = \"{trusted}\"\nkeep_releases = 5\n\n\
[apps.web]\nroot = \"{root}\"\n\n[apps.web.hooks]\n{build}{pre}{post}\n\
[apps.web.health]\ncommand = \"test ! -e {marker}\"\ninterval_ms = 100\ndeadline_s = 1\n",
                state = hdir.join("state").display(),
                mirrors = host_mirrors.display(),
                trusted = trusted.display(),
                root = root.display(),
                pre = line("pre_switch"),
                post = line("post_switch"),
                marker = hdir.join("unhealthy").display(),
            );
            std::fs::write(&config, toml)?;
            let fetcher_config = hdir.join("fetcher.toml");
            std::fs::write(
                &fetcher_config,
                format!(
                    "host = \"{name}\"\nmirror_dir = \"{}\"\ndebounce_ms = 50\n\n[repos.web]\nurl = \"{}\"\n",
                    host_mirrors.display(),
                    origin.display()
                ),
            )?;
            let heartbeat_config = hdir.join("heartbeat.toml");
            std::fs::write(
                &heartbeat_config,
                format!(
                    "host = \"{name}\"\ninterval_s = 1\nagent_config = \"{}\"\n\n[labels]\nrole = \"web\"\n",
                    config.display()
                ),
            )?;
            let host_name = convoy_message::names::HostName::new(name.as_str())?;
            tb.track(convoy_message::routing::queue::commands(
                &tb.exchange,
                &host_name,
            ));
            // Declared by the host's fetcher when the fleet has host daemons.
            tb.track(convoy_message::routing::queue::fetcher(
                &tb.exchange,
                &host_name,
            ));
            hosts.push(Host {
                name,
                dir: hdir,
                root,
                config,
                log,
                agent: None,
                fetcher: None,
                heartbeat: None,
                fetcher_config,
                heartbeat_config,
            });
        }
        let host_list = format!(
            "[{}]",
            hosts
                .iter()
                .map(|h| format!("\"{}\"", h.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let port = convoy_testkit::free_port();
        let conductor_config = d.join("conductor.toml");
        let toml = format!(
            "state_dir = \"{state}\"\nsigning_key = \"{key}\"\nlisten = \"127.0.0.1:{port}\"\n\n\
[[tokens]]\nname = \"deployer\"\ntoken = \"{DEPLOYER_TOKEN}\"\nrole = \"deployer\"\n\n\
[[tokens]]\nname = \"viewer\"\ntoken = \"{VIEWER_TOKEN}\"\nrole = \"viewer\"\n\n{extra}\n\n{apps}\n",
            extra = setup.conductor_extra,
            state = d.join("conductor").display(),
            key = private.display(),
            apps = hosts.iter().enumerate().fold(
                setup.apps.replace("{hosts}", &host_list),
                |apps, (i, h)| {
                    apps.replace(&format!("{{host{i}}}"), &format!("\"{}\"", h.name))
                }
            ),
        );
        std::fs::write(&conductor_config, toml)?;
        tb.track(convoy_message::routing::queue::conductor(&tb.exchange));
        tb.track(convoy_message::routing::queue::heartbeats(&tb.exchange));
        tb.track(convoy_message::routing::queue::progress(&tb.exchange));
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .new_agent();
        Ok(Self {
            dir,
            tb,
            origin,
            work,
            mirrors,
            hosts,
            conductor: None,
            conductor_config,
            port,
            http,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let agent_bin = convoy_testkit::workspace_bin("convoy-agent", "convoy-agent");
        // Agent and fetcher run convoy-git, found beside them.
        convoy_testkit::workspace_bin("convoy-git", "convoy-git");
        let h = &mut self.hosts[i];
        let config = h.config.to_string_lossy().into_owned();
        let n = std::fs::read_dir(&h.dir)?.count();
        h.agent = Some(Daemon::spawn(
            &format!("agent-{n}"),
            &agent_bin,
            &["--config", &config],
            &self.tb.env(),
            &h.dir,
        )?);
        Ok(())
    }

    /// Starts host `i`'s convoy-fetcher and convoy-heartbeat ([`Setup::host_daemons`]).
    pub fn start_host_daemons(&mut self, i: usize) -> anyhow::Result<()> {
        let env = self.tb.env();
        convoy_testkit::workspace_bin("convoy-git", "convoy-git");
        let h = &mut self.hosts[i];
        for (kind, config) in [
            ("fetcher", h.fetcher_config.clone()),
            ("heartbeat", h.heartbeat_config.clone()),
        ] {
            let package = format!("convoy-{kind}");
            let bin = convoy_testkit::workspace_bin(&package, &package);
            let config = config.to_string_lossy().into_owned();
            let daemon = Daemon::spawn(kind, &bin, &["--config", &config], &env, &h.dir)?;
            match kind {
                "fetcher" => h.fetcher = Some(daemon),
                _ => h.heartbeat = Some(daemon),
            }
        }
        Ok(())
    }

    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..self.hosts.len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// Starts the conductor and waits until it answers `/health`.
    pub async fn start_conductor(&mut self) -> anyhow::Result<()> {
        let config = self.conductor_config.to_string_lossy().into_owned();
        let n = std::fs::read_dir(self.path())?.count();
        let daemon = Daemon::spawn(
            &format!("conductor-{n}"),
            Path::new(env!("CARGO_BIN_EXE_convoy-conductor")),
            &["--config", &config],
            &self.tb.env(),
            self.dir.path(),
        )?;
        self.conductor = Some(daemon);
        let url = format!("{}/health", self.url());
        let http = self.http.clone();
        let log = || self.conductor.as_ref().map(Daemon::log).unwrap_or_default();
        wait_until(
            Duration::from_secs(30),
            "the conductor to answer /health",
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        http.get(&url).call().ok().filter(|r| r.status() == 200)
                    })
                    .await
                    .ok()
                    .flatten()
                    .map(|_| ())
                }
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
        Ok(())
    }

    pub fn conductor_log(&self) -> String {
        self.conductor.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Everything a failing test needs to see.
    pub fn logs(&self) -> String {
        let mut out = format!("--- conductor\n{}\n", self.conductor_log());
        for h in &self.hosts {
            if let Some(a) = &h.agent {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                out += &format!(
                    "--- {}\n{}\n",
                    h.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        out
    }

    /// Commits, tags and pushes through the real hook (which announces it on the bus).
    pub fn release(&self, tag: &str) -> anyhow::Result<String> {
        let sha = git::commit_file(&self.work, "index.html", &format!("{tag}\n"), tag)?;
        git(&self.work, &["tag", tag])?;
        let spool = self.path().join("spool");
        let out = Command::new("git")
            .current_dir(&self.work)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("CONVOY_SPOOL_DIR", &spool)
            .envs(self.tb.env())
            .args(["push", "-q", "origin", "main", "--tags"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "git push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The hosts' mirror (one shared by all test hosts), as their fetchers keep it.
        let mirror = self.mirrors.join("web.git");
        if mirror.exists() {
            git(&mirror, &["fetch", "-q", "--prune", "origin"])?;
        } else {
            git(
                self.path(),
                &[
                    "clone",
                    "-q",
                    "--mirror",
                    self.origin.to_str().unwrap_or_default(),
                    mirror.to_str().unwrap_or_default(),
                ],
            )?;
        }
        Ok(sha)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut resp = self
            .http
            .get(&format!("{}{path}", self.url()))
            .header("Authorization", format!("Bearer {DEPLOYER_TOKEN}"))
            .call()?;
        let text = resp.body_mut().read_to_string()?;
        anyhow::ensure!(
            resp.status().is_success(),
            "GET {path}: {} {text}",
            resp.status()
        );
        Ok(serde_json::from_str(&text)?)
    }

    /// Whether the audit log has a line of `action` by `actor`; `Err` shows the log.
    pub fn audited(&self, action: &str, actor: &str) -> anyhow::Result<()> {
        let audit = self.get("/api/audit")?;
        let found = audit
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["action"] == action && a["actor"] == actor);
        anyhow::ensure!(found, "no audit line of {actor}'s {action}: {audit:#}");
        Ok(())
    }

    /// A page that is not JSON (`/metrics`), without a token.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let mut resp = self.http.get(&format!("{}{path}", self.url())).call()?;
        Ok(resp.body_mut().read_to_string()?)
    }

    /// POST with a token; returns (status, body).
    /// GET `path` with `token` (none when empty): the status and the JSON body (or
    /// `{"raw": text}`).
    pub fn get_as(&self, token: &str, path: &str) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.get(&format!("{}{path}", self.url()));
        if !token.is_empty() {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        let mut resp = req.call()?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(json!({ "raw": text })),
        ))
    }

    pub fn post_as(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let mut resp = self
            .http
            .post(&format!("{}{path}", self.url()))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(body.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(json!({ "raw": text })),
        ))
    }

    /// Runs the `convoy` CLI against this conductor.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let bin = convoy_testkit::workspace_bin("convoy", "convoy");
        let url = self.url();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Ok(tokio::task::spawn_blocking(move || {
            Command::new(bin)
                .env("CONVOY_URL", url)
                .env("CONVOY_TOKEN", DEPLOYER_TOKEN)
                .args(&args)
                .output()
        })
        .await??)
    }

    /// Waits until rollout `id` is in one of `states`.
    pub async fn wait_state(
        &self,
        id: i64,
        states: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.get(&format!("/api/rollouts/{id}"))?;
            if states.iter().any(|s| r["state"] == *s) {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "rollout {id} is {} after {timeout:?}, not {states:?}\n{}\n{}",
                    r["state"],
                    serde_json::to_string_pretty(&r["summary"]).unwrap_or_default(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until at least `n` hosts of rollout `id` succeeded while it still runs.
    pub async fn wait_partway(&self, id: i64, n: u64) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(&format!("/api/rollouts/{id}"))?;
            let ok = r["summary"]["counts"]["succeeded"].as_u64().unwrap_or(0);
            if ok >= n {
                anyhow::ensure!(
                    r["state"] == "running",
                    "the rollout ended before the fault: {}",
                    r["summary"]
                );
                return Ok(r);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no progress\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The usual start of a test: the conductor and every agent running, and `tag`
    /// released and known to the conductor.
    pub async fn start_with(&mut self, tag: &str) -> anyhow::Result<()> {
        self.start_conductor().await?;
        self.start_agents()?;
        self.release(tag)?;
        self.wait_ref(tag).await
    }

    /// Waits until the conductor knows `tag` (the hook's push event arrived).
    pub async fn wait_ref(&self, tag: &str) -> anyhow::Result<()> {
        let body = json!({ "app": "web", "stage": self.first_stage()?, "ref": tag, "plan": true });
        let path = "/api/rollouts".to_owned();
        wait_until(
            Duration::from_secs(20),
            &format!("the conductor to learn {tag}"),
            || {
                let ok = self
                    .post_as(DEPLOYER_TOKEN, &path, &body)
                    .map(|(s, _)| s == 200)
                    .unwrap_or(false);
                async move { ok.then_some(()) }
            },
        )
        .await
    }

    fn first_stage(&self) -> anyhow::Result<String> {
        let apps = self.get("/api/apps")?;
        Ok(apps[0]["stages"][0]["name"]
            .as_str()
            .unwrap_or("prod")
            .to_owned())
    }

    /// Starts a deploy through the API; returns the rollout id.
    pub fn deploy(&self, tag: &str, stage: &str, strategy: Value) -> anyhow::Result<i64> {
        let (status, v) = self.post_as(
            DEPLOYER_TOKEN,
            "/api/rollouts",
            &json!({ "app": "web", "stage": stage, "ref": tag, "strategy": strategy }),
        )?;
        anyhow::ensure!(status == 201, "deploy {tag}: {status} {v}");
        v["id"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("no id in {v}"))
    }
}

/// The stdout and stderr of a CLI run, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// For benches: builds the binaries a fleet runs beside the bench (agent, convoy-git, hook, CLI) in the
/// bench's own profile, since `cargo bench` builds only the package's own.
pub fn build_siblings() -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let release = me.to_string_lossy().contains("/release/");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args([
        "build",
        "--quiet",
        "-p",
        "convoy-agent",
        "-p",
        "convoy-hook",
        "-p",
        "convoy",
        "-p",
        "convoy-git",
    ]);
    if release {
        cargo.arg("--release");
    }
    anyhow::ensure!(cargo.status()?.success(), "building the agent and hook");
    Ok(())
}
