//! `convoy`: the operator's command line. It talks to the conductor's HTTP API
//! (`CONVOY_URL`, `CONVOY_TOKEN`); `keygen`, `token` and `passwd` work offline; `bus setup`
//! talks to the broker.
//!
//! Exit codes scripts can rely on:
//! 0 done (a rollout succeeded); 1 a rollout ended without success (halted, rolled back,
//! aborted); 2 bad usage; 3 the conductor refused the request (unknown app, conflict, …);
//! 4 the conductor cannot be reached, or the token was refused.

mod amqp_url;
mod bus_setup;
mod client;
mod demo;
mod output;
mod rabbitmqctl;
mod secret;

use clap::{Args, Parser, Subcommand};
use client::{Client, Failure};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "convoy",
    version,
    about = "Deploy, watch and steer convoy rollouts"
)]
struct Cli {
    /// The conductor's address.
    #[arg(
        long,
        env = "CONVOY_URL",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    url: String,
    /// An API token (see the conductor's `[[tokens]]`).
    #[arg(long, env = "CONVOY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct StrategyFlags {
    /// Batch sizes, counts or percentages; the last repeats: `1,10%,50%,100%`.
    #[arg(long)]
    batches: Option<String>,
    /// One batch size for all batches (same as --batches N).
    #[arg(long, conflicts_with = "batches")]
    serial: Option<u32>,
    /// Failed hosts allowed over the whole rollout: a count or a percentage.
    #[arg(long)]
    max_failures: Option<String>,
    /// Seconds each host has to report its result.
    #[arg(long)]
    deadline: Option<u64>,
    /// Seconds to wait between batches.
    #[arg(long)]
    pause: Option<u64>,
    /// `halt` or `rollback` the hosts already done when the budget is exceeded.
    #[arg(long)]
    on_failure: Option<String>,
}

impl StrategyFlags {
    fn to_json(&self) -> Value {
        let mut s = serde_json::Map::new();
        let list = |text: &str| -> Vec<Value> {
            text.split(',')
                .map(|p| {
                    let p = p.trim();
                    p.parse::<u64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| json!(p))
                })
                .collect()
        };
        if let Some(b) = &self.batches {
            s.insert("batches".into(), json!(list(b)));
        }
        if let Some(n) = self.serial {
            s.insert("batches".into(), json!([n]));
        }
        if let Some(m) = &self.max_failures {
            s.insert(
                "max_failures".into(),
                m.parse::<u64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| json!(m)),
            );
        }
        if let Some(d) = self.deadline {
            s.insert("host_deadline_s".into(), json!(d));
        }
        if let Some(p) = self.pause {
            s.insert("pause_s".into(), json!(p));
        }
        if let Some(f) = &self.on_failure {
            s.insert("on_failure".into(), json!(f));
        }
        Value::Object(s)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Roll REF of APP out to a stage, batch by batch, and follow it.
    Deploy {
        app: String,
        /// A tag or branch (`v1.4`, `main`) or a full ref (`refs/tags/v1.4`).
        #[arg(value_name = "REF")]
        git_ref: String,
        /// The stage to deploy to.
        #[arg(long = "to", value_name = "STAGE")]
        stage: String,
        /// The commit REF must point to (default: what pushes and fetchers reported).
        #[arg(long)]
        commit: Option<String>,
        #[command(flatten)]
        strategy: StrategyFlags,
        /// Print the batch plan and exit without deploying.
        #[arg(long)]
        plan: bool,
        /// Start it and exit; do not follow it.
        #[arg(long)]
        detach: bool,
    },
    /// Print the batch plan of a deploy without deploying (same as `deploy --plan`).
    Plan {
        app: String,
        #[arg(value_name = "REF")]
        git_ref: String,
        #[arg(long = "to", value_name = "STAGE")]
        stage: String,
        #[arg(long)]
        commit: Option<String>,
        #[command(flatten)]
        strategy: StrategyFlags,
    },
    /// Each app's stages: what runs there, what is moving, what waits.
    Status {
        app: Option<String>,
    },
    /// The fleet: hosts alive, stale or gone, with what they run.
    Hosts,
    /// Ask one host's agent what each app runs and which releases it keeps on disk.
    Inventory {
        host: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 15)]
        wait: u64,
    },
    /// Past rollouts; with an id, one rollout host by host with step output.
    History {
        id: Option<i64>,
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Follow a running rollout until it ends.
    Watch {
        id: i64,
    },
    /// Let a pipeline waiting at a manual gate go on to its next stage.
    Promote {
        app: String,
        /// The stage the gate follows (when several pipelines wait).
        #[arg(long)]
        stage: Option<String>,
    },
    /// Stop a rollout for good (hosts in flight finish).
    Abort {
        id: i64,
    },
    /// Start no new batch until `resume`.
    Pause {
        id: i64,
    },
    Resume {
        id: i64,
    },
    /// Go on with a halted rollout: failed and silent hosts are tried again.
    Retry {
        id: i64,
        #[arg(long)]
        detach: bool,
    },
    /// Put a stage back on the release it ran before.
    Rollback {
        app: String,
        #[arg(long = "stage")]
        stage: String,
        #[arg(long)]
        detach: bool,
    },
    /// Print live events (rollouts, hosts, steps) until interrupted.
    Tail,
    /// Messages a convoy daemon refused (unsigned, forged, expired, malformed, …), kept by
    /// the conductor with the reason; with an id, that one in full, body included.
    DeadLetters {
        id: Option<i64>,
        /// Only those refused for this reason (`bad_signature`, `expired`, `malformed`, …).
        #[arg(long, conflicts_with_all = ["clear_through", "clear_all"])]
        reason: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Forget this dead letter and every older one (needs the deployer role).
        #[arg(long, value_name = "ID", conflicts_with_all = ["id", "clear_all"])]
        clear_through: Option<i64>,
        /// Forget every dead letter kept (needs the deployer role).
        #[arg(long, conflicts_with = "id")]
        clear_all: bool,
    },
    /// Write a new ed25519 signing key pair (`<id>.key`, `<id>.pub`).
    Keygen {
        /// The key id agents know it by (rotate by adding a new id).
        #[arg(long)]
        id: String,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Make a new API token and the SHA-256 line for the conductor's config.
    Token {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "deployer")]
        role: String,
    },
    /// Hash a dashboard password for the conductor's `[[users]]` (asked twice on a terminal,
    /// else read as one line from standard input).
    Passwd {
        /// The login name.
        name: String,
        #[arg(long, default_value = "deployer")]
        role: String,
        /// Make up a random password and print it, instead of reading one.
        #[arg(long)]
        generate: bool,
    },
    /// A whole fleet on this machine: broker, conductor, hosts, a git repository and a
    /// release carried through staging, a manual gate and prod.
    Demo(demo::DemoArgs),
    /// The broker: exchanges, queues, and least-privilege users.
    Bus {
        #[command(subcommand)]
        command: BusCommand,
    },
}

