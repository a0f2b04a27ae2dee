//! `convoy-ci`: the CI bridge daemon, and `convoy-ci notify` for job shell steps.

use clap::{Parser, Subcommand};
use convoy_bus::{Bus, Consumer, Outgoing, Publisher, QueueSpec, Retry};
use convoy_ci::bridge::{Bridge, PushHandler};
use convoy_ci::config::Config;
use convoy_ci::notify::{self, Endpoint, Report};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "convoy-ci",
    version,
    about = "Triggers Jenkins on pushes and relays build status"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Report this build's status from a job's shell step (reads Jenkins' variables).
    Notify {
        /// started, succeeded, failed or aborted.
        status: String,
        #[arg(long, env = "JOB_NAME")]
        job: Option<String>,
        #[arg(long, env = "BUILD_NUMBER")]
        build_number: Option<u64>,
        #[arg(long, env = "BUILD_URL")]
        url: Option<String>,
        #[arg(long, env = "GIT_COMMIT")]
        commit: Option<String>,
        #[arg(long, env = "CONVOY_REPO")]
        repo: Option<String>,
        /// The branch or ref built (Jenkins' GIT_BRANCH, e.g. origin/main).
        #[arg(long = "ref", env = "GIT_BRANCH")]
        git_ref: Option<String>,
    },
}

fn main() -> ExitCode {
    logging::init("ci");
    let cli = Cli::parse();
    let config: Config =
        match convoy_daemon::load_valid("convoy-ci", "ci", &cli.config, Config::validate) {
            Ok(c) => c,
            Err(code) => return code,
        };
    match cli.command {
        None | Some(Command::Run) => convoy_daemon::block_on("convoy-ci", run(config)),
        Some(Command::Notify {
            status,
            job,
            build_number,
            url,
            commit,
            repo,
            git_ref,
        }) => {
            let report = Report {
                status,
                job,
                build_number,
                url,
                commit,
                repo,
                git_ref,
            };
            convoy_daemon::block_on("convoy-ci", notify_cli(config, report))
        }
    }
}

async fn notify_cli(config: Config, report: Report) -> anyhow::Result<()> {
    let message = notify::event(&config, &report, "ci-notify").map_err(|e| anyhow::anyhow!(e))?;
    let bus = Bus::new(config.bus_config(), "convoy-ci-notify")?;
    let out = Outgoing::message(&message)?;
    Publisher::new(bus.clone())
        .publish(&out, Retry::within(Duration::from_secs(15)))
        .await?;
    bus.close().await;
    println!("convoy: build {} reported", report.status);
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    let bus = Bus::new(config.bus_config(), "convoy-ci")?;
    let publisher = Arc::new(Publisher::new(bus.clone()));
    let bridge = Bridge::new(config.clone(), publisher.clone(), life.token())?;
    let resumed = bridge.resume()?;
    if resumed > 0 {
        tracing::info!(resumed, "following builds requested before the restart");
    }
    let server = match config.notify_token()? {
        // Config::validate checked the token's length and the address.
        Some(token) if !config.notify.listen.is_empty() => {
            let listener = tokio::net::TcpListener::bind(&config.notify.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("config key `notify.listen` ({}): {e}", config.notify.listen)
                })?;
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let endpoint = Arc::new(Endpoint {
                config: config.clone(),
                token,
                publisher: publisher.clone(),
                from: format!("ci@{}", host.trim()),
            });
            let token = life.token();
            tracing::info!(listen = %config.notify.listen, "POST /notify enabled");
            Some(tokio::spawn(async move {
                axum::serve(listener, notify::router(endpoint))
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await
            }))
        }
        _ => None,
    };
    let spec = QueueSpec::ci(bus.exchange());
    let consumer = Consumer::new(bus.clone(), spec);
    life.ready("consuming push events");
    consumer
        .run(&PushHandler(bridge.clone()), life.token())
        .await?;
    bridge.drain(Duration::from_secs(5)).await;
    if let Some(server) = server {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    bus.close().await;
    Ok(())
}
