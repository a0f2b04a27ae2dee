//! The dashboard end to end, in a real headless Chromium (Debian's `chromium`, driven by
//! `playwright-core`): a 3-host fleet with real agents, fetchers and heartbeats; log in,
//! deploy from the form, watch the hosts turn green live, promote through a manual gate,
//! ask a host's agent for its inventory from the host's page, abort a second rollout, find
//! both in the history; wrong password, missing CSRF token and a read-only Deploy refused. Screenshots land in `target/test-artifacts/web/`.

mod common;

use common::{Fleet, Setup, text};
use convoy_conductor::web::session::hash_password;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const APPS: &str = r#"
[apps.web]
[[apps.web.stages]]
name = "staging"
hosts = [{host0}]
gate = { kind = "manual" }

[[apps.web.stages]]
name = "prod"
hosts = [{host1}, {host2}]
strategy = { batches = [1] }
"#;

/// The browser test's node project, with playwright-core installed (`npm ci` when missing).
fn browser_project() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    anyhow::ensure!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: scripts/test installs it (apt-get install chromium)"
    );
    if !dir.join("node_modules/playwright-core").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "npm ci in {} failed (scripts/test installs Node's packages):\n{}",
            dir.display(),
            text(&out)
        );
    }
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deploys_promotes_and_aborts_in_a_real_browser() -> anyhow::Result<()> {
    let project = browser_project()?;
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nrole = \"deployer\"\n\n\
         [[users]]\nname = \"victor\"\npassword_hash = \"{}\"\nrole = \"viewer\"\n",
        hash_password("alice-secret-1")?,
        hash_password("victor-secret-1")?,
    );
    let mut fleet = Fleet::new(Setup {
        hosts: 3,
        apps: APPS,
        build_sleep: 1.0,
        host_daemons: true,
        conductor_extra: users,
        ..Setup::default()
    })
    .await?;
    fleet.start_conductor().await?;
    fleet.start_agents()?;
    for i in 0..3 {
        fleet.start_host_daemons(i)?;
    }
    fleet.release("v1")?;
    fleet.release("v2")?;
    // A garbled result the conductor refuses, markup in its body: the dead-letters page
    // must show it as text.
    {
        use convoy_bus::{Bus, Outgoing, Publisher, Retry};
        use convoy_message::names::{HostName, Name};
        let publisher = Publisher::new(Bus::new(fleet.tb.config(), "test-garbage")?);
        let garbled = Outgoing {
            exchange: None,
            routing_key: convoy_message::routing::result(
                Some(&Name::new("web")?),
                &HostName::new(fleet.hosts[0].name.clone())?,
            ),
            id: uuid::Uuid::new_v4(),
            kind: "result".into(),
            payload: b"<img src=x onerror=\"window.__xss=1\"> not a result".to_vec(),
            headers: vec![],
            transient: false,
        };
        publisher.publish(&garbled, Retry::once()).await?;
        convoy_testkit::wait_until(Duration::from_secs(30), "the dead letter kept", || {
            let kept = fleet.get("/api/dead-letters").ok();
            async move { kept.filter(|v| v["letters"][0]["reason"] == "malformed") }
        })
        .await?;
    }

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-artifacts/web")
        .canonicalize()
        .or_else(|_| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts/web");
            std::fs::create_dir_all(&p).map(|_| p)
        })?;
    let names: Vec<String> = fleet.hosts.iter().map(|h| h.name.clone()).collect();
    let url = fleet.url();
    let (names2, artifacts2) = (names.clone(), artifacts.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("e2e.mjs")
            .current_dir(&project)
            .env("CONVOY_URL", url)
            .env("DEPLOYER", "alice:alice-secret-1")
            .env("VIEWER", "victor:victor-secret-1")
            .env("STAGING_HOST", &names2[0])
            .env("PROD_HOSTS", format!("{},{}", names2[1], names2[2]))
            .env("ARTIFACTS", &artifacts2)
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the browser test failed (screenshots in {}):\n{}\n{}",
        artifacts.display(),
        text(&out),
        fleet.logs()
    );
    let result: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| anyhow::anyhow!("no RESULT line from the browser test:\n{stdout}"))?;

    // What the browser saw: each host went through another state before green, on a page
    // that was never reloaded.
    for (key, hosts) in [("seen_staging", &names[..1]), ("seen_prod", &names[1..])] {
        for h in hosts {
            let states: Vec<&str> = result[key][h]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert_eq!(
                states.last(),
                Some(&"succeeded"),
                "{h} ends green: {result}"
            );
            assert!(
                states.len() >= 2,
                "{h} was seen changing live, not only green: {states:?}"
            );
        }
    }
    assert_eq!(result["csrf_refused"], serde_json::json!([403, 403]));
    let shots = result["screenshots"].as_array().map_or(0, Vec::len);
    assert!(shots >= 10, "screenshots saved: {result}");

    // And what the conductor recorded.
    let first = result["first_rollout"].as_i64().unwrap_or_default();
    let second = result["second_rollout"].as_i64().unwrap_or_default();
    let r1 = fleet.get(&format!("/api/rollouts/{first}"))?;
    assert_eq!(r1["state"], "succeeded");
    assert_eq!(r1["stage"], "staging");
    assert_eq!(r1["started_by"], "alice");
    let r2 = fleet.get(&format!("/api/rollouts/{second}"))?;
    assert_eq!(r2["state"], "aborted");
    assert_eq!(r2["started_by"], "alice");
    let pipelines = fleet.get("/api/pipelines?app=web")?;
    let p = &pipelines[0];
    assert_eq!(p["state"], "succeeded", "{p}");
    assert_eq!(p["gates"][0]["kind"], "manual");
    assert_eq!(p["gates"][0]["by"], "alice", "the promoter is recorded");
    let v1 = r1["release"].as_str().unwrap_or_default();
    assert_eq!(fleet.hosts[0].current().as_deref(), Some(v1));
    assert_eq!(
        result["inventory_current"], v1,
        "the host page showed what the first prod host's agent runs"
    );
    assert_eq!(
        fleet.hosts[2].current().as_deref(),
        Some(v1),
        "the aborted rollout never reached the last prod host"
    );
    for action in ["deploy", "promote", "abort"] {
        fleet.audited(action, "alice")?;
    }
    let audit = fleet.get("/api/audit")?;
    // Nothing the viewer tried went through.
    assert!(
        !audit
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["actor"] == "victor"),
        "{audit}"
    );
    Ok(())
}
