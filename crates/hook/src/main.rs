//! `convoy-hook`: the git post-receive hook, its spool drain, its installer, and the
//! webhook receiver.

use clap::{Parser, Subcommand};
use convoy_bus::{Bus, Publisher};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use convoy_hook::config::Config;
use convoy_hook::spool::Spool;
use convoy_hook::webhook::{Deliveries, Receiver};
use convoy_hook::{install, post_receive};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "convoy-hook",
    version,
    about = "Announces git pushes on the convoy bus"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run as git's post-receive hook: reads `old new ref` lines on stdin (the default).
    PostReceive {
        /// The repository's name on the bus (default: its directory name without .git).
        #[arg(long)]
        repo: Option<String>,
    },
    /// Publish spooled events, oldest first, with their original ids.
    Drain {
        /// Keep running, draining every `drain_interval_s` (for a systemd service).
        #[arg(long)]
        watch: bool,
    },
    /// Install the hook into a repository, chaining an existing post-receive hook.
    Install {
        /// The repository (bare `NAME.git`, or a work tree).
        repo: PathBuf,
        /// The name events carry (default: the directory name without .git).
        #[arg(long)]
        name: Option<String>,
        /// The convoy-hook binary the hook runs (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Receive GitHub, GitLab and Gitea push webhooks.
    Serve,
}

fn load(args: &ConfigArgs) -> Result<Config, String> {
    convoy_daemon::load::<Config>("hook", args).map_err(|e| e.to_string())
}

/// Why a subcommand failed, which decides its exit status.
enum Failure {
    /// The configuration cannot be used: exit 78 (EX_CONFIG), which the units do not
    /// restart in a loop (`RestartPreventExitStatus=78`).
    Config(String),
    /// Anything else: exit 1.
    Run(String),
}

impl Failure {
    fn run(e: impl std::fmt::Display) -> Self {
        Self::Run(format!("{e:#}"))
    }
}

/// Loads the config and checks it with `validate`; any fault is a [`Failure::Config`].
fn load_valid(
    args: &ConfigArgs,
    validate: impl FnOnce(&Config) -> anyhow::Result<()>,
) -> Result<Config, Failure> {
    let config = load(args).map_err(Failure::Config)?;
    validate(&config).map_err(|e| Failure::Config(format!("{e:#}")))?;
    Ok(config)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs a daemon subcommand's future on its own runtime. A bus setting that cannot work
/// (the URL, the exchange, the CA file) is a configuration failure (78), like a bad key.
fn block_on(main: impl std::future::Future<Output = anyhow::Result<()>>) -> Result<(), Failure> {
    runtime()
        .map_err(|e| Failure::Run(format!("cannot start the runtime: {e}")))?
        .block_on(main)
        .map_err(|e| {
            if convoy_daemon::is_config_fault(&e) {
                Failure::Config(format!("{e:#}"))
            } else {
                Failure::run(e)
            }
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::PostReceive { .. }) => {
            let repo = match &cli.command {
                Some(Command::PostReceive { repo }) => repo.clone(),
                _ => None,
            };
            hook(&cli.config, repo.as_deref());
            // Whatever happened, the push succeeded: exit now, closing stdout and stderr,
            // without waiting for any background thread.
            std::process::exit(0);
        }
        Some(Command::Drain { watch }) => {
            logging::init("hook");
            exit(load_valid(&cli.config, Config::validate).and_then(|c| block_on(drain(c, watch))))
        }
        Some(Command::Install { repo, name, binary }) => {
            // The hook reads this config at every push and can only print a line when it is
            // broken: refuse to install a hook that would announce nothing.
            let checked = load_valid(&cli.config, Config::validate).map_err(|f| match f {
                Failure::Config(e) => Failure::Config(format!("{e}; the hook was not installed")),
                other => other,
            });
            let binary = binary
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_else(|| "convoy-hook".into());
            exit(checked.and_then(|_| {
                install::install(
                    &repo,
                    &binary,
                    name.as_deref(),
                    cli.config.config.as_deref(),
                )
                .map(|note| println!("convoy-hook: {note}"))
                .map_err(Failure::run)
            }))
        }
        Some(Command::Serve) => {
            logging::init("hook");
            exit(load_valid(&cli.config, Config::validate_serve).and_then(|c| block_on(serve(c))))
        }
    }
}

fn exit(result: Result<(), Failure>) -> ExitCode {
    let (code, e) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Config(e)) => (ExitCode::from(convoy_daemon::EXIT_CONFIG), e),
        Err(Failure::Run(e)) => (ExitCode::FAILURE, e),
    };
    eprintln!("convoy-hook: {e}");
    code
}

