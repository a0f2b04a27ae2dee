//! The demo fleet on disk: one directory per host with its agent, fetcher and heartbeat
//! configs, the conductor's config with two stages and a manual gate, the central
//! repository's hook config, and the signing keys — all written as an operator would write
//! them under `/etc/convoy/`.

use anyhow::Context;
use convoy_message::names::HostName;
use convoy_message::routing::queue;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The app the demo deploys.
pub const APP: &str = "hello";
/// The tag the demo releases.
pub const TAG: &str = "v1.0.0";

/// One demo host.
pub struct Host {
    pub name: String,
    /// `staging` or `prod`.
    pub stage: &'static str,
    pub dir: PathBuf,
    /// The app's root: `releases/`, `current`, `shared/`.
    pub root: PathBuf,
    /// Where its copy of the app listens.
    pub port: u16,
}

/// Everything the demo writes and starts, and where.
pub struct Fleet {
    pub dir: PathBuf,
    /// The broker URL of daemons without a user of their own in `urls`.
    pub amqp_url: String,
    /// Each daemon's own broker URL (its least-privilege user), by `conductor`, `hook`,
    /// `ci`, `agent-<host>`, `fetcher-<host>`, `heartbeat-<host>`.
    pub urls: BTreeMap<String, String>,
    pub exchange: String,
    /// The conductor's address.
    pub listen: String,
    /// The API token the demo (and the commands it prints) use.
    pub token: String,
    /// The dashboard login: `admin` and this password.
    pub password: String,
    pub hosts: Vec<Host>,
}

