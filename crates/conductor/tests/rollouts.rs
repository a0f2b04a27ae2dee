//! Rollouts over real agents: batch order, failures and the budget, rollback, deadlines.

mod common;

use common::{DEPLOYER_TOKEN, Fleet, Setup, text};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_spreads_over_ten_hosts_batch_by_batch() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 10,
        build_sleep: 0.2,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;

    // The plan first, without deploying.
    let plan = fleet
        .cli(&[
            "deploy",
            "web",
            "v1",
            "--to",
            "prod",
            "--batches",
            "1,3,6",
            "--plan",
        ])
        .await?;
    assert!(plan.status.success(), "{}", text(&plan));
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    assert!(plan_text.contains("batch 1/3 (1 host(s))"), "{plan_text}");
    assert!(plan_text.contains("batch 3/3 (6 host(s))"), "{plan_text}");
    assert!(
        fleet
            .get("/api/rollouts")?
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "--plan deployed"
    );

    // The deploy, followed live by the CLI until it succeeds.
    let out = fleet
        .cli(&["deploy", "web", "v1", "--to", "prod", "--batches", "1,3,6"])
        .await?;
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("batch 2/3"),
        "live progress shows batches: {stdout}"
    );
    assert!(stdout.contains("batch 3/3"), "{stdout}");

    let history = fleet.get("/api/rollouts?app=web")?;
    let id = history[0]["id"].as_i64().unwrap_or_default();
    let r = fleet.get(&format!("/api/rollouts/{id}"))?;
    assert_eq!(r["state"], "succeeded");
    let release = r["release"].as_str().unwrap_or_default().to_owned();
    let hosts = r["hosts"].as_array().cloned().unwrap_or_default();
    let sizes: Vec<usize> = (0..3)
        .map(|b| hosts.iter().filter(|h| h["batch"] == b).count())
        .collect();
    assert_eq!(sizes, vec![1, 3, 6]);

    // Order as the hosts saw it: no build of batch k+1 before every switch of batch k.
    let batch_of = |name: &str| {
        hosts
            .iter()
            .find(|h| h["host"] == name)
            .and_then(|h| h["batch"].as_u64())
            .unwrap_or(99)
    };
    for b in 0..2u64 {
        let done_last = fleet
            .hosts
            .iter()
            .filter(|h| batch_of(&h.name) == b)
            .filter_map(|h| h.time_of("post_switch", &release))
            .max()
            .unwrap_or_default();
        let next_first = fleet
            .hosts
            .iter()
            .filter(|h| batch_of(&h.name) == b + 1)
            .filter_map(|h| h.time_of("build", &release))
            .min()
            .unwrap_or_default();
        assert!(
            done_last > 0 && next_first > done_last,
            "batch {} started before batch {} finished",
            b + 2,
            b + 1
        );
    }
    for h in &fleet.hosts {
        assert_eq!(
            h.current().as_deref(),
            Some(release.as_str()),
            "{} runs {:?}",
            h.name,
            h.current()
        );
        assert_eq!(h.builds_of(&release), 1, "{} built more than once", h.name);
    }
    // History: the CLI's table and the per-host detail.
    let hist = fleet.cli(&["history", "--app", "web"]).await?;
    assert!(hist.status.success(), "{}", text(&hist));
    let hist_text = String::from_utf8_lossy(&hist.stdout);
    assert!(
        hist_text.contains("succeeded") && hist_text.contains("10/10"),
        "{hist_text}"
    );
    assert!(
        hist_text.contains("deployer"),
        "who started it: {hist_text}"
    );
    let detail = fleet.cli(&["history", &id.to_string(), "--json"]).await?;
    let detail: serde_json::Value = serde_json::from_slice(&detail.stdout)?;
    let results = detail["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 10, "one result per host");
    assert!(results.iter().all(
        |r| r["outcome"] == "succeeded" && r["steps"].as_array().is_some_and(|s| !s.is_empty())
    ));
    Ok(())
}

