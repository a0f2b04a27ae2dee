//! convoy against Ansible: the same release switch (export a commit from the host's mirror,
//! swap `current` atomically, run a health command, plus the fleet's three hooks) to N = 20
//! and N = 100 local hosts in batches of 10 %, as an Ansible play and as a convoy rollout,
//! in the same run on the same machine.
//!
//! `scripts/bench-ansible` (installs ansible-core into target/ansible-venv, then runs
//! `cargo bench -p convoy-conductor --bench ansible [-- 20|100]`); method and figures in
//! docs/benchmarks.md. The plays are in `benches/ansible/`.
//!
//! Per N: the test harness's fleet (N real `convoy-agent` processes, one shared mirror, a
//! real conductor) on a private RabbitMQ node when this machine can run one (so the broker's
//! CPU is convoy's alone; `CONVOY_BENCH_SHARED_BROKER=1` uses the shared broker); a warm-up of `v1` everywhere by both; then, timed, `v2` by the play
//! (`benches/ansible/release.yml`, one task per step of the agent) and `v2` by convoy
//! (`batches = ["10%"]`); then `v3` by the play written as one shell task per host
//! (`release-one-task.yml`), Ansible's floor. Each host's two app roots are separate
//! (`apps/web` for the agent, `apps/web-ansible` for the play), so each deploy is a real
//! switch from the release before it. Every run is checked: every host's `current` serves the
//! new tag.

#[path = "../tests/common/mod.rs"]
mod common;

use chrono::Utc;
use common::{Fleet, Setup};
use convoy_message::names::Sha;
use convoy_testkit::{BrokerNode, wait_until};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Ansible's forks: the batch size at N = 100 (10 % of 100), which an Ansible user deploying
/// in batches of 10 would set so a whole batch runs at once (the default, 5, would halve it).
const FORKS: usize = 10;

/// `ansible-playbook`: $CONVOY_ANSIBLE_PLAYBOOK, else the workspace's venv, else PATH.
fn find_playbook() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CONVOY_ANSIBLE_PLAYBOOK") {
        return Ok(p.into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/ansible-venv/bin/ansible-playbook");
    if venv.exists() {
        return Ok(venv);
    }
    let on_path = Command::new("ansible-playbook")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    anyhow::ensure!(
        on_path,
        "ansible-playbook not found: run scripts/bench-ansible (installs ansible-core into \
         target/ansible-venv) or set CONVOY_ANSIBLE_PLAYBOOK"
    );
    Ok("ansible-playbook".into())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Fields of `/proc/<pid>/stat` after the command name (`f[0]` is field 3, the state).
fn stat_fields(pid: &str) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect()
}

/// CPU seconds of a process and of its children it has waited for (the agents' hook and
/// health shells): utime + stime + cutime + cstime.
fn process_cpu(pid: i32) -> f64 {
    let f = stat_fields(&pid.to_string());
    (11..=14).filter_map(|i| f.get(i)).sum::<u64>() as f64 / clock_ticks()
}

/// CPU seconds of this bench process itself (its polling and bookkeeping), children out.
fn own_cpu() -> f64 {
    let f = stat_fields("self");
    (11..=12).filter_map(|i| f.get(i)).sum::<u64>() as f64 / clock_ticks()
}

/// CPU seconds of this process's children that have been waited for (ansible-playbook and
/// everything it forked and waited for), as getrusage(RUSAGE_CHILDREN) counts them.
fn waited_children_cpu() -> f64 {
    let f = stat_fields("self");
    (13..=14).filter_map(|i| f.get(i)).sum::<u64>() as f64 / clock_ticks()
}

/// The broker's CPU seconds: the private node's, or (on the shared broker) every RabbitMQ
/// node's on the machine, whoever's traffic it is.
fn broker_cpu(private: Option<i32>) -> f64 {
    if let Some(pid) = private {
        return process_cpu(pid);
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "beam.smp")
        })
        .map(|p| {
            let f = stat_fields(&p);
            (11..=12).filter_map(|i| f.get(i)).sum::<u64>() as f64 / clock_ticks()
        })
        .sum()
}

/// Busy CPU seconds of the whole machine so far (all cores; /proc/stat, idle and iowait out).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    total.saturating_sub(idle) as f64 / clock_ticks()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One timed deploy.
#[derive(Clone, Debug, Default)]
struct Measure {
    wall: f64,
    /// The deploying processes' CPU: ansible-playbook's tree, or conductor + agents.
    cpu: f64,
    /// RabbitMQ's CPU over the run (shared broker: includes other users' traffic).
    broker: f64,
    /// This bench process's own CPU over the run.
    bench: f64,
    /// Busy CPU of the whole machine over the run, everything included.
    machine: f64,
    load_before: String,
    /// convoy only: the conductor's own created → finished.
    inside: Option<f64>,
}

