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

/// One call may take this long before it is killed (a node that does not answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `rabbitmqctl` is looked for when it is not on `PATH` (it lives in `/usr/sbin`,
/// which is not on an ordinary user's `PATH`).
const KNOWN_PLACES: [&str; 2] = ["/usr/sbin/rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl"];

/// A `rabbitmqctl` talking to one node.
pub struct Rabbitmqctl {
    program: PathBuf,
    node: Option<String>,
}

impl Rabbitmqctl {
    /// `program` (a path, or a name looked up on `PATH` and then in the usual places);
    /// `node` is passed as `-n` (default: the local node).
    pub fn new(program: &Path, node: Option<String>) -> anyhow::Result<Self> {
        let program = find(program).with_context(|| {
            format!(
                "cannot find {}: run `convoy bus setup` on a machine of the broker (where \
                 rabbitmq-server is installed), or pass --rabbitmqctl PATH",
                program.display()
            )
        })?;
        Ok(Self { program, node })
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
            if started.elapsed() > CALL_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} did not finish within {CALL_TIMEOUT:?}: is the RabbitMQ node running?"
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

    /// The virtual hosts' names.
    pub fn vhosts(&self) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["list_vhosts", "name", "--formatter", "json"], None)?;
        names(&out, "name").context("reading `rabbitmqctl list_vhosts` output")
    }

    /// The users' names.
    pub fn users(&self) -> anyhow::Result<Vec<String>> {
        let out = self.run(&["list_users", "--formatter", "json"], None)?;
        names(&out, "user").context("reading `rabbitmqctl list_users` output")
    }

    pub fn add_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.run(&["add_vhost", vhost], None).map(drop)
    }

    pub fn add_user(&self, user: &str, password: &str) -> anyhow::Result<()> {
        self.run(&["add_user", user], Some(password)).map(drop)
    }

    pub fn change_password(&self, user: &str, password: &str) -> anyhow::Result<()> {
        self.run(&["change_password", user], Some(password))
            .map(drop)
    }

    /// Full configure / write / read permissions on `vhost` (for the administrator that
    /// declares the topology in a virtual host `bus setup` created).
    pub fn grant_all(&self, vhost: &str, user: &str) -> anyhow::Result<()> {
        self.run(
            &["set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            None,
        )
        .map(drop)
    }

    /// `set_permissions` and `set_topic_permissions` (on `exchange`) of `grants`.
    pub fn grant(
        &self,
        vhost: &str,
        user: &str,
        exchange: &str,
        grants: &Grants,
    ) -> anyhow::Result<()> {
        self.run(
            &[
                "set_permissions",
                "-p",
                vhost,
                user,
                &grants.configure,
                &grants.write,
                &grants.read,
            ],
            None,
        )?;
        self.run(
            &[
                "set_topic_permissions",
                "-p",
                vhost,
                user,
                exchange,
                &grants.topic_write,
                &grants.topic_read,
            ],
            None,
        )
        .map(drop)
    }
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

/// The `field` of each object in rabbitmqctl's JSON list output.
fn names(json: &str, field: &str) -> anyhow::Result<Vec<String>> {
    let trimmed = json.trim();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(trimmed)?;
    Ok(list
        .iter()
        .filter_map(|v| v[field].as_str().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_list_output() {
        let out = "[\n{\"user\":\"a\",\"tags\":[]}\n,{\"user\":\"guest\",\"tags\":[\"administrator\"]}\n]\n";
        assert_eq!(super::names(out, "user").unwrap(), vec!["a", "guest"]);
        assert!(super::names("", "user").unwrap().is_empty());
    }
}
