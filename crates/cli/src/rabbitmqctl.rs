//! `rabbitmqctl`, run as a program with arguments (never through a shell), for what AMQP
//! cannot do: virtual hosts, users, permissions. It works on the broker's machine, as root
//! or the `rabbitmq` user (it needs the node's Erlang cookie); the management plugin is not
//! needed.

use anyhow::{Context, bail};
use convoy_bus::permissions::Grants;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `rabbitmqctl` is looked for when it is not on `PATH` (it lives in `/usr/sbin`,
/// which is not on an ordinary user's `PATH`).
const KNOWN_PLACES: [&str; 2] = ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"];

/// A `rabbitmqctl` talking to one node.
pub struct Rabbitmqctl {
    program: PathBuf,
    node: Option<String>,
    /// One call may take this long before it is killed (a node that does not answer).
    timeout: Duration,
}

impl Rabbitmqctl {
    /// `program` (a path, or a name looked up on `PATH` and then in the usual places);
    /// `node` is passed as `-n` (default: the local node); a call taking longer than
    /// `timeout` is killed.
    pub fn new(program: &Path, node: Option<String>, timeout: Duration) -> anyhow::Result<Self> {
        let program = find(program).with_context(|| {
            format!(
                "cannot find {}: run `convoy bus setup` on a machine of the broker (where \
                 rabbitmq-server is installed), or pass --rabbitmqctl PATH",
                program.display()
            )
        })?;
        Ok(Self {
            program,
            node,
            timeout,
        })
    }

    /// Runs `rabbitmqctl -q [-n node] args…`, feeding `stdin` (passwords travel there, not
    /// on the command line where `ps` shows them). Returns its standard output.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.program);
        cmd.arg("-q");
        if let Some(node) = &self.node {
            cmd.args(["-n", node]);
        }
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("rabbitmqctl {}", args.first().copied().unwrap_or(""));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(format!("{text}\n").as_bytes())
                .with_context(|| format!("{what}: writing to its standard input"))?;
        }
        // Read both pipes on threads so a chatty child never blocks on a full pipe.
        let out = child.stdout.take().map(reader);
        let err = child.stderr.take().map(reader);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > self.timeout {
                // Debian's rabbitmqctl is a script that runs `su`, which runs the Erlang VM
                // in a session of its own: kill the whole tree, not just the script.
                for pid in descendants(child.id()).into_iter().rev() {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} did not finish within {:?}: is the RabbitMQ node running and answering?",
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        if !status.success() {
            let detail = if stderr.trim().is_empty() {
                stdout.trim()
            } else {
                stderr.trim()
            };
            let hint = if detail.contains("cookie") || detail.contains("nodedown") {
                " (rabbitmqctl must run as root or the rabbitmq user on a machine of the \
                 broker; pass --node NAME for a node other than the local default)"
            } else {
                ""
            };
            bail!("{what} failed ({status}): {detail}{hint}");
        }
        Ok(stdout)
    }

    /// What the broker holds now: virtual hosts, users, permissions (`export_definitions`).
    pub fn definitions(&self) -> anyhow::Result<Definitions> {
        let out = self.run(&["export_definitions", "-", "--format", "json"], None)?;
        serde_json::from_str(out.trim()).context("reading `rabbitmqctl export_definitions` output")
    }

    /// Deletes a virtual host and everything in it.
    pub fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.run(&["delete_vhost", vhost], None).map(drop)
    }

    /// Deletes users, a few calls at a time (there is no call for several).
    pub fn delete_users(&self, users: &[String]) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for chunk in users.chunks(4) {
            std::thread::scope(|scope| {
                let calls: Vec<_> = chunk
                    .iter()
                    .map(|u| scope.spawn(move || self.run(&["delete_user", u], None)))
                    .collect();
                for (call, user) in calls.into_iter().zip(chunk) {
                    match call.join() {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => failures.push(format!("{user}: {e:#}")),
                        Err(_) => failures.push(format!("{user}: the call panicked")),
                    }
                }
            });
        }
        if !failures.is_empty() {
            bail!("could not delete {}", failures.join("; "));
        }
        Ok(())
    }

    /// Applies `definitions` (users, permissions, topic permissions, virtual hosts) in one
    /// call: each rabbitmqctl call starts an Erlang VM, about half a second, which three
    /// calls per user (`add_user`, `set_permissions`, `set_topic_permissions`) would
    /// multiply. The document travels on standard input, so no password hash shows in `ps`.
    pub fn import(&self, definitions: &serde_json::Value) -> anyhow::Result<()> {
        self.run(&["import_definitions"], Some(&definitions.to_string()))
            .map(drop)
    }
}

/// The parts of `export_definitions` that `bus setup` reads.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Definitions {
    #[serde(default)]
    pub vhosts: Vec<NameOnly>,
    #[serde(default)]
    pub users: Vec<NameOnly>,
    #[serde(default)]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub topic_permissions: Vec<TopicPermission>,
    #[serde(default)]
    pub queues: Vec<QueueDefinition>,
}

#[derive(Debug, serde::Deserialize)]
pub struct QueueDefinition {
    pub name: String,
    pub vhost: String,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, serde::Deserialize)]
pub struct NameOnly {
    pub name: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct Permission {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct TopicPermission {
    pub user: String,
    pub vhost: String,
    pub exchange: String,
    pub write: String,
    pub read: String,
}

impl Definitions {
    pub fn has_vhost(&self, vhost: &str) -> bool {
        self.vhosts.iter().any(|v| v.name == vhost)
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDefinition> {
        self.queues
            .iter()
            .find(|q| q.vhost == vhost && q.name == name)
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.users.iter().any(|u| u.name == user)
    }

    /// Whether `user` has exactly `grants` in `vhost` (topic permissions on `exchange`).
    pub fn grants_match(&self, vhost: &str, user: &str, exchange: &str, grants: &Grants) -> bool {
        let perms = self.permissions.iter().any(|p| {
            p.user == user
                && p.vhost == vhost
                && p.configure == grants.configure
                && p.write == grants.write
                && p.read == grants.read
        });
        let topic = self.topic_permissions.iter().any(|t| {
            t.user == user
                && t.vhost == vhost
                && t.exchange == exchange
                && t.write == grants.topic_write
                && t.read == grants.topic_read
        });
        perms && topic
    }
}

/// A password as RabbitMQ's `rabbit_password_hashing_sha256` stores it: base64 of a 4-byte
/// random salt followed by SHA-256(salt ‖ password).
pub fn password_hash(password: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let mut salt = [0u8; 4];
    getrandom::fill(&mut salt)
        .map_err(|e| anyhow::anyhow!("the system's random number source failed: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(salted_sha256(salt, password)))
}

fn salted_sha256(salt: [u8; 4], password: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&hasher.finalize());
    out
}

/// Every process below `root` (children before grandchildren), from `/proc`.
fn descendants(root: u32) -> Vec<nix::unistd::Pid> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(") ")?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
        .into_iter()
        .map(|p| nix::unistd::Pid::from_raw(p as i32))
        .collect()
}

fn reader<R: std::io::Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// `program` if it is a path, else the first match on `PATH`, else a known place.
fn find(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        (program == Path::new("rabbitmqctl"))
            .then(|| KNOWN_PLACES.iter().map(PathBuf::from).find(|p| p.is_file()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashes_passwords_as_rabbitmq_does() {
        use base64::Engine;
        // The example of RabbitMQ's password guide: salt 908D C60A, password "test12".
        let hash = super::salted_sha256([0x90, 0x8d, 0xc6, 0x0a], "test12");
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(hash),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
    }
}
