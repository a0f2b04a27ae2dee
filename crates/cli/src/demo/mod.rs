//! `convoy demo`: a whole convoy fleet on one machine, for newcomers — RabbitMQ (the one
//! running, or a private node), a conductor, N hosts each with agent, fetcher and heartbeat
//! in a directory of its own, a central git repository with convoy-hook installed, and a
//! tiny web app. It pushes a tag, plays the CI job that reports the build, and the pipeline
//! carries the release through `staging`, a manual gate and `prod`.
//!
//! # Layout
//!
//! - [`bins`]: finding convoy's daemons, git and python3.
//! - [`broker`]: the broker to use, or a private node; cleaning up after.
//! - [`access`]: a virtual host and least-privilege users, as `convoy bus setup` makes
//!   them, when the broker is local and we are root.
//! - [`fleet`]: the demo directory and every config file in it.
//! - [`app`]: the demo app's repository and its server.
//! - [`children`]: the processes, each in its own process group, stopped on every exit
//!   path; Ctrl-C handling.
//! - [`follow`]: watching hosts and the pipeline through the conductor's API.

mod access;
mod app;
mod bins;
mod broker;
mod children;
mod fleet;
mod follow;

use anyhow::{Context, bail};
use bins::Bins;
use children::{Children, Interrupt, Interrupted, clean_command};
use convoy_bus::DEFAULT_AMQP_URL;
use fleet::{APP, Fleet, Host, TAG};
use follow::{Api, AtGate, Deadline};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Hosts in the fleet (at least 2: staging takes 1 or 2, prod the rest).
    #[arg(long, default_value_t = 5)]
    pub hosts: usize,
    /// Where to put everything (default: a new temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The broker to use, with an exchange of the demo's own; when none answers there, a
    /// private RabbitMQ node is started (needs rabbitmq-server installed, and root).
    #[arg(long, default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,
    /// The RabbitMQ node of --amqp-url, for rabbitmqctl (its `-n`; default: the local
    /// node), when it is not the local default one.
    #[arg(long)]
    pub node: Option<String>,
    /// The conductor's address (default 127.0.0.1:8470, or a free port if that is taken).
    #[arg(long)]
    pub listen: Option<String>,
    /// No person needed: promote the manual gate, exit 0 once every host runs the tag.
    #[arg(long)]
    pub ci: bool,
    /// With --ci: give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
    /// Make this host's app keep serving what it served before, as if its restart never
    /// took: its health check fails, convoy switches it back, and the rollout rolls back.
    #[arg(long, value_name = "HOST")]
    pub broken_host: Option<String>,
    /// Keep the demo directory (configs, logs, releases) when it ends.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the demo until it is done (`--ci`) or interrupted.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let stop = Interrupt::install()?;
    if !(2..=50).contains(&args.hosts) {
        bail!(
            "--hosts {}: give 2 to 50 (staging takes 1 or 2, prod the rest)",
            args.hosts
        );
    }
    if let Some(b) = &args.broken_host
        && !(1..=args.hosts).any(|i| *b == format!("web-{i}"))
    {
        bail!(
            "--broken-host {b:?}: the hosts are web-1 … web-{}",
            args.hosts
        );
    }
    let bins = Bins::find()?;
    let (dir, temporary) = prepare_dir(args.dir.as_deref())?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let mut children = Children::new(&dir.join("logs"));
    let mut state = State::default();
    let outcome = demo(args, &bins, &dir, &mut children, &stop, &mut state);

    if let Err(e) = &outcome
        && !e.is::<Interrupted>()
    {
        eprintln!("\nconvoy demo: {e:#}");
    }
    println!("stopping the fleet…");
    let hurry = stop.clone();
    children.stop_all(Duration::from_secs(10), &move || hurry.hurry());
    drop(children);
    if let Some((url, exchange, queues)) = &state.shared_broker
        && let Err(e) = broker::clean_up(url, exchange, queues)
    {
        eprintln!("convoy demo: could not delete the demo's queues ({exchange}.*): {e:#}");
    }
    if let Some(access) = &state.access
        && state.private_broker.is_none()
        && let Err(e) = access.tear_down()
    {
        eprintln!(
            "convoy demo: could not delete the demo's virtual host {:?} and users: {e:#}",
            access.vhost
        );
    }
    drop(state.private_broker.take());
    let failed = outcome.as_ref().is_err_and(|e| !e.is::<Interrupted>());
    if temporary && !args.keep && !failed {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("kept {} (logs in {}/logs)", dir.display(), dir.display());
    }
    Ok(match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => {
            if args.ci {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(_) => ExitCode::from(1),
    })
}

