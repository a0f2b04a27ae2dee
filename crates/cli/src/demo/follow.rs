//! Watching the demo fleet through the conductor's API, as the CLI does: hosts coming
//! alive, the pipeline through its stages and gate, each host's result as it arrives.

use super::children::{Children, Interrupt};
use crate::client::Client;
use anyhow::bail;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The API, with errors as `anyhow`.
pub struct Api {
    client: Client,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            client: Client::new(url, Some(token.to_owned())),
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.client
            .get(path)
            .map_err(|f| anyhow::anyhow!("GET {path}: {}", f.message()))
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.client
            .post(path, body)
            .map_err(|f| anyhow::anyhow!("POST {path}: {}", f.message()))
    }
}

/// When to give up waiting (`None`: wait as long as the person watching likes).
#[derive(Clone, Copy)]
pub struct Deadline(pub Option<Instant>);

impl Deadline {
    /// Fails if the deadline passed, naming what was awaited.
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        if let Some(at) = self.0
            && Instant::now() > at
        {
            bail!("timed out waiting for {what}");
        }
        Ok(())
    }

    /// The earlier of this deadline and `d` from now.
    pub fn within(&self, d: Duration) -> Deadline {
        let other = Instant::now() + d;
        Deadline(Some(self.0.map_or(other, |at| at.min(other))))
    }
}

/// Waits until `GET /health` answers.
pub fn conductor_up(
    url: &str,
    children: &mut Children,
    stop: &Interrupt,
    deadline: Deadline,
) -> anyhow::Result<()> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    loop {
        children.check()?;
        if agent
            .get(&format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        deadline.check("the conductor to answer /health")?;
        stop.sleep(Duration::from_millis(200))?;
    }
}