impl Measure {
    /// Busy CPU on the machine that was none of the bench's own: other people's work.
    fn others(&self) -> f64 {
        (self.machine - self.cpu - self.broker - self.bench).max(0.0)
    }
}

struct Ansible {
    playbook: PathBuf,
    dir: PathBuf,
    inventory: PathBuf,
    mirror: PathBuf,
    env: Vec<(String, String)>,
    broker: Option<i32>,
}

impl Ansible {
    /// An inventory with one host per fleet host (connection local, app root
    /// `<host dir>/apps/web-ansible`), and a quiet, self-contained Ansible configuration.
    fn new(fleet: &Fleet, playbook: PathBuf, broker: Option<i32>) -> anyhow::Result<Self> {
        let dir = fleet.path().join("ansible");
        std::fs::create_dir_all(&dir)?;
        let mut hosts = serde_json::Map::new();
        for h in &fleet.hosts {
            let root = h.dir.join("apps/web-ansible");
            std::fs::create_dir_all(root.join("releases"))?;
            hosts.insert(h.name.clone(), json!({ "root": root, "hostdir": h.dir }));
        }
        let inventory = dir.join("inventory.json");
        std::fs::write(
            &inventory,
            serde_json::to_vec_pretty(&json!({
                "fleet": {
                    "hosts": hosts,
                    "vars": { "ansible_python_interpreter": "{{ ansible_playbook_python }}" },
                }
            }))?,
        )?;
        // An empty ansible.cfg of its own, so no /etc/ansible or ~/.ansible.cfg applies.
        let cfg = dir.join("ansible.cfg");
        std::fs::write(&cfg, "")?;
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let env = vec![
            ("ANSIBLE_CONFIG".into(), s(cfg)),
            ("ANSIBLE_HOME".into(), s(dir.join("home"))),
            ("ANSIBLE_LOCAL_TEMP".into(), s(dir.join("tmp"))),
            ("ANSIBLE_REMOTE_TEMP".into(), s(dir.join("remote-tmp"))),
            ("ANSIBLE_FORKS".into(), FORKS.to_string()),
            ("ANSIBLE_PIPELINING".into(), "True".into()),
            ("ANSIBLE_GATHERING".into(), "explicit".into()),
            ("ANSIBLE_NOCOLOR".into(), "1".into()),
            ("ANSIBLE_RETRY_FILES_ENABLED".into(), "False".into()),
            ("ANSIBLE_HOST_KEY_CHECKING".into(), "False".into()),
            ("ANSIBLE_DEPRECATION_WARNINGS".into(), "False".into()),
            ("ANSIBLE_LOCALHOST_WARNING".into(), "False".into()),
            ("ANSIBLE_COLLECTIONS_SCAN_SYS_PATH".into(), "False".into()),
        ];
        Ok(Self {
            playbook,
            dir,
            inventory,
            mirror: fleet.mirrors.join("web.git"),
            env,
            broker,
        })
    }

