//! `convoy-fetcher`: the per-host repository mirror daemon.

use clap::Parser;
use convoy_bus::{Bus, Consumer, Publisher, QueueSpec};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use convoy_fetcher::config::Config;
use convoy_fetcher::worker::{Fetcher, PushHandler};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Keeps local mirrors of the configured repositories, fetching on push events.
#[derive(Parser)]
#[command(name = "convoy-fetcher", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    logging::init("fetcher");
    let cli = Cli::parse();
    let config: Config =
        match convoy_daemon::load_valid("convoy-fetcher", "fetcher", &cli.config, Config::validate)
        {
            Ok(c) => c,
            Err(code) => return code,
        };
    if cli.check_config {
        if let Err(code) = convoy_daemon::check_bus("convoy-fetcher", config.bus_config()) {
            return code;
        }
        println!("configuration is valid ({} repos)", config.repos.len());
        return ExitCode::SUCCESS;
    }
    convoy_daemon::block_on("convoy-fetcher", run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    let host = config.host_name()?;
    let bus = Bus::new(config.bus_config(), format!("convoy-fetcher@{host}"))?;
    let publisher = Arc::new(Publisher::new(bus.clone()));
    let fetcher = Arc::new(Fetcher::new(config, publisher)?);
    let spec = QueueSpec::fetcher(bus.exchange(), &host, &fetcher.repos());
    let name = spec.name.clone();
    let loops = fetcher.spawn_loops(&life.token());
    let consumer = Consumer::new(bus.clone(), spec);
    life.ready(&format!("consuming {name}"));
    tracing::info!(%host, queue = %name, "fetcher ready");
    consumer
        .run(&PushHandler(fetcher.clone()), life.token())
        .await?;
    for l in loops {
        let _ = tokio::time::timeout(Duration::from_secs(10), l).await;
    }
    bus.close().await;
    Ok(())
}