#[derive(Subcommand)]
enum BusCommand {
    /// Declare convoy's exchanges and queues, and create one broker user per role and per
    /// host with the narrowest permissions; print their credentials (run on a broker node,
    /// as root).
    Setup(bus_setup::SetupArgs),
}

/// Sends the inventory command, then polls for the answer to that very command.
fn inventory(client: &Client, host: &str, wait: u64, json_out: bool) -> Result<ExitCode, Failure> {
    let path = format!("/api/hosts/{}/inventory", client::encode(host));
    let asked = client.post(&path, &json!({}))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        match client.get(&path) {
            Ok(v) if v["command"] == asked["command"] => {
                if let Some(why) = v["refused"].as_str() {
                    if json_out {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    }
                    eprintln!("convoy: {host}: {why}");
                    return Ok(ExitCode::from(1));
                }
                return print(json_out, &v, output::inventory);
            }
            // Not answered yet (404), or an older answer.
            Ok(_) | Err(Failure::Refused(_)) => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "convoy: {host} did not answer within {wait} s: is its agent running and \
                 connected (`convoy hosts`)? The question stays valid for 5 minutes; \
                 `convoy inventory {host}` asks again"
            );
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("convoy: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let client = Client::new(&cli.url, cli.token.clone());
    let json_out = cli.json;
    match cli.command {
        Command::Deploy {
            app,
            git_ref,
            stage,
            commit,
            strategy,
            plan,
            detach,
        } => {
            let body = deploy_body(&app, &git_ref, &stage, commit, &strategy, plan);
            let v = client.post("/api/rollouts", &body)?;
            if plan {
                return print(json_out, &v, output::plan);
            }
            if json_out && detach {
                return print(true, &v, |_| {});
            }
            if !json_out {
                output::started(&v);
            }
            if detach {
                return Ok(ExitCode::SUCCESS);
            }
            follow(&client, v["id"].as_i64().unwrap_or_default(), json_out)
        }
        Command::Plan {
            app,
            git_ref,
            stage,
            commit,
            strategy,
        } => {
            let body = deploy_body(&app, &git_ref, &stage, commit, &strategy, true);
            let v = client.post("/api/rollouts", &body)?;
            print(json_out, &v, output::plan)
        }
        Command::Status { app } => {
            let mut v = client.get("/api/apps")?;
            if let (Some(app), Some(list)) = (&app, v.as_array_mut()) {
                list.retain(|a| a["name"] == json!(app));
                if list.is_empty() {
                    return Err(Failure::Refused(format!("there is no app {app:?}")));
                }
            }
            print(json_out, &v, output::status)
        }
        Command::Hosts => {
            let v = client.get("/api/hosts")?;
            print(json_out, &v, output::hosts)
        }
        Command::Inventory { host, wait } => inventory(&client, &host, wait, json_out),
        Command::History { id: Some(id), .. } => {
            let v = client.get(&format!("/api/rollouts/{id}"))?;
            print(json_out, &v, output::rollout_detail)
        }
        Command::History {
            id: None,
            app,
            stage,
            host,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [("app", app), ("stage", stage), ("host", host)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", client::encode(&v)));
                }
            }
            let v = client.get(&format!("/api/rollouts?{}", q.join("&")))?;
            print(json_out, &v, output::history)
        }
        Command::Watch { id } => follow(&client, id, json_out),
        Command::Promote { app, stage } => {
            let v = client.post(
                &format!("/api/apps/{}/promote", client::encode(&app)),
                &json!({ "stage": stage }),
            )?;
            print(json_out, &v, |v| {
                println!(
                    "pipeline {} promoted: {} goes on to its next stage",
                    v["id"],
                    v["app"].as_str().unwrap_or("")
                )
            })
        }
        Command::Abort { id } => act(&client, id, "abort", json_out),
        Command::Pause { id } => act(&client, id, "pause", json_out),
        Command::Resume { id } => act(&client, id, "resume", json_out),
        Command::Retry { id, detach } => {
            let v = client.post(&format!("/api/rollouts/{id}/retry"), &json!({}))?;
            if detach || json_out {
                return print(json_out, &v, output::started);
            }
            println!("rollout {id} goes on");
            follow(&client, id, false)
        }
        Command::Rollback { app, stage, detach } => {
            let v = client.post(
                &format!(
                    "/api/apps/{}/stages/{}/rollback",
                    client::encode(&app),
                    client::encode(&stage)
                ),
                &json!({}),
            )?;
            if detach || json_out {
                return print(json_out, &v, output::started);
            }
            output::started(&v);
            follow(&client, v["id"].as_i64().unwrap_or_default(), false)
        }
        Command::Tail => {
            client.events(|kind, data| {
                if json_out {
                    println!("{}", json!({ "kind": kind, "data": data }));
                } else {
                    output::event(kind, data);
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { id: Some(id), .. } => {
            let v = client.get(&format!("/api/dead-letters/{id}"))?;
            print(json_out, &v, output::dead_letter)
        }
        Command::DeadLetters {
            clear_through,
            clear_all,
            ..
        } if clear_through.is_some() || clear_all => {
            let body = match clear_through {
                Some(id) => json!({ "through": id }),
                None => json!({ "all": true }),
            };
            let v = client.post("/api/dead-letters/clear", &body)?;
            print(json_out, &v, |v| {
                println!("{} dead letter(s) cleared", v["cleared"])
            })
        }
        Command::DeadLetters { reason, limit, .. } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(r) = reason {
                q.push(format!("reason={}", client::encode(&r)));
            }
            let v = client.get(&format!("/api/dead-letters?{}", q.join("&")))?;
            print(json_out, &v, output::dead_letters)
        }
        Command::Keygen { id, out } => {
            let key = convoy_message::KeyPair::generate(&id)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            std::fs::create_dir_all(&out)
                .map_err(|e| Failure::Usage(format!("{}: {e}", out.display())))?;
            let (private, public) = key
                .write_files(&out)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            println!(
                "private key: {} (keep it on the conductor only)",
                private.display()
            );
            println!(
                "public key:  {} (copy it to every host's trusted_keys_dir)",
                public.display()
            );
            println!("{}", key.public_line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { name, role } => {
            let (token, sha) = client::new_token().map_err(Failure::Usage)?;
            if json_out {
                println!(
                    "{}",
                    json!({ "name": name, "role": role, "token": token, "sha256": sha })
                );
            } else {
                println!("token (give it to {name}, export CONVOY_TOKEN=…): {token}");
                println!("\nadd to /etc/convoy/conductor.toml:\n");
                println!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nrole = \"{role}\"");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(&args).map_err(|e| Failure::Usage(format!("demo: {e:#}"))),
        Command::Passwd {
            name,
            role,
            generate,
        } => passwd(&name, &role, generate, json_out),
        Command::Bus {
            command: BusCommand::Setup(args),
        } => {
            let report = bus_setup::run(&args).map_err(|e| {
                match e.downcast_ref::<bus_setup::BadUsage>() {
                    Some(bad) => Failure::Usage(bad.0.clone()),
                    None => Failure::Unreachable(format!("bus setup: {e:#}")),
                }
            })?;
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                bus_setup::print(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `convoy passwd`: an argon2 hash for the conductor's `[[users]]`.
fn passwd(name: &str, role: &str, generate: bool, json_out: bool) -> Result<ExitCode, Failure> {
    if !matches!(role, "viewer" | "deployer") {
        return Err(Failure::Usage(format!(
            "--role {role:?}: use viewer or deployer"
        )));
    }
    let password = if generate {
        secret::random_hex(12).map_err(|e| Failure::Usage(e.to_string()))?
    } else {
        read_password().map_err(Failure::Usage)?
    };
    let hash = secret::hash_password(&password).map_err(|e| Failure::Usage(e.to_string()))?;
    if json_out {
        let shown = generate.then_some(password.as_str());
        println!(
            "{}",
            json!({ "name": name, "role": role, "password": shown, "password_hash": hash })
        );
    } else {
        if generate {
            println!("password for {name}: {password}");
        }
        println!("\nadd to /etc/convoy/conductor.toml:\n");
        println!("[[users]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\nrole = \"{role}\"");
    }
    Ok(ExitCode::SUCCESS)
}

/// A password from the terminal (typed twice, not echoed) or one line of standard input.
fn read_password() -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let read_line = || -> Result<String, String> {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password: {e}"))?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let password = if stdin.is_terminal() {
        // `stty` on the same terminal hides the typing without a terminal library.
        let echo = |on: bool| {
            let _ = std::process::Command::new("stty")
                .arg(if on { "echo" } else { "-echo" })
                .stdin(std::process::Stdio::inherit())
                .status();
        };
        let ask = |prompt: &str| -> Result<String, String> {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
            echo(false);
            let line = read_line();
            echo(true);
            eprintln!();
            line
        };
        let first = ask("password: ")?;
        if ask("again: ")? != first {
            return Err("the two passwords differ; nothing printed".into());
        }
        first
    } else {
        read_line()?
    };
    if password.chars().count() < 8 {
        return Err("give a password of at least 8 characters (or --generate)".into());
    }
    Ok(password)
}

/// The body of `POST /api/rollouts`, shared by `deploy` and `plan`.
fn deploy_body(
    app: &str,
    git_ref: &str,
    stage: &str,
    commit: Option<String>,
    strategy: &StrategyFlags,
    plan: bool,
) -> Value {
    json!({
        "app": app, "stage": stage, "ref": git_ref, "commit": commit,
        "strategy": strategy.to_json(), "plan": plan,
    })
}

fn print(json_out: bool, v: &Value, table: impl Fn(&Value)) -> Result<ExitCode, Failure> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
    Ok(ExitCode::SUCCESS)
}

fn act(client: &Client, id: i64, action: &str, json_out: bool) -> Result<ExitCode, Failure> {
    let v = client.post(&format!("/api/rollouts/{id}/{action}"), &json!({}))?;
    print(json_out, &v, |v| {
        println!("rollout {id}: {}", v["state"].as_str().unwrap_or("?"))
    })
}

/// Follows rollout `id` until it ends (or halts), printing progress batch by batch.
fn follow(client: &Client, id: i64, json_out: bool) -> Result<ExitCode, Failure> {
    let mut seen = output::Progress::default();
    loop {
        let v = client.get(&format!("/api/rollouts/{id}"))?;
        let state = v["state"].as_str().unwrap_or("").to_owned();
        if !json_out {
            seen.show(&v);
        }
        match state.as_str() {
            "succeeded" => {
                if json_out {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v["summary"]).unwrap_or_default()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            "halted" | "rolled_back" | "aborted" | "superseded" => {
                if json_out {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&v["summary"]).unwrap_or_default()
                    );
                } else if state == "halted" {
                    eprintln!(
                        "convoy: rollout {id} halted; `convoy retry {id}` goes on, `convoy abort {id}` gives up"
                    );
                }
                return Ok(ExitCode::from(1));
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    }
}