const FOUR_HOSTS_ROLLBACK: &str = "[apps.web]\n[[apps.web.stages]]\nname = \"prod\"\nhosts = {hosts}\n[apps.web.stages.strategy]\nbatches = [1, 1, 2]\nmax_failures = 0\non_failure = \"rollback\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_halts_with_no_budget_and_nothing_more_deploys() -> anyhow::Result<()>
{
    let mut fleet = Fleet::new(Setup {
        hosts: 4,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    let first = fleet.deploy("v1", "prod", json!({ "batches": [4] }))?;
    let first = fleet
        .wait_state(first, &["succeeded"], Duration::from_secs(60))
        .await?;
    let v1 = first["release"].as_str().unwrap_or_default().to_owned();

    fleet.release("v2")?;
    fleet.wait_ref("v2").await?;
    fleet.hosts[1].set_unhealthy(true);
    let id = fleet.deploy(
        "v2",
        "prod",
        json!({ "batches": [1, 1, 2], "max_failures": 0 }),
    )?;
    let r = fleet
        .wait_state(id, &["halted"], Duration::from_secs(60))
        .await?;
    let v2 = r["release"].as_str().unwrap_or_default().to_owned();
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&fleet.hosts[1].name),
        "{}",
        r["reason"]
    );
    assert_eq!(r["hosts"][1]["state"], "failed");
    assert_eq!(r["hosts"][1]["agent_rolled_back"], true);
    // Nothing more is deployed: the third and fourth host never heard of v2.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for h in &fleet.hosts[2..] {
        assert_eq!(
            h.builds_of(&v2),
            0,
            "{} was deployed after the halt",
            h.name
        );
        assert_eq!(h.current().as_deref(), Some(v1.as_str()));
    }
    assert_eq!(
        fleet.hosts[0].current().as_deref(),
        Some(v2.as_str()),
        "halt leaves done hosts"
    );
    assert_eq!(
        fleet.hosts[1].current().as_deref(),
        Some(v1.as_str()),
        "the agent switched back"
    );
    // The CLI says why and how to go on, and exits 1 for a halted rollout.
    let watch = fleet.cli(&["watch", &id.to_string()]).await?;
    assert_eq!(watch.status.code(), Some(1), "{}", text(&watch));
    assert!(
        String::from_utf8_lossy(&watch.stderr).contains("convoy retry"),
        "{}",
        text(&watch)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rollback_the_hosts_already_done_return_to_their_previous_release()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 4,
        apps: FOUR_HOSTS_ROLLBACK,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    let first = fleet.deploy("v1", "prod", json!({ "batches": [4] }))?;
    let first = fleet
        .wait_state(first, &["succeeded"], Duration::from_secs(60))
        .await?;
    let v1 = first["release"].as_str().unwrap_or_default().to_owned();

    fleet.release("v2")?;
    fleet.wait_ref("v2").await?;
    fleet.hosts[1].set_unhealthy(true);
    let id = fleet.deploy("v2", "prod", json!({}))?;
    let r = fleet
        .wait_state(id, &["rolled_back"], Duration::from_secs(60))
        .await?;
    assert_eq!(
        r["hosts"][0]["undo"]["state"], "succeeded",
        "{}",
        r["hosts"][0]
    );
    for h in &fleet.hosts {
        assert_eq!(
            h.current().as_deref(),
            Some(v1.as_str()),
            "{} is not back on v1",
            h.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_fails_its_deadline_and_the_rollout_halts_rather_than_skipping_it()
-> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agent(0)?;
    fleet.start_agent(2)?;
    fleet.release("v1")?;
    fleet.wait_ref("v1").await?;
    // Host 1's agent is stopped: it never answers.
    let id = fleet.deploy("v1", "prod", json!({ "batches": 1, "host_deadline_s": 3 }))?;
    let r = fleet
        .wait_state(id, &["halted"], Duration::from_secs(60))
        .await?;
    assert_eq!(r["hosts"][0]["state"], "succeeded");
    assert_eq!(r["hosts"][1]["state"], "timed_out");
    assert_eq!(
        r["hosts"][2]["state"], "pending",
        "the rollout skipped the silent host"
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer"),
        "{}",
        r["reason"]
    );
    assert_eq!(fleet.hosts[2].journal_entries(), 0);

    // The agent comes back; retry sends the same command (still valid) and goes on.
    fleet.start_agent(1)?;
    let retry = fleet.cli(&["retry", &id.to_string()]).await?;
    assert!(retry.status.success(), "{}\n{}", text(&retry), fleet.logs());
    let r = fleet.get(&format!("/api/rollouts/{id}"))?;
    assert_eq!(r["state"], "succeeded");
    assert_eq!(
        r["hosts"][1]["attempts"], 1,
        "the silent host got its first command again, not a second one"
    );
    let release = r["release"].as_str().unwrap_or_default().to_owned();
    for h in &fleet.hosts {
        assert_eq!(
            h.builds_of(&release),
            1,
            "{} built {} times",
            h.name,
            h.builds_of(&release)
        );
    }
    Ok(())
}

/// `convoy retry` reaches a timed-out host while its first attempt is still out (the agent
/// hung mid-build); that attempt's failure arrives after the retry. The retry means "try
/// again": the host gets a new command and the rollout completes, rather than halting on
/// the old failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_undone_by_the_late_failure_of_the_attempt_it_replaces() -> anyhow::Result<()>
{
    let mut fleet = Fleet::new(Setup {
        hosts: 2,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;
    fleet.hosts[1].freeze_next_build()?;
    let id = fleet.deploy("v1", "prod", json!({ "batches": 1, "host_deadline_s": 8 }))?;
    let r = fleet
        .wait_state(id, &["halted"], Duration::from_secs(60))
        .await?;
    assert_eq!(r["hosts"][1]["state"], "timed_out", "{}", r["hosts"][1]);
    let release = r["release"].as_str().unwrap_or_default().to_owned();
    assert_eq!(fleet.hosts[1].builds_of(&release), 1, "{}", fleet.logs());

    // The retry goes out while host 1's agent is still stopped; only then does it go on
    // and report the first attempt's failure.
    let (status, v) = fleet.post_as(
        DEPLOYER_TOKEN,
        &format!("/api/rollouts/{id}/retry"),
        &json!({}),
    )?;
    assert_eq!(status, 200, "{v}");
    fleet.hosts[1].thaw();
    let r = fleet
        .wait_state(id, &["succeeded", "halted"], Duration::from_secs(60))
        .await?;
    assert_eq!(r["state"], "succeeded", "{r}\n{}", fleet.logs());
    assert_eq!(r["hosts"][1]["attempts"], 2, "{}", r["hosts"][1]);
    assert_eq!(fleet.hosts[1].current().as_deref(), Some(release.as_str()));
    assert_eq!(
        fleet.hosts[1].builds_of(&release),
        2,
        "the frozen attempt and the new one"
    );
    assert_eq!(fleet.hosts[0].builds_of(&release), 1);
    // History keeps the first attempt's failure beside the success.
    let history = fleet.cli(&["history", &id.to_string(), "--json"]).await?;
    assert!(history.status.success(), "{}", text(&history));
    let out = String::from_utf8_lossy(&history.stdout);
    assert!(
        out.contains("exited with status 1") || out.contains("\"failed\""),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_tokens_roles_and_names() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup::default()).await?;
    fleet.start_conductor().await?;
    let body = json!({ "app": "web", "stage": "prod", "ref": "v1" });
    let (status, _) = fleet.post_as("wrong-token-wrong-token", "/api/rollouts", &body)?;
    assert_eq!(status, 401);
    let (status, v) = fleet.post_as(common::VIEWER_TOKEN, "/api/rollouts", &body)?;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("read-only"));
    let (status, v) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/rollouts",
        &json!({ "app": "nope", "stage": "prod", "ref": "v1" }),
    )?;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("apps: web"),
        "{v}"
    );
    let (status, v) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/rollouts",
        &json!({ "app": "web", "stage": "prod", "ref": "never-pushed" }),
    )?;
    assert_eq!(status, 422, "{v}");
    let (status, v) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/rollouts",
        &json!({ "app": "web", "stage": "prod", "ref": "../../etc", "commit": "x" }),
    )?;
    assert!(status == 422, "{status} {v}");
    // What does not parse is a 400 in JSON saying what — after the caller is checked; an
    // unknown route a 404 in JSON.
    let deployer = common::DEPLOYER_TOKEN;
    for (token, path, want) in [
        (deployer, "/api/rollouts/abc", 400),
        ("", "/api/rollouts/abc", 401),
        (deployer, "/api/rollouts?limit=-1", 400),
        (deployer, "/api/dead-letters/x", 400),
        (deployer, "/api/no-such-thing", 404),
        (deployer, "/api/hosts/bad%20name/inventory", 422),
    ] {
        let (status, v) = fleet.get_as(token, path)?;
        assert_eq!(status, want, "GET {path}: {v}");
        assert!(v["error"].is_string(), "GET {path}: not a JSON error: {v}");
    }
    let (status, v) = fleet.post_as("nobody", "/api/apps/web/promote", &json!({ "x": 1 }))?;
    assert_eq!(status, 401, "the token is checked before the body: {v}");
    let (status, v) = fleet.post_as(deployer, "/api/apps/web/promote", &json!({ "x": 1 }))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("promote"), "{v}");
    // A pause between batches of 31,700 years is a typo, not a plan.
    let (status, v) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/rollouts",
        &json!({ "app": "web", "stage": "prod", "ref": "v1",
                 "strategy": { "pause_s": 1_000_000_000_000u64 } }),
    )?;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("pause_s"), "{v}");
    let (status, _) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/rollouts",
        &json!({ "app": "web", "bogus": 1 }),
    )?;
    assert_eq!(status, 400);
    // The CLI's exit codes: refused 3, unreachable 4.
    let out = fleet.cli(&["deploy", "nope", "v1", "--to", "prod"]).await?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let bin = convoy_testkit::workspace_bin("convoy", "convoy");
    let out = std::process::Command::new(bin)
        .env(
            "CONVOY_URL",
            format!("http://127.0.0.1:{}", convoy_testkit::free_port()),
        )
        .env("CONVOY_TOKEN", "x")
        .arg("status")
        .output()?;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_rolls_back_to_its_previous_release_and_tail_shows_it_live() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        ..Setup::default()
    })
    .await?;
    let (v1, _) = v1_then_v2(&mut fleet).await?;

    // `convoy tail` follows the live stream while the stage rolls back.
    let bin = convoy_testkit::workspace_bin("convoy", "convoy");
    let tail_out = fleet.path().join("tail.out");
    let mut tail = std::process::Command::new(bin)
        .env("CONVOY_URL", fleet.url())
        .env("CONVOY_TOKEN", common::DEPLOYER_TOKEN)
        .args(["tail", "--json"])
        .stdout(std::fs::File::create(&tail_out)?)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = fleet.cli(&["rollback", "web", "--stage", "prod"]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    for h in &fleet.hosts {
        assert_eq!(
            h.current().as_deref(),
            Some(v1.as_str()),
            "{} is not back on v1",
            h.name
        );
        assert_eq!(
            h.builds_of(&v1),
            1,
            "a rollback switches, it does not rebuild"
        );
    }
    let status = fleet.get("/api/apps")?;
    assert_eq!(status[0]["stages"][0]["release"], v1.as_str());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tail.kill();
    let _ = tail.wait();
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&tail_out)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e["kind"] == "rollout"
            && e["data"]["kind"] == "rollback"
            && e["data"]["state"] == "succeeded"),
        "tail did not show the rollback succeeding: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "progress" && e["data"]["step"] == "switch"),
        "no live step events"
    );
    assert!(events.iter().filter(|e| e["kind"] == "result").count() >= 3);
    Ok(())
}