impl Fleet {
    pub fn keys(&self) -> PathBuf {
        self.dir.join("keys")
    }
    pub fn trusted(&self) -> PathBuf {
        self.dir.join("trusted-keys")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// The central repository (bare), with convoy-hook installed.
    pub fn origin(&self) -> PathBuf {
        self.dir.join("git").join(format!("{APP}.git"))
    }
    /// A developer's clone.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn hook_config(&self) -> PathBuf {
        self.dir.join("git/hook.toml")
    }
    pub fn ci_config(&self) -> PathBuf {
        self.dir.join("ci/ci.toml")
    }
    pub fn conductor_config(&self) -> PathBuf {
        self.dir.join("conductor/conductor.toml")
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The `amqp_url` and `exchange` lines of one daemon's config.
    fn bus(&self, key: &str) -> String {
        let url = self.urls.get(key).unwrap_or(&self.amqp_url);
        format!("amqp_url = {}\nexchange = {}\n", q(url), q(&self.exchange))
    }

    /// The queues the demo's daemons declare (deleted from a shared broker at the end).
    pub fn queues(&self) -> Vec<String> {
        let ex = &self.exchange;
        let mut q = vec![
            queue::dead(ex),
            queue::conductor(ex),
            queue::heartbeats(ex),
            queue::progress(ex),
        ];
        for h in &self.hosts {
            if let Ok(name) = HostName::new(h.name.as_str()) {
                q.push(queue::commands(ex, &name));
                q.push(queue::fetcher(ex, &name));
            }
        }
        q
    }

    /// Writes every config file and the signing keys.
    pub fn write(&self) -> anyhow::Result<()> {
        for d in [
            self.keys(),
            self.trusted(),
            self.logs(),
            self.dir.join("git/spool"),
            self.dir.join("ci"),
            self.dir.join("conductor/state"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let key = convoy_message::KeyPair::generate("demo")?;
        let (private, public) = key.write_files(&self.keys())?;
        std::fs::copy(&public, self.trusted().join("demo.pub"))?;

        write(
            &self.hook_config(),
            &format!(
                "# convoy-hook, as the central git server runs it (post-receive).\n{}\
                 repo = {}\nspool_dir = {}\nbudget_ms = 2000\n",
                self.bus("hook"),
                q(APP),
                q(self.dir.join("git/spool").display())
            ),
        )?;
        write(
            &self.ci_config(),
            &format!(
                "# convoy-ci notify: the demo plays the CI job that reports a build.\n{}",
                self.bus("ci")
            ),
        )?;
        write(
            &self.conductor_config(),
            &self.conductor_toml(&self.bus("conductor"), &private)?,
        )?;
        // It holds the API token in clear.
        std::fs::set_permissions(
            self.conductor_config(),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        for h in &self.hosts {
            self.write_host(h)?;
        }
        Ok(())
    }

    fn conductor_toml(&self, bus: &str, signing_key: &Path) -> anyhow::Result<String> {
        let names = |stage: &str| {
            let list: Vec<String> = self
                .hosts
                .iter()
                .filter(|h| h.stage == stage)
                .map(|h| q(&h.name))
                .collect();
            format!("[{}]", list.join(", "))
        };
        let hash = crate::secret::hash_password(&self.password)?;
        Ok(format!(
            "# convoy-conductor for the demo fleet (docs/conductor.md explains every key).\n{bus}\
state_dir = {state}\nsigning_key = {key}\nlisten = {listen}\n\n\
# The CLI's token (CONVOY_TOKEN) and the dashboard's login.\n\
[[tokens]]\nname = \"demo\"\ntoken = {token}\nrole = \"deployer\"\n\n\
[[users]]\nname = \"admin\"\npassword_hash = {hash}\nrole = \"deployer\"\n\n\
[apps.{APP}]\nrepo = \"{APP}\"\n\n\
# A tag whose build succeeded starts a pipeline: staging, a manual gate, then prod.\n\
[apps.{APP}.pipeline]\nauto_deploy = true\nrefs = [\"refs/tags/v*\"]\n\n\
[[apps.{APP}.stages]]\nname = \"staging\"\nhosts = {staging}\ngate = {{ kind = \"manual\" }}\n\
[apps.{APP}.stages.strategy]\nbatches = 1\nhost_deadline_s = 60\n\n\
[[apps.{APP}.stages]]\nname = \"prod\"\nhosts = {prod}\n\
[apps.{APP}.stages.strategy]\nbatches = [1, \"50%\"]\nhost_deadline_s = 60\non_failure = \"rollback\"\n",
            state = q(self.dir.join("conductor/state").display()),
            key = q(signing_key.display()),
            listen = q(&self.listen),
            token = q(&self.token),
            hash = q(&hash),
            staging = names("staging"),
            prod = names("prod"),
        ))
    }

    fn write_host(&self, h: &Host) -> anyhow::Result<()> {
        let bus = |daemon: &str| self.bus(&format!("{daemon}-{}", h.name));
        for d in [h.dir.join("state"), h.dir.join("mirrors"), h.root.clone()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let host = format!("host = {}\n", q(&h.name));
        write(
            &h.dir.join("agent.toml"),
            &format!(
                "# convoy-agent on {name} (docs/host.md).\n{bus}{host}\
state_dir = {state}\nmirror_dir = {mirrors}\ntrusted_keys_dir = {trusted}\nkeep_releases = 3\n\n\
[apps.{APP}]\nroot = {root}\nenv = {{ APP_PORT = \"{port}\" }}\n\n\
# The app's own scripts, run in the release directory.\n\
[apps.{APP}.hooks]\nbuild = [\"/bin/sh\", \"bin/build\"]\n\n\
[apps.{APP}.health]\ncommand = [\"/bin/sh\", \"bin/health\"]\ninterval_ms = 200\ndeadline_s = 5\n",
                name = h.name,
                bus = bus("agent"),
                state = q(h.dir.join("state").display()),
                mirrors = q(h.dir.join("mirrors").display()),
                trusted = q(self.trusted().display()),
                root = q(h.root.display()),
                port = h.port,
            ),
        )?;
        write(
            &h.dir.join("fetcher.toml"),
            &format!(
                "# convoy-fetcher on {name}: a mirror of the central repository.\n{bus}{host}\
mirror_dir = {mirrors}\ndebounce_ms = 100\n\n[repos.{APP}]\nurl = {origin}\n",
                name = h.name,
                bus = bus("fetcher"),
                mirrors = q(h.dir.join("mirrors").display()),
                origin = q(self.origin().display()),
            ),
        )?;
        write(
            &h.dir.join("heartbeat.toml"),
            &format!(
                "# convoy-heartbeat on {name}.\n{bus}{host}interval_s = 2\nagent_config = {agent}\n\n\
[labels]\nrole = \"web\"\nstage = \"{stage}\"\n",
                name = h.name,
                bus = bus("heartbeat"),
                agent = q(h.dir.join("agent.toml").display()),
                stage = h.stage,
            ),
        )?;
        Ok(())
    }
}

/// `s` as a TOML string, quoted and escaped.
fn q(s: impl std::fmt::Display) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