/// Waits until every host in `names` is `alive` (its heartbeats arrive).
pub fn hosts_alive(
    api: &Api,
    names: &[String],
    children: &mut Children,
    stop: &Interrupt,
    deadline: Deadline,
) -> anyhow::Result<()> {
    loop {
        children.check()?;
        let hosts = api.get("/api/hosts")?;
        let alive = |name: &String| {
            hosts.as_array().is_some_and(|list| {
                list.iter()
                    .any(|h| h["host"] == json!(name) && h["liveness"] == "alive")
            })
        };
        let missing: Vec<&String> = names.iter().filter(|n| !alive(n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        deadline.check(&format!(
            "heartbeats from {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
        stop.sleep(Duration::from_millis(300))?;
    }
}

/// What the pipeline follower does at the manual gate.
pub enum AtGate {
    /// Promote it (`--ci`).
    Promote,
    /// Tell the person how, once, and wait.
    Explain(String),
}

/// Follows the newest pipeline of `app` from its start to its end, printing each rollout's
/// batches and each host's result; promotes or explains at the gate. Returns why it did not
/// succeed, if it did not.
pub fn pipeline(
    api: &Api,
    app: &str,
    gate: AtGate,
    seen: &mut Printed,
    children: &mut Children,
    stop: &Interrupt,
    deadline: Deadline,
) -> anyhow::Result<Option<String>> {
    let start_by = deadline.within(Duration::from_secs(60));
    let mut explained = false;
    loop {
        children.check()?;
        let list = api.get(&format!("/api/pipelines?app={app}&limit=1"))?;
        let Some(p) = list.as_array().and_then(|l| l.first()).cloned() else {
            start_by
                .check("the pipeline to start (the CI's build event to reach the conductor)")?;
            stop.sleep(Duration::from_millis(200))?;
            continue;
        };
        seen.pipeline(&p);
        for id in p["rollouts"].as_array().into_iter().flatten() {
            if let Some(id) = id.as_i64() {
                let r = api.get(&format!("/api/rollouts/{id}"))?;
                seen.rollout(&r);
                if let Some(why) = stuck(&r) {
                    match &gate {
                        // Nobody is there to retry it: say why, and stop.
                        AtGate::Promote => bail!("{why}"),
                        AtGate::Explain(_) if seen.warned.insert(id) => {
                            println!("  >>> {why}");
                            if r["state"] == "halted" {
                                println!(
                                    "  >>> `convoy retry {id}` goes on, `convoy abort {id}` gives up"
                                );
                            }
                        }
                        AtGate::Explain(_) => {}
                    }
                }
            }
        }
        let state = p["state"].as_str().unwrap_or("");
        match state {
            "succeeded" => return Ok(None),
            "failed" | "aborted" => {
                return Ok(Some(format!(
                    "the pipeline {state}: {}",
                    p["reason"].as_str().unwrap_or("no reason given")
                )));
            }
            "waiting_for_promotion" => match &gate {
                AtGate::Promote => {
                    println!(
                        "  gate     manual: promoting (as an operator would with `convoy promote {app}`)"
                    );
                    api.post(
                        &format!("/api/apps/{app}/promote"),
                        &json!({ "stage": "staging" }),
                    )?;
                }
                AtGate::Explain(how) if !explained => {
                    println!("{how}");
                    explained = true;
                }
                AtGate::Explain(_) => {}
            },
            _ => {}
        }
        if state != "waiting_for_promotion" || matches!(gate, AtGate::Promote) {
            deadline.check(&format!("the pipeline (now {state})"))?;
        }
        stop.sleep(Duration::from_millis(250))?;
    }
}

/// Why a rollout of the pipeline will not go on by itself, if it will not: halted (a
/// host failed beyond the budget, or missed its deadline), rolled back or aborted — with
/// each failed host's error.
fn stuck(r: &Value) -> Option<String> {
    let state = r["state"].as_str().unwrap_or("");
    if !matches!(state, "halted" | "rolled_back" | "aborted") {
        return None;
    }
    let failed: Vec<String> = r["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| matches!(h["state"].as_str(), Some("failed" | "timed_out")))
        .map(|h| {
            format!(
                "{}: {}",
                h["host"].as_str().unwrap_or("?"),
                h["error"]
                    .as_str()
                    .unwrap_or(h["state"].as_str().unwrap_or("?"))
            )
        })
        .collect();
    Some(format!(
        "rollout {} to {} {state}: {}{}",
        r["id"],
        r["stage"].as_str().unwrap_or("?"),
        r["reason"].as_str().unwrap_or("no reason given"),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", failed.join("; "))
        }
    ))
}

/// What was printed already, so each change is printed once.
#[derive(Default)]
pub struct Printed {
    rollouts: BTreeMap<i64, String>,
    hosts: BTreeMap<(i64, String), String>,
    pipelines: BTreeMap<i64, String>,
    /// Rollouts whose halt was explained.
    warned: BTreeSet<i64>,
}

impl Printed {
    /// Prints a rollout's hosts' results and its state changes.
    pub fn rollout(&mut self, r: &Value) {
        let id = r["id"].as_i64().unwrap_or_default();
        let stage = r["stage"].as_str().unwrap_or("?").to_owned();
        self.hosts_of(id, &stage, r);
        let state = r["state"].as_str().unwrap_or("?").to_owned();
        let batches = r["summary"]["batches"].as_u64().unwrap_or(0);
        let batch = r["summary"]["batch"].as_u64().unwrap_or(0);
        let line = match state.as_str() {
            "running" => format!("running batch {batch} of {batches}"),
            other => other.to_owned(),
        };
        if self.rollouts.get(&id) != Some(&line) {
            println!(
                "  {stage:<8} rollout {id} of {}: {line}",
                r["release"].as_str().unwrap_or("")
            );
            self.rollouts.insert(id, line);
        }
    }

    fn hosts_of(&mut self, id: i64, stage: &str, r: &Value) {
        for h in r["hosts"].as_array().into_iter().flatten() {
            let name = h["host"].as_str().unwrap_or("?").to_owned();
            let state = h["state"].as_str().unwrap_or("?").to_owned();
            if !matches!(state.as_str(), "succeeded" | "failed" | "timed_out") {
                continue;
            }
            let key = (id, name.clone());
            if self.hosts.get(&key) == Some(&state) {
                continue;
            }
            let took = h["duration_ms"]
                .as_u64()
                .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default();
            let error = h["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!("  {stage:<8}   {name:<10} {state}{took}{error}");
            self.hosts.insert(key, state);
        }
    }

    /// Prints a pipeline's state changes.
    pub fn pipeline(&mut self, p: &Value) {
        let id = p["id"].as_i64().unwrap_or_default();
        let state = p["state"].as_str().unwrap_or("?").to_owned();
        if self.pipelines.get(&id) != Some(&state) {
            println!(
                "  pipeline {id} ({}, {}): {state}",
                p["git_ref"]
                    .as_str()
                    .unwrap_or("?")
                    .trim_start_matches("refs/tags/"),
                p["trigger"].as_str().unwrap_or("")
            );
            self.pipelines.insert(id, state);
        }
    }
}