/// A result is filed under the rollout that sent its command, by the conductor's own
/// record: one naming a rollout this conductor never had (another conductor's, or one from
/// before a restore) is kept under no rollout, before the rollout with that number exists
/// and after, so that rollout shows only its own hosts' results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_an_unknown_rollout_stays_out_of_the_rollout_that_has_its_number()
-> anyhow::Result<()> {
    use convoy_bus::{Bus, Outgoing, Publisher, Retry};
    use convoy_message::names::{HostName, Name};
    use convoy_message::{Body, DeployOutcome, DeployResult, Message};

    let mut fleet = Fleet::new(Setup {
        hosts: 2,
        ..Setup::default()
    })
    .await?;
    fleet.start_with("v1").await?;

    let publisher = Publisher::new(Bus::new(fleet.tb.config(), "test-stray-result")?);
    let noticed = "result of a command this conductor did not send to that host";
    let send_stray = async |fleet: &common::Fleet, seen_before: usize| -> anyhow::Result<String> {
        let stray = uuid::Uuid::new_v4();
        let host = HostName::new(fleet.hosts[0].name.clone())?;
        let result = Message::new(
            format!("agent@{host}"),
            Body::Result(DeployResult {
                command_id: stray,
                host,
                action: "deploy".into(),
                app: Some(Name::new("web")?),
                rollout: Some("1".into()),
                release: None,
                outcome: DeployOutcome::Failed,
                rolled_back: false,
                current: None,
                previous: None,
                steps: vec![],
                error: Some("from another conductor".into()),
                started_at: chrono::Utc::now(),
                duration_ms: 1,
                finished_at: None,
            }),
        );
        publisher
            .publish(&Outgoing::message(&result)?, Retry::once())
            .await?;
        convoy_testkit::wait_until(Duration::from_secs(20), noticed, || {
            let seen = fleet.conductor_log().matches(noticed).count() > seen_before;
            async move { seen.then_some(()) }
        })
        .await?;
        Ok(stray.to_string())
    };

    let before = send_stray(&fleet, 0).await?;
    let id = fleet.deploy("v1", "prod", json!({}))?;
    assert_eq!(
        id, 1,
        "the test needs the rollout to get the stray result's number"
    );
    fleet
        .wait_state(id, &["succeeded"], Duration::from_secs(60))
        .await?;
    let after = send_stray(&fleet, 1).await?;

    let r = fleet.get(&format!("/api/rollouts/{id}"))?;
    let results = r["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 2, "{results:#?}");
    for stray in [before, after] {
        assert!(
            results.iter().all(|x| x["command_id"] != json!(stray)),
            "the stray result {stray} shows in rollout {id}: {results:#?}"
        );
    }
    Ok(())
}

/// `convoy inventory HOST` asks a real agent by a signed command and prints its answer:
/// what each app runs and every release it keeps. The command is the conductor's own (no
/// warning about an unknown result), audited, and any API user may ask; a host nobody
/// knows is refused with the way to list the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_asks_a_host_what_it_runs_and_keeps() -> anyhow::Result<()> {
    let mut fleet = Fleet::new(Setup {
        hosts: 2,
        ..Setup::default()
    })
    .await?;
    let (v1, v2) = v1_then_v2(&mut fleet).await?;
    let host = fleet.hosts[1].name.clone();

    let out = fleet.cli(&["inventory", &host]).await?;
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&host), "{table}");
    let web = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for the app: {table}"));
    assert!(
        web.contains(&format!("{v2} ")) && web.contains(&v1),
        "current {v2}, previous and on disk {v1}: {web}"
    );

    let out = fleet.cli(&["inventory", &host, "--json"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["host"], host.as_str());
    assert_eq!(report["apps"]["web"]["current"], v2.as_str());
    assert_eq!(report["apps"]["web"]["previous"], v1.as_str());
    assert_eq!(report["releases"]["web"], json!([v1, v2]));
    assert_eq!(
        fleet.get(&format!("/api/hosts/{host}/inventory"))?["command"],
        report["command"],
        "the API keeps the last answer"
    );

    // A viewer may ask too; it changes nothing on the host. While unanswered (its agent is
    // down), asking again is the same question, not another command.
    if let Some(a) = fleet.hosts[0].agent.as_mut() {
        a.kill9();
    }
    let ask = format!("/api/hosts/{}/inventory", fleet.hosts[0].name);
    let (status, asked) = fleet.post_as(common::VIEWER_TOKEN, &ask, &json!({}))?;
    assert_eq!(status, 202, "{asked}");
    let (_, again) = fleet.post_as(common::DEPLOYER_TOKEN, &ask, &json!({}))?;
    assert_eq!(again["command"], asked["command"]);
    let waiting = fleet.get(&ask).unwrap_err().to_string();
    assert!(waiting.contains("has not answered yet"), "{waiting}");
    assert!(asked["command"].is_string(), "{asked}");
    let audit = fleet.get("/api/audit")?;
    let asks: Vec<_> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["action"] == "inventory")
        .map(|a| {
            (
                a["actor"].as_str().unwrap_or(""),
                a["detail"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(asks.contains(&("deployer", host.as_str())), "{audit}");
    assert!(
        asks.contains(&("viewer", fleet.hosts[0].name.as_str())),
        "{audit}"
    );

    let out = fleet.cli(&["inventory", "nobody-here"]).await?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("no host named nobody-here") && text(&out).contains("convoy hosts"),
        "{}",
        text(&out)
    );
    let (status, _) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/hosts/..%2Fetc/inventory",
        &json!({}),
    )?;
    assert_eq!(status, 422, "a bad host name is refused");

    // Both agents' results for the inventories are the conductor's own commands.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fleet.conductor_log().contains("did not send"),
        "{}",
        fleet.conductor_log()
    );
    Ok(())
}