/// The hook: one warning line at most for the person pushing.
fn hook(args: &ConfigArgs, repo: Option<&str>) {
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    let config = match load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convoy: push not announced: {e}");
            return;
        }
    };
    let git_dir = std::env::var_os("GIT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    let name = match post_receive::repo_name(&config, repo, &git_dir) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("convoy: push not announced: {e}");
            return;
        }
    };
    let Ok(rt) = runtime() else {
        eprintln!("convoy: push not announced: cannot start a runtime");
        return;
    };
    let outcome = rt.block_on(post_receive::run(&config, &name, &input, &git_dir));
    for skipped in &outcome.skipped {
        eprintln!("convoy: skipped a line: {skipped}");
    }
    if outcome.spooled > 0 {
        eprintln!(
            "convoy: the bus did not answer within {} ms; {} push event(s) spooled in {} and sent later by `convoy-hook drain`",
            config.budget_ms,
            outcome.spooled,
            config.spool_dir.display()
        );
    }
    rt.shutdown_background();
}

async fn drain(config: Config, watch: bool) -> anyhow::Result<()> {
    let spool = Spool::open(&config.spool_dir)?;
    let bus = Bus::new(config.bus_config(), "convoy-hook-drain")?;
    let publisher = Publisher::new(bus.clone());
    let per_event = Duration::from_millis(config.bus.confirm_timeout_ms.max(1000) * 2);
    if !watch {
        let sent = spool.drain(&publisher, per_event, None).await;
        let left = spool.list()?.len();
        bus.close().await;
        return match sent {
            Ok(n) => {
                println!("sent {n} spooled event(s); {left} left");
                Ok(())
            }
            Err(e) => anyhow::bail!("{e}; {left} event(s) stay spooled"),
        };
    }
    let life = Lifecycle::start()?;
    life.ready("draining the spool");
    let mut tick = tokio::time::interval(Duration::from_secs(config.drain_interval_s.max(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = life.stopping() => break,
        }
        match spool.drain(&publisher, per_event, None).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(sent = n, "spooled events published"),
            Err(e) => tracing::warn!(error = %e, "spool not drained; will retry"),
        }
    }
    bus.close().await;
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    let spool = Spool::open(&config.spool_dir)?;
    let deliveries = Deliveries::open(config.spool_dir.join("deliveries"))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let spooled = Arc::new(tokio::sync::Notify::new());
    let receiver = Arc::new(Receiver {
        github_secret: config.serve.github_secret.clone(),
        gitlab_token: config.serve.gitlab_token.clone(),
        gitea_secret: config.serve.gitea_secret.clone(),
        repo_names: config.serve.repo_names.clone(),
        max_commits: config.max_commits,
        spool,
        deliveries,
        spooled: spooled.clone(),
        from: format!("hook@{}", host.trim()),
    });
    let listener = tokio::net::TcpListener::bind(&config.serve.listen)
        .await
        .map_err(|e| anyhow::anyhow!("config key `serve.listen` ({}): {e}", config.serve.listen))?;
    let app = convoy_hook::webhook::router(receiver, config.serve.body_limit_bytes);

    // Publish what the receiver spools, in order, as soon as it is spooled.
    let drainer = {
        let spool = Spool::open(&config.spool_dir)?;
        let bus = Bus::new(config.bus_config(), "convoy-hook-serve")?;
        let interval = Duration::from_secs(config.drain_interval_s.max(1));
        let token = life.token();
        tokio::spawn(async move {
            let publisher = Publisher::new(bus.clone());
            loop {
                match spool.drain(&publisher, Duration::from_secs(10), None).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(sent = n, "webhook events published"),
                    Err(e) => tracing::warn!(error = %e, "webhook events wait in the spool"),
                }
                tokio::select! {
                    _ = spooled.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                    _ = token.cancelled() => break,
                }
            }
            bus.close().await;
        })
    };
    tracing::info!(listen = %config.serve.listen, "receiving webhooks");
    life.ready(&format!("listening on {}", config.serve.listen));
    let token = life.token();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), drainer).await;
    Ok(())
}
