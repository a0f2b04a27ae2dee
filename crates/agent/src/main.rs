//! `convoy-agent`: the per-host deploy agent daemon.

use clap::Parser;
use convoy_agent::outbox::Outbox;
use convoy_agent::{Agent, AgentConfig};
use convoy_bus::{Bus, Consumer, Publisher, QueueSpec};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Executes signed deploy commands addressed to this host.
#[derive(Parser)]
#[command(name = "convoy-agent", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Seconds a running deploy may take to finish after SIGTERM before the agent exits
    /// (the next start converges whatever was interrupted).
    #[arg(long, default_value_t = 60)]
    shutdown_grace_s: u64,
}

fn main() -> ExitCode {
    logging::init("agent");
    let cli = Cli::parse();
    let config: AgentConfig = match convoy_daemon::load_valid(
        "convoy-agent",
        "agent",
        &cli.config,
        // The trusted keys are configuration too: a bad or unreadable key file, or two
        // files with one key id, stop the agent with EX_CONFIG rather than a restart loop.
        |c: &AgentConfig| c.validate().and_then(|()| c.trusted_keys().map(drop)),
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.check_config {
        if let Err(code) = convoy_daemon::check_bus("convoy-agent", config.bus_config()) {
            return code;
        }
        println!("configuration is valid ({} apps)", config.apps.len());
        return ExitCode::SUCCESS;
    }
    convoy_daemon::block_on("convoy-agent", run(cli, config))
}

async fn run(cli: Cli, config: AgentConfig) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    let host = config.host_name()?;
    let bus = Bus::new(config.bus_config(), format!("convoy-agent@{host}"))?;
    let publisher = Arc::new(Publisher::new(bus.clone()));
    // The outbox outlives the consumer: results of draining deploys still go out.
    let outbox_stop = tokio_util::sync::CancellationToken::new();
    let (outbox, outbox_task) = Outbox::start(publisher.clone(), outbox_stop.clone());
    let agent = Arc::new(Agent::new(config, publisher, outbox)?);
    let resumed = agent.recover()?;
    if resumed > 0 {
        tracing::warn!(resumed, "resuming commands interrupted by the last stop");
    }
    let spec = QueueSpec::commands(bus.exchange(), &host);
    let queue = spec.name.clone();
    let consumer = Consumer::new(bus.clone(), spec).without_dedup();

    let reloads = {
        let agent = agent.clone();
        let args = cli.config.clone();
        let life = life.clone();
        let mut rx = life.reloads();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let outcome = match convoy_daemon::load::<AgentConfig>("agent", &args) {
                    Ok(c) => agent.reload(c).map_err(|e| format!("{e:#}")),
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => life.reloaded("configuration reloaded"),
                    Err(e) => {
                        tracing::error!("reload refused, keeping the old configuration: {e}");
                        life.reloaded("reload refused, old configuration kept (see the log)");
                    }
                }
            }
        })
    };

    life.ready(&format!("consuming {queue}"));
    tracing::info!(%host, %queue, "agent ready");
    consumer.run(agent.as_ref(), life.token()).await?;
    reloads.abort();
    tracing::info!("no longer consuming; waiting for running commands");
    if !agent.drain(Duration::from_secs(cli.shutdown_grace_s)).await {
        tracing::warn!("commands still running at the deadline; the next start converges them");
    }
    // Give queued results a moment to be confirmed, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    outbox_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), outbox_task).await;
    bus.close().await;
    Ok(())
}