/// Starts the fleet on `v1`, rolls `v1` then `v2` out to every host of `prod` in one batch
/// each; the two release ids.
async fn v1_then_v2(fleet: &mut Fleet) -> anyhow::Result<(String, String)> {
    fleet.start_with("v1").await?;
    let all = json!({ "batches": [fleet.hosts.len()] });
    let mut releases = Vec::new();
    for tag in ["v1", "v2"] {
        if tag != "v1" {
            fleet.release(tag)?;
            fleet.wait_ref(tag).await?;
        }
        let id = fleet.deploy(tag, "prod", all.clone())?;
        let done = fleet
            .wait_state(id, &["succeeded"], Duration::from_secs(60))
            .await?;
        releases.push(done["release"].as_str().unwrap_or_default().to_owned());
    }
    Ok((releases[0].clone(), releases[1].clone()))
}

/// What a daemon refuses is kept by the conductor with its reason, the body as it came: a
/// garbled command refused by the agent and a garbled event refused by the conductor
/// itself show in `convoy dead-letters`, one in full by its id, and in the metrics; a
/// viewer cannot clear them, a deployer can, part or all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_kept_with_their_reasons_and_shown_by_the_cli() -> anyhow::Result<()> {
    use convoy_bus::{Bus, Outgoing, Publisher, Retry};
    use convoy_message::names::{HostName, Name};
    use convoy_message::routing::{self, queue};

    let mut fleet = Fleet::new(Setup {
        hosts: 1,
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agent(0)?;
    let host = HostName::new(fleet.hosts[0].name.clone())?;
    let publisher = Publisher::new(Bus::new(fleet.tb.config(), "test-garbage")?);
    let garbage = |routing_key: String, payload: &[u8]| Outgoing {
        exchange: None,
        routing_key,
        id: uuid::Uuid::new_v4(),
        kind: "deploy".into(),
        payload: payload.to_vec(),
        headers: vec![],
        transient: false,
    };
    // Once the agent has declared its queue (a message nobody is bound to is returned).
    let command = garbage(
        routing::command(&host),
        b"{\"v\": 1, \"kind\": \"deploy\", trunc",
    );
    convoy_testkit::wait_until(Duration::from_secs(30), "the agent's queue", || {
        let (p, c) = (&publisher, &command);
        async move { p.publish(c, Retry::once()).await.ok() }
    })
    .await?;
    let web = Name::new("web")?;
    publisher
        .publish(
            &garbage(routing::result(Some(&web), &host), b"\xff\xfe not a result"),
            Retry::once(),
        )
        .await?;

    let listed =
        convoy_testkit::wait_until(Duration::from_secs(30), "two dead letters kept", || {
            let v = fleet.get("/api/dead-letters").ok();
            async move { v.filter(|v| v["letters"].as_array().is_some_and(|l| l.len() == 2)) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", fleet.logs()))?;
    assert_eq!(
        listed["counts"],
        json!([{ "reason": "malformed", "count": 2 }]),
        "{listed:#}"
    );
    let queues: Vec<&str> = listed["letters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["queue"].as_str())
        .collect();
    let (cmd_queue, events) = (
        queue::commands(&fleet.tb.exchange, &host),
        queue::conductor(&fleet.tb.exchange),
    );
    assert!(
        queues.contains(&cmd_queue.as_str()) && queues.contains(&events.as_str()),
        "{queues:?}"
    );
    assert!(
        listed["letters"][0].get("body").is_none(),
        "the list leaves bodies out"
    );

    // The CLI: the table, then one in full.
    let out = fleet.cli(&["dead-letters"]).await?;
    assert!(out.status.success(), "{}", text(&out));
    let table = text(&out);
    assert!(
        table.contains("kept: malformed 2") && table.contains(&cmd_queue),
        "{table}"
    );
    let from_agent = listed["letters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["queue"] == json!(cmd_queue))
        .and_then(|l| l["id"].as_i64())
        .ok_or_else(|| anyhow::anyhow!("no letter from {cmd_queue}: {listed:#}"))?;
    let out = fleet
        .cli(&["dead-letters", &from_agent.to_string()])
        .await?;
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("{\"v\": 1, \"kind\": \"deploy\", trunc")
            && shown.contains("malformed")
            && shown.contains(&format!("refused by   {cmd_queue}@")),
        "{shown}"
    );
    let metrics = fleet.get_text("/metrics")?;
    assert!(metrics.contains("convoy_dead_letters_total 2"), "{metrics}");

    // Clearing: not for a viewer; a deployer clears up to an id, then the rest.
    let oldest = listed["letters"][1]["id"].as_i64().unwrap_or_default();
    let (status, body) = fleet.post_as(
        common::VIEWER_TOKEN,
        "/api/dead-letters/clear",
        &json!({ "all": true }),
    )?;
    assert_eq!(status, 403, "{body}");
    let (status, body) = fleet.post_as(
        common::DEPLOYER_TOKEN,
        "/api/dead-letters/clear",
        &json!({}),
    )?;
    assert_eq!(status, 422, "clearing needs to say what: {body}");
    let out = fleet
        .cli(&["dead-letters", "--clear-through", &oldest.to_string()])
        .await?;
    assert!(
        text(&out).contains("1 dead letter(s) cleared"),
        "{}",
        text(&out)
    );
    let left = fleet.get("/api/dead-letters")?;
    assert_eq!(
        left["letters"].as_array().map(Vec::len),
        Some(1),
        "{left:#}"
    );
    let out = fleet.cli(&["dead-letters", "--clear-all"]).await?;
    assert!(
        text(&out).contains("1 dead letter(s) cleared"),
        "{}",
        text(&out)
    );
    let out = fleet.cli(&["dead-letters"]).await?;
    assert!(text(&out).contains("no dead letters"), "{}", text(&out));
    fleet.audited("clear-dead-letters", "deployer")?;

    // A conductor that cannot read the queue says so beside its (then empty) list.
    let conn = lapin::Connection::connect(&fleet.tb.url, Default::default()).await?;
    conn.create_channel()
        .await?
        .queue_delete(
            queue::dead(&fleet.tb.exchange).as_str().into(),
            Default::default(),
        )
        .await?;
    let _ = conn.close(200, "done".into()).await;
    convoy_testkit::wait_until(Duration::from_secs(30), "the keeper blocked", || {
        let v = fleet.get("/api/dead-letters").ok();
        async move { v.filter(|v| v["blocked"].is_string()) }
    })
    .await?;
    let out = fleet.cli(&["dead-letters"]).await?;
    assert!(
        text(&out).contains("cannot take the dead letters now") && text(&out).contains("NOT_FOUND"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// A host whose agent refuses the command — here it trusts another key under the
/// conductor's key id — fails at once with the agent's reason, taken from the dead letter,
/// rather than at its deadline ten minutes on; the rollout halts rather than skipping it,
/// and `convoy history` names the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_agent_refuses_the_command_fails_at_once_with_the_reason() -> anyhow::Result<()>
{
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        ..Setup::default()
    })
    .await?;
    let trusted = fleet.dir.path().join("trusted");
    let other = fleet.dir.path().join("other-trusted");
    let scratch = tempfile::tempdir()?;
    convoy_message::KeyPair::generate("test-conductor")?.write_files(scratch.path())?;
    std::fs::create_dir_all(&other)?;
    std::fs::copy(
        scratch.path().join("test-conductor.pub"),
        other.join("test-conductor.pub"),
    )?;
    let config = std::fs::read_to_string(&fleet.hosts[1].config)?.replace(
        &format!("trusted_keys_dir = \"{}\"", trusted.display()),
        &format!("trusted_keys_dir = \"{}\"", other.display()),
    );
    anyhow::ensure!(config.contains("other-trusted"), "{config}");
    std::fs::write(&fleet.hosts[1].config, config)?;
    fleet.start_with("v1").await?;

    let id = fleet.deploy(
        "v1",
        "prod",
        json!({ "batches": [1, 1, 1], "host_deadline_s": 600 }),
    )?;
    // Halted within 90 s, with 600 s to go before the host's deadline.
    let r = fleet
        .wait_state(id, &["halted"], Duration::from_secs(90))
        .await?;
    assert_eq!(r["hosts"][0]["state"], "succeeded", "{r:#}");
    assert_eq!(r["hosts"][1]["state"], "failed", "not timed out: {r:#}");
    assert_eq!(r["hosts"][2]["state"], "pending", "nothing skipped: {r:#}");
    let error = r["hosts"][1]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused the command") && error.contains("bad_signature"),
        "{error}"
    );
    assert_eq!(fleet.hosts[1].journal_entries(), 0, "nothing ran there");
    let out = fleet.cli(&["history", &id.to_string()]).await?;
    assert!(text(&out).contains("bad_signature"), "{}", text(&out));

    // Asked for its inventory, the same agent refuses too: `convoy inventory` says why
    // instead of waiting out its 60 s.
    let host = fleet.hosts[1].name.clone();
    let out = fleet.cli(&["inventory", &host, "--wait", "60"]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("refused the command") && text(&out).contains("bad_signature"),
        "{}",
        text(&out)
    );
    Ok(())
}