/// What must be cleaned up after the demo, whatever happened.
#[derive(Default)]
struct State {
    /// The virtual host and users made for the demo.
    access: Option<access::Access>,
    /// A shared broker's URL, the demo's exchange and its queues, to delete at the end.
    shared_broker: Option<(String, String, Vec<String>)>,
    private_broker: Option<tempfile::TempDir>,
}

fn demo(
    args: &DemoArgs,
    bins: &Bins,
    dir: &Path,
    children: &mut Children,
    stop: &Interrupt,
    state: &mut State,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let overall = Deadline(args.ci.then(|| started + Duration::from_secs(args.timeout)));
    let startup = |d: u64| overall.within(Duration::from_secs(d));

    println!("convoy demo in {}", dir.display());
    let broker = broker::ensure(&args.amqp_url, children, stop)?;
    let mut fleet = plan(args, dir, &broker.url)?;
    let names: Vec<String> = fleet.hosts.iter().map(|h| h.name.clone()).collect();
    let redacted = convoy_bus::config::redact(&broker.url);
    let shared = broker.private.is_none();
    state.private_broker = broker.private;
    // As an operator would: `convoy bus setup` first — a virtual host and one
    // least-privilege user per daemon — where rabbitmqctl can; else an exchange of our own.
    let node = broker.node.clone().or_else(|| args.node.clone());
    match access::Access::set_up(&broker.url, node, &fleet.exchange, &names) {
        Ok(access) => {
            println!(
                "broker: {redacted}{}, virtual host {:?}: `convoy bus setup` made one user per \
                 daemon with the narrowest permissions (docs/security.md)",
                if shared { "" } else { " (a private node)" },
                access.vhost
            );
            fleet.urls = access.urls();
            state.access = Some(access);
        }
        Err(e) => {
            println!(
                "broker: {redacted}{}, exchange {}; every daemon logs in as the URL's user \
                 (no least-privilege users: {e:#})",
                if shared { "" } else { " (a private node)" },
                fleet.exchange
            );
            let url = crate::amqp_url::AmqpUrl::parse(&broker.url)?;
            let hosts = names
                .iter()
                .map(|n| convoy_message::names::HostName::new(n.as_str()))
                .collect::<Result<Vec<_>, _>>()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(crate::bus_setup::declare_topology(
                    &url,
                    &fleet.exchange,
                    &hosts,
                ))
                .context("declaring the demo's exchanges and queues")?;
            // (A dead-letter queue of an earlier demo is kept as it was: demo data.)
            if shared {
                state.shared_broker =
                    Some((broker.url.clone(), fleet.exchange.clone(), fleet.queues()));
            }
        }
    }
    fleet.write()?;

    // The central repository with convoy-hook, and a developer's clone of the app.
    std::fs::create_dir_all(fleet.origin())?;
    let origin = fleet.origin();
    app::git(
        &bins.git,
        &origin,
        &["init", "-q", "--bare", "--initial-branch=main"],
        &[],
    )?;
    let out = clean_command(&bins.hook)
        .arg("--config")
        .arg(fleet.hook_config())
        .arg("install")
        .arg(&origin)
        .args(["--name", APP])
        .output()
        .context("running convoy-hook install")?;
    if !out.status.success() {
        bail!(
            "convoy-hook install failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    app::create(&bins.git, &fleet.work(), &origin)?;
    let script = dir.join("release");
    std::fs::write(
        &script,
        app::release_script(
            &fleet.work(),
            &bins.ci,
            &fleet.ci_config(),
            &fleet.logs().join("ci-notify.log"),
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    // The conductor, then each host's daemons and its copy of the app.
    let mut cmd = clean_command(&bins.conductor);
    cmd.arg("--config").arg(fleet.conductor_config());
    children.spawn("conductor", cmd)?;
    follow::conductor_up(&fleet.url(), children, stop, startup(30))?;
    for h in &fleet.hosts {
        for (daemon, bin) in [
            ("agent", &bins.agent),
            ("fetcher", &bins.fetcher),
            ("heartbeat", &bins.heartbeat),
        ] {
            let mut cmd = clean_command(bin);
            cmd.arg("--config")
                .arg(h.dir.join(format!("{daemon}.toml")))
                .env("CONVOY_GIT", &bins.git_helper);
            children.spawn(&format!("{}-{daemon}", h.name), cmd)?;
        }
        children.spawn(
            &format!("{}-app", h.name),
            app::serve_command(
                &bins.python,
                &h.root,
                h.port,
                args.broken_host.as_deref() == Some(h.name.as_str()),
            ),
        )?;
    }
    let api = Api::new(&fleet.url(), &fleet.token);
    follow::hosts_alive(&api, &names, children, stop, startup(45))?;
    banner(&fleet, dir);

    // A release: commit, tag, push through the hook; the demo's "CI" reports the build.
    let sha = app::release(&bins.git, &fleet.work(), TAG)?;
    println!(
        "\npushed {TAG} ({}) to {}: convoy-hook announced it",
        &sha[..12],
        origin.display()
    );
    for status in ["started", "succeeded"] {
        let out = clean_command(&bins.ci)
            .arg("--config")
            .arg(fleet.ci_config())
            .args(["notify", status, "--repo", APP, "--job", "hello-build"])
            .args(["--build-number", "1", "--commit", &sha])
            .args(["--ref", &format!("refs/tags/{TAG}")])
            .args(["--url", "http://ci.invalid/job/hello-build/1/"])
            .output()
            .context("running convoy-ci notify")?;
        if !out.status.success() {
            bail!(
                "convoy-ci notify {status} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("CI: build hello-build #1 of {TAG} succeeded (`convoy-ci notify succeeded`)\n");

    let convoy = convoy_command();
    let gate = if args.ci {
        AtGate::Promote
    } else {
        AtGate::Explain(format!(
            "\n  >>> staging runs {TAG}; the manual gate waits. Look at it on the dashboard and press \
             Promote there, or run:\n  >>>   . {}/env && {convoy} promote {APP}\n",
            dir.display()
        ))
    };
    let mut printed = follow::Printed::default();
    let failure = follow::pipeline(&api, APP, gate, &mut printed, children, stop, overall)?;
    match (&failure, args.ci) {
        (Some(why), true) => bail!("{why}"),
        (Some(why), false) => println!(
            "\n{why}. The fleet keeps running for you to look: `convoy history`, the dashboard, \
             the logs in {}/logs.",
            dir.display()
        ),
        (None, _) => {
            verify(&fleet, &sha)?;
            println!(
                "\nevery host runs {TAG} ({}), checked on disk and over HTTP; {:.0} s in all",
                &sha[..12],
                started.elapsed().as_secs_f64()
            );
            if args.ci {
                return Ok(());
            }
        }
    }
    println!(
        "\nThe fleet keeps running; Ctrl-C stops it. Try:\n\
         \x20 {dir}/release v1.1.0                        # commit, tag, push, and the CI's report: a new pipeline\n\
         \x20 . {dir}/env && {convoy} promote {APP}\n\
         \x20 . {dir}/env && {convoy} rollback {APP} --stage prod",
        dir = dir.display(),
    );
    loop {
        children.check()?;
        if let Ok(list) = api.get(&format!("/api/pipelines?app={APP}&limit=3")) {
            for p in list.as_array().into_iter().flatten().rev() {
                printed.pipeline(p);
            }
        }
        if let Ok(list) = api.get("/api/rollouts?limit=5") {
            for r in list.as_array().into_iter().flatten().rev() {
                if let Some(id) = r["id"].as_i64()
                    && let Ok(full) = api.get(&format!("/api/rollouts/{id}"))
                {
                    printed.rollout(&full);
                }
            }
        }
        stop.sleep(Duration::from_secs(1))?;
    }
}

/// How to run this `convoy` in the commands the demo prints: `convoy` when that is what
/// `PATH` finds, else its full path.
fn convoy_command() -> String {
    let me = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok());
    let found = bins::on_path("convoy").and_then(|p| p.canonicalize().ok());
    match (me, found) {
        (Some(me), Some(found)) if me == found => "convoy".into(),
        (Some(me), _) => me.display().to_string(),
        _ => "convoy".into(),
    }
}

/// The fleet's names, ports, credentials and stages.
fn plan(args: &DemoArgs, dir: &Path, amqp_url: &str) -> anyhow::Result<Fleet> {
    // One port per host's app and one for the conductor, all distinct.
    let mut ports = broker::free_ports(args.hosts + 1)?.into_iter();
    let mut port = move || ports.next().context("finding free ports: fewer than asked");
    let listen = match &args.listen {
        Some(l) => l.clone(),
        None if std::net::TcpListener::bind("127.0.0.1:8470").is_ok() => "127.0.0.1:8470".into(),
        None => format!("127.0.0.1:{}", port()?),
    };
    let staging = (args.hosts / 4).clamp(1, 2);
    let mut hosts = Vec::new();
    for i in 1..=args.hosts {
        let name = format!("web-{i}");
        let hdir = dir.join("hosts").join(&name);
        hosts.push(Host {
            stage: if i <= staging { "staging" } else { "prod" },
            root: hdir.join("apps").join(APP),
            dir: hdir,
            port: port()?,
            name,
        });
    }
    Ok(Fleet {
        dir: dir.to_path_buf(),
        amqp_url: amqp_url.to_owned(),
        exchange: format!("convoy-demo-{}", crate::secret::random_hex(4)?),
        urls: Default::default(),
        listen,
        token: crate::secret::random_hex(16)?,
        password: crate::secret::random_hex(8)?,
        hosts,
    })
}

/// What to look at, and how to log in.
fn banner(fleet: &Fleet, dir: &Path) {
    let env = dir.join("env");
    let _ = std::fs::write(
        &env,
        format!(
            "export CONVOY_URL={}\nexport CONVOY_TOKEN={}\n",
            fleet.url(),
            fleet.token
        ),
    );
    set_private(&env);
    let staging: Vec<&str> = fleet
        .hosts
        .iter()
        .filter(|h| h.stage == "staging")
        .map(|h| h.name.as_str())
        .collect();
    println!(
        "\nthe fleet is up: a conductor and {} hosts (staging: {}; prod: the rest), each with \
         convoy-agent, convoy-fetcher and convoy-heartbeat",
        fleet.hosts.len(),
        staging.join(", ")
    );
    println!("\n  dashboard  {}/", fleet.url());
    println!("  login      admin / {}", fleet.password);
    println!(
        "  the app    {}",
        fleet
            .hosts
            .iter()
            .map(|h| format!("http://127.0.0.1:{}/", h.port))
            .collect::<Vec<_>>()
            .join("  ")
    );
    let convoy = convoy_command();
    println!("\n  in another terminal:");
    println!(
        "    . {}    # sets CONVOY_URL and CONVOY_TOKEN",
        env.display()
    );
    for (cmd, what) in [
        ("hosts".to_owned(), "the fleet, from heartbeats"),
        (format!("status {APP}"), "each stage's release and gate"),
        ("tail".to_owned(), "live events"),
        (
            "inventory web-1".to_owned(),
            "what web-1's agent keeps on disk",
        ),
        ("history".to_owned(), "rollouts; `history ID`: host by host"),
        (
            format!("promote {APP}"),
            "pass the manual gate after staging",
        ),
    ] {
        println!("    {convoy} {cmd:<16} # {what}");
    }
    println!(
        "\n  everything is in {}: configs, hosts' releases, logs/",
        dir.display()
    );
}

/// Checks each host: `current` is a release of `sha`, and its app serves `sha`.
fn verify(fleet: &Fleet, sha: &str) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for h in &fleet.hosts {
        let on_disk = std::fs::read_to_string(h.root.join("current/public/version.txt"))
            .ok()
            .and_then(|t| t.split_whitespace().next().map(str::to_owned));
        let served = app::served_commit(h.port);
        if on_disk.as_deref() != Some(sha) || served.as_deref() != Some(sha) {
            wrong.push(format!(
                "{}: current holds {}, the app serves {}",
                h.name,
                on_disk.as_deref().unwrap_or("nothing"),
                served.as_deref().unwrap_or("nothing")
            ));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "not every host runs {TAG} ({sha}):\n  {}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}

/// The demo directory: `--dir` (created, or emptied if an earlier demo left it), or a new
/// temporary one. Returns it and whether it is temporary.
fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<(PathBuf, bool)> {
    const MARKER: &str = ".convoy-demo";
    let Some(dir) = dir else {
        let tmp = tempfile::Builder::new()
            .prefix("convoy-demo-")
            .tempdir()
            .context("making a temporary directory")?;
        let path = tmp.keep();
        std::fs::write(path.join(MARKER), "")?;
        return Ok((path, true));
    };
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read --dir {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            if !dir.join(MARKER).exists() {
                bail!(
                    "--dir {} is not empty and not an earlier demo's: give a new or empty directory",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("emptying the earlier demo in {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    std::fs::write(dir.join(MARKER), "")?;
    Ok((dir, false))
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