    /// Runs `play` for `tag` (at `commit`) with `serial: batch`; its wall time and the CPU of
    /// ansible-playbook's whole process tree. Output goes to `ansible/<run>.log`.
    fn run(&self, play: &str, tag: &str, commit: &str, batch: &str) -> anyhow::Result<Measure> {
        let release = convoy_conductor::engine::release_id(Utc::now(), &Sha::new(commit)?);
        let extra = json!({
            "release": release.as_str(),
            "commit": commit,
            "ref": format!("refs/tags/{tag}"),
            "mirror": self.mirror,
            "batch": batch,
        });
        let play_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/ansible")
            .join(play);
        let log_path = self.dir.join(format!("{tag}-{play}.log"));
        let log = std::fs::File::create(&log_path)?;
        let load_before = loadavg();
        let (cpu0, broker0, machine0) = (
            waited_children_cpu(),
            broker_cpu(self.broker),
            machine_busy(),
        );
        let bench0 = own_cpu();
        let t0 = Instant::now();
        let status = Command::new(&self.playbook)
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("-i")
            .arg(&self.inventory)
            .arg(&play_path)
            .arg("-e")
            .arg(extra.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()?;
        let wall = t0.elapsed().as_secs_f64();
        let m = Measure {
            wall,
            cpu: waited_children_cpu() - cpu0,
            broker: broker_cpu(self.broker) - broker0,
            bench: own_cpu() - bench0,
            machine: machine_busy() - machine0,
            load_before,
            inside: None,
        };
        if !status.success() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            anyhow::bail!(
                "ansible-playbook {play} for {tag}: {status}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(m)
    }
}

/// Every host's `current` (under `app`) serves `tag`.
fn check_hosts(fleet: &Fleet, app: &str, tag: &str) -> anyhow::Result<()> {
    for h in &fleet.hosts {
        let file = h.dir.join("apps").join(app).join("current/index.html");
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        anyhow::ensure!(
            text == format!("{tag}\n"),
            "{}: {} holds {text:?}, not {tag}",
            h.name,
            file.display()
        );
    }
    Ok(())
}

/// CPU seconds of the conductor and every agent (with the hooks they ran and waited for).
fn convoy_cpu(fleet: &Fleet) -> f64 {
    let conductor = fleet.conductor.as_ref().and_then(|d| d.pid());
    let agents = fleet.hosts.iter().filter_map(|h| h.agent.as_ref()?.pid());
    conductor.into_iter().chain(agents).map(process_cpu).sum()
}

/// A convoy rollout of `tag`, timed from the deploy request to the client seeing it
/// succeeded (polling every 50 ms).
async fn convoy_rollout(
    fleet: &Fleet,
    tag: &str,
    batches: Value,
    broker: Option<i32>,
) -> anyhow::Result<Measure> {
    let load_before = loadavg();
    let (cpu0, broker0, machine0) = (convoy_cpu(fleet), broker_cpu(broker), machine_busy());
    let bench0 = own_cpu();
    let t0 = Instant::now();
    let id = fleet.deploy(
        tag,
        "prod",
        json!({ "batches": batches, "host_deadline_s": 300 }),
    )?;
    let r = loop {
        let r = fleet.get(&format!("/api/rollouts/{id}"))?;
        match r["state"].as_str().unwrap_or("") {
            "succeeded" => break r,
            "halted" | "rolled_back" | "aborted" | "superseded" => anyhow::bail!(
                "rollout {id} of {tag} ended {}: {}\n{}",
                r["state"],
                r["summary"],
                fleet.logs()
            ),
            _ if t0.elapsed() > Duration::from_secs(600) => {
                anyhow::bail!(
                    "rollout {id} of {tag} not done after 600 s\n{}",
                    fleet.logs()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    let m = Measure {
        wall,
        cpu: convoy_cpu(fleet) - cpu0,
        broker: broker_cpu(broker) - broker0,
        bench: own_cpu() - bench0,
        machine: machine_busy() - machine0,
        load_before,
        inside: None,
    };
    let at = |k: &str| {
        r[k].as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let inside = match (at("created_at"), at("finished_at")) {
        (Some(a), Some(b)) => Some((b - a).num_milliseconds() as f64 / 1000.0),
        _ => None,
    };
    Ok(Measure { inside, ..m })
}

struct Row {
    hosts: usize,
    ansible: Measure,
    convoy: Measure,
    one_task: Measure,
}

fn show(what: &str, m: &Measure) {
    let inside = m
        .inside
        .map(|s| format!(" (conductor's created → finished {s:.2} s)"))
        .unwrap_or_default();
    println!(
        "  {what:<24} wall {:>7.2} s{inside}; CPU {:>7.2} s; broker {:.2} s; bench {:.2} s; others on the machine {:.2} s; load before {}",
        m.wall,
        m.cpu,
        m.broker,
        m.bench,
        m.others(),
        m.load_before
    );
}

/// Waits until every agent consumes its command queue. An agent whose first consumer setup
/// timed out (100 agents connecting at once to a broker on a busy 2-core machine) is
/// restarted: the timed-out attempt's channel may still hold a consumer on the queue that
/// takes commands and never acks them (a host lost for the whole host deadline was seen so),
/// and a new process has none.
async fn settle(fleet: &mut Fleet) -> anyhow::Result<()> {
    for _ in 0..5 {
        let logs = || -> Vec<String> {
            fleet
                .hosts
                .iter()
                .map(|h| h.agent.as_ref().map(|a| a.log()).unwrap_or_default())
                .collect()
        };
        wait_until(
            Duration::from_secs(180),
            "every agent to consume its queue",
            || {
                let all = logs().iter().all(|l| l.contains(" consuming"));
                async move { all.then_some(()) }
            },
        )
        .await?;
        let troubled: Vec<usize> = logs()
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("lost its channel"))
            .map(|(i, _)| i)
            .collect();
        if troubled.is_empty() {
            return Ok(());
        }
        println!(
            "  restarting {} agent(s) whose first consumer setup timed out",
            troubled.len()
        );
        for i in troubled {
            fleet.hosts[i].agent = None;
            fleet.start_agent(i)?;
        }
    }
    anyhow::bail!("agents kept losing their consumers while starting")
}

/// Where the fleet's bus is.
struct Broker {
    /// A private node (the default when this machine can run one): its CPU is convoy's alone.
    node: Option<BrokerNode>,
}

impl Broker {
    fn url(&self) -> Option<String> {
        self.node.as_ref().map(BrokerNode::url)
    }

    fn pid(&self) -> Option<i32> {
        let node = self.node.as_ref()?;
        std::fs::read_to_string(node.dir().join("node.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn describe(&self) -> String {
        match &self.node {
            Some(node) => format!("a private RabbitMQ node ({})", node.url()),
            None => "the shared broker (CONVOY_TEST_AMQP_URL or 127.0.0.1:5672)".into(),
        }
    }
}

async fn compare(hosts: usize, playbook: &Path, broker: &Broker) -> anyhow::Result<Row> {
    println!("N = {hosts}: setting up the fleet ({hosts} agents, a conductor, the origin repo)");
    let mut fleet = Fleet::new(Setup {
        hosts,
        amqp_url: broker.url(),
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agents()?;
    settle(&mut fleet).await?;
    let bpid = broker.pid();
    let ansible = Ansible::new(&fleet, playbook.to_owned(), bpid)?;

    // Warm-up of both: v1 everywhere, so every agent has started, declared its queue and
    // exported once, Ansible and its modules are in the page cache, and each later deploy
    // switches from a release to the next. (Ansible's warm-up is the one-task play in one
    // batch: the 8-task play at N = 100 would add minutes for the same effect.)
    let v1 = fleet.release("v1")?;
    fleet.wait_ref("v1").await?;
    convoy_rollout(&fleet, "v1", json!(["100%"]), bpid).await?;
    check_hosts(&fleet, "web", "v1")?;
    ansible.run("release-one-task.yml", "v1", &v1, "100%")?;
    check_hosts(&fleet, "web-ansible", "v1")?;

    let v2 = fleet.release("v2")?;
    fleet.wait_ref("v2").await?;
    let a = ansible.run("release.yml", "v2", &v2, "10%")?;
    check_hosts(&fleet, "web-ansible", "v2")?;
    show("Ansible play (8 tasks)", &a);
    let c = convoy_rollout(&fleet, "v2", json!(["10%"]), bpid).await?;
    check_hosts(&fleet, "web", "v2")?;
    show("convoy rollout", &c);

    let v3 = fleet.release("v3")?;
    let one = ansible.run("release-one-task.yml", "v3", &v3, "10%")?;
    check_hosts(&fleet, "web-ansible", "v3")?;
    show("Ansible play (1 task)", &one);
    Ok(Row {
        hosts,
        ansible: a,
        convoy: c,
        one_task: one,
    })
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = {
        let asked: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        if asked.is_empty() {
            vec![20, 100]
        } else {
            asked
        }
    };
    let playbook = find_playbook()?;
    let version = Command::new(&playbook).arg("--version").output()?;
    common::build_siblings()?;
    println!(
        "{} ({}), forks {FORKS}, pipelining on, no fact gathering; {} cores",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("ansible-playbook"),
        playbook.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rows = rt.block_on(async {
        // A private broker node unless told otherwise: the shared one carries other people's
        // tests, and a private node's CPU is convoy's alone.
        let node = if std::env::var_os("CONVOY_BENCH_SHARED_BROKER").is_none()
            && std::env::var_os("CONVOY_TEST_AMQP_URL").is_none()
            && BrokerNode::available()
        {
            Some(BrokerNode::start().await?)
        } else {
            None
        };
        let broker = Broker { node };
        println!("bus: {}", broker.describe());
        let mut rows = Vec::new();
        for &n in &sizes {
            rows.push(compare(n, &playbook, &broker).await?);
        }
        anyhow::Ok(rows)
    })?;
    println!();
    println!(
        "| N | Ansible play: wall / CPU | convoy: wall / CPU (conductor + agents + broker) | wall ratio | CPU ratio | one-task play: wall / CPU | wall ratio to it |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.2} s / {:.2} s | {:.2} s / {:.2} s ({:.2} + {:.2}) | {:.1}× | {:.1}× | {:.2} s / {:.2} s | {:.1}× |",
            r.hosts,
            r.ansible.wall,
            r.ansible.cpu,
            r.convoy.wall,
            r.convoy.cpu + r.convoy.broker,
            r.convoy.cpu,
            r.convoy.broker,
            r.ansible.wall / r.convoy.wall,
            r.ansible.cpu / (r.convoy.cpu + r.convoy.broker).max(0.001),
            r.one_task.wall,
            r.one_task.cpu,
            r.one_task.wall / r.convoy.wall,
        );
    }
    Ok(())
}
