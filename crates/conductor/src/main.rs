//! `convoy-conductor`: the coordinator daemon.

use anyhow::Context;
use clap::{Parser, Subcommand};
use convoy_bus::{Bus, Consumer, Incoming, Publisher, QueueSpec};
use convoy_conductor::api::{self, ApiState};
use convoy_conductor::config::Config;
use convoy_conductor::engine::{Engine, Shared};
use convoy_conductor::intake;
use convoy_conductor::store::{Store, StoreError};
use convoy_conductor::web::{self, WebState};
use convoy_daemon::{ConfigArgs, Lifecycle, logging};
use convoy_message::KeyPair;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "convoy-conductor",
    version,
    about = "Spreads rollouts over the fleet as agents acknowledge; serves the API and dashboard"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Check the configuration (the file and the signing key) and exit: 0 valid, 78 not.
    #[arg(long)]
    check_config: bool,
    /// Hold every rollout the store shows unfinished (paused, nothing sent, no deadline
    /// checked) and start no rollout by itself (queued, a pipeline's next stage) until an
    /// operator resumes one: for the first start after restoring a backup. A file
    /// `<state_dir>/start-paused` does the same, for starts by systemd, until the first
    /// resume removes it.
    #[arg(long)]
    start_paused: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Copy the store (`<state_dir>/conductor.db`) to DEST while the conductor runs, with
    /// SQLite's online backup API; the copy is checked (`PRAGMA integrity_check`) before
    /// it replaces DEST. Exit 0 done, 1 failed, 78 unusable configuration.
    Backup {
        /// The backup file to write (replaced only by a copy that passed its check).
        dest: PathBuf,
    },
}

fn main() -> ExitCode {
    logging::init("conductor");
    let cli = Cli::parse();
    if let Some(Command::Backup { dest }) = &cli.command {
        return backup(&cli.config, dest);
    }
    let config: Config = match convoy_daemon::load_valid(
        "convoy-conductor",
        "conductor",
        &cli.config,
        Config::validate,
    ) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // A missing or unreadable key is a configuration error: systemd must not restart into it.
    let key = match KeyPair::load(&config.signing_key) {
        Ok(k) => k,
        Err(e) => {
            eprintln!(
                "convoy-conductor: config key `signing_key` ({}): {e}; `convoy keygen` writes one",
                config.signing_key.display()
            );
            return ExitCode::from(convoy_daemon::EXIT_CONFIG);
        }
    };
    if cli.check_config {
        if let Err(code) = convoy_daemon::check_bus("convoy-conductor", config.bus_config()) {
            return code;
        }
        println!(
            "configuration is valid ({} apps, {} tokens, {} web users; signing key {:?})",
            config.apps.len(),
            config.tokens.len(),
            config.users.len(),
            key.key_id()
        );
        return ExitCode::SUCCESS;
    }
    // The engine writes to SQLite from its task (block_in_place): a multi-thread runtime.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("convoy-conductor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, key, cli.start_paused)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("convoy-conductor: {e:#}");
            let damaged = e.downcast_ref::<EngineFailed>().is_some_and(|f| f.damaged)
                || e.downcast_ref::<StoreError>().is_some_and(store_damaged);
            if damaged {
                eprintln!(
                    "convoy-conductor: restarting will not fix this: restore a backup of the store (docs/operating.md#restoring)"
                );
                ExitCode::from(EXIT_STORE_DAMAGED)
            } else {
                convoy_daemon::failure_code("convoy-conductor", &e)
            }
        }
    }
}

/// Runs a consumer that only feeds the live view (heartbeats, progress): acked at once,
/// no engine round trip, and no de-duplication (a repeat changes nothing).
fn spawn_live(
    consumer: Consumer,
    shared: Arc<Shared>,
    handle: fn(&Arc<Shared>, Incoming) -> convoy_bus::Disposition,
    token: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Result<(), convoy_bus::BusError>> {
    let handler = move |incoming: Incoming| {
        let shared = shared.clone();
        async move { handle(&shared, incoming) }
    };
    tokio::spawn(async move { consumer.without_dedup().run(&handler, token).await })
}

/// The exit status for a store this conductor cannot read (sysexits' EX_DATAERR):
/// restarting does not fix it, so convoy-conductor.service lists it in
/// `RestartPreventExitStatus` with 78.
const EXIT_STORE_DAMAGED: u8 = 65;

/// Whether `e` says the store's contents are damaged or unreadable by this version, as
/// opposed to a failure (I/O, a lock) that a restart may get past.
fn store_damaged(e: &StoreError) -> bool {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match e {
        StoreError::Corrupt { .. } => true,
        StoreError::Open { cause, .. } | StoreError::Sql(cause) => {
            matches!(
                cause.sqlite_error_code(),
                Some(DatabaseCorrupt | NotADatabase)
            )
        }
    }
}

/// `convoy-conductor backup DEST`: needs the config's `state_dir` only, not the signing key
/// or a valid set of apps, so it works whenever the store is there.
fn backup(args: &ConfigArgs, dest: &std::path::Path) -> ExitCode {
    let config: Config = match convoy_daemon::load("conductor", args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convoy-conductor: {e}");
            return ExitCode::from(convoy_daemon::EXIT_CONFIG);
        }
    };
    match convoy_conductor::backup::backup(&config.db_path(), dest) {
        Ok(report) => {
            println!("backed up {} to {report}", config.db_path().display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("convoy-conductor: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checkpoints the store's write-ahead log every second on a thread of its own (see
/// [`Store::checkpoint`]), until `stop`.
fn checkpoints(store: Store, stop: tokio_util::sync::CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.is_cancelled() {
                std::thread::sleep(Duration::from_secs(1));
                match store.checkpoint() {
                    Ok((frames, copied)) => {
                        failing = false;
                        tracing::trace!(frames, copied, "store checkpoint");
                    }
                    // Not fatal: the engine's own connection still checkpoints at 1000 pages.
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot checkpoint the store's log; SQLite will at 1000 pages");
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the store's checkpoint thread; SQLite checkpoints at 1000 pages");
    }
}

async fn run(config: Config, key: KeyPair, start_paused: bool) -> anyhow::Result<()> {
    let life = Lifecycle::start()?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "config key `state_dir`: cannot create {}",
            config.state_dir.display()
        )
    })?;
    let store = Store::open(&config.db_path())?;
    let reader = Store::open(&config.db_path())?;
    checkpoints(Store::open(&config.db_path())?, life.token());
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("config key `listen` ({})", config.listen))?;
    let config = Arc::new(config);
    let shared = Shared::new(config.clone());
    let bus = Bus::new(config.bus_config(), "convoy-conductor")?;
    let publisher = Arc::new(Publisher::new(bus.clone()));

    // Declare our queues before saying ready: agents drop events nobody is bound to.
    // Results of a batch arrive together: handled at once, the engine commits them in one
    // transaction (group commit) instead of one fsync each.
    let events =
        Consumer::new(bus.clone(), QueueSpec::conductor_events(bus.exchange())).concurrent(32);
    let progress = Consumer::new(bus.clone(), QueueSpec::conductor_progress(bus.exchange()));
    let beats = Consumer::new(bus.clone(), QueueSpec::conductor_heartbeats(bus.exchange()));
    loop {
        let declared = async {
            events.declare().await?;
            progress.declare().await?;
            beats.declare().await
        };
        match declared.await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot declare the conductor's queues; retrying");
                tokio::select! {
                    _ = life.stopping() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut engine = Engine::new(
        shared.clone(),
        store,
        key,
        publisher,
        tx.clone(),
        life.token(),
    );
    let marker = config.state_dir.join("start-paused");
    if marker.exists() {
        engine = engine.start_paused(Some(marker));
    } else if start_paused {
        engine = engine.start_paused(None);
    }
    let mut engine_task = tokio::spawn(engine.run(rx));

    let api = Arc::new(ApiState::new(shared.clone(), tx.clone(), reader));
    let token = life.token();
    let server = tokio::spawn(async move {
        let web = Arc::new(WebState::new(api.clone()));
        axum::serve(listener, api::router(api).merge(web::router(web)))
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
    });

    let (s1, t1) = (shared.clone(), tx.clone());
    let handler = move |incoming: Incoming| {
        let (s, t) = (s1.clone(), t1.clone());
        async move { intake::on_event(&s, &t, incoming).await }
    };
    let events_task = {
        let token = life.token();
        tokio::spawn(async move { events.run(&handler, token).await })
    };
    let beats_task = spawn_live(beats, shared.clone(), intake::on_heartbeat, life.token());
    let progress_task = spawn_live(progress, shared.clone(), intake::on_progress, life.token());
    let dead_task = tokio::spawn(convoy_conductor::dead::keep(
        bus.clone(),
        shared.clone(),
        tx.clone(),
        life.token(),
    ));
    life.ready(&format!("serving on {}", config.listen));
    tracing::info!(listen = %config.listen, apps = config.apps.len(), "conductor ready");
    // The engine ends when shutdown was requested (checked first, hence `biased`), or when
    // it cannot load the store: then the conductor must not go on serving an API that
    // refuses every change. Stop at once, with the error, so that systemd or an operator
    // sees it.
    let engine_failure = tokio::select! {
        biased;
        _ = life.stopping() => None,
        ended = &mut engine_task => {
            let failure = engine_failure(ended);
            tracing::error!(error = %failure, "the engine stopped; stopping the conductor");
            life.shutdown();
            Some(failure)
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), events_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), beats_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), progress_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), dead_task).await;
    if engine_failure.is_none() {
        match tokio::time::timeout(Duration::from_secs(5), engine_task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the engine stopped on a store error"),
            Err(_) => tracing::warn!("the engine did not stop within 5 s"),
            _ => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    bus.close().await;
    engine_failure.map_or(Ok(()), |f| Err(f.into()))
}

/// The engine ended before the conductor was asked to stop.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct EngineFailed {
    message: String,
    /// The store cannot be read ([`store_damaged`]): restarting does not help.
    damaged: bool,
}

fn engine_failure(ended: Result<Result<(), StoreError>, tokio::task::JoinError>) -> EngineFailed {
    let (message, damaged) = match ended {
        // A StoreError's message already ends with its cause.
        Ok(Err(e)) => (
            format!("the engine cannot load the store: {e}"),
            store_damaged(&e),
        ),
        Ok(Ok(())) => ("the engine stopped without being asked to".into(), false),
        Err(e) => (format!("the engine failed: {e}"), false),
    };
    EngineFailed { message, damaged }
}
