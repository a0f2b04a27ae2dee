//! Human-readable output: tables and progress lines.

use serde_json::Value;
use std::collections::BTreeMap;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `text` safe for a terminal: control characters (an escape sequence in a message anyone
/// with the broker's write permission sent, say) are shown as `\u{1b}`; new lines and tabs
/// stay. For what strangers wrote (dead letters), not the operators' own hook output.
fn printable(text: &str) -> String {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn short(v: &Value) -> String {
    let text = s(v);
    text.strip_prefix("refs/tags/")
        .or_else(|| text.strip_prefix("refs/heads/"))
        .map(str::to_owned)
        .unwrap_or(text)
}

fn sha7(v: &Value) -> String {
    v.as_str()
        .map(|c| c.chars().take(7).collect())
        .unwrap_or_else(|| "-".into())
}

/// Prints rows under a header, columns padded to fit.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn plan(v: &Value) {
    let st = &v["strategy"];
    println!(
        "plan: {} {} ({}) to {} as release {}",
        s(&v["app"]),
        short(&v["ref"]),
        sha7(&v["commit"]),
        s(&v["stage"]),
        s(&v["release"])
    );
    println!(
        "strategy: batches {}, at most {} failed host(s), {} s per host, {} s between batches, on failure {}",
        st["batches"],
        s(&v["allowed_failures"]),
        s(&st["host_deadline_s"]),
        s(&st["pause_s"]),
        s(&st["on_failure"])
    );
    if let Some(batches) = v["batches"].as_array() {
        let total = batches.len();
        for (i, b) in batches.iter().enumerate() {
            let hosts: Vec<String> = b
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            println!(
                "  batch {}/{total} ({} host(s)): {}",
                i + 1,
                hosts.len(),
                hosts.join(" ")
            );
        }
    }
    for note in v["notes"].as_array().into_iter().flatten() {
        println!("note: {}", s(note));
    }
    if !v["waits_for"].is_null() {
        println!(
            "note: rollout {} runs on this stage now; this one would wait or supersede it",
            v["waits_for"]
        );
    }
}

pub fn started(v: &Value) {
    let sum = if v["summary"].is_object() {
        &v["summary"]
    } else {
        v
    };
    println!(
        "rollout {}: {} {} {} ({}) to {}, {} host(s) in {} batch(es) — {}",
        s(&sum["id"]),
        s(&sum["kind"]),
        s(&sum["app"]),
        short(if sum["ref"].is_null() {
            &sum["release"]
        } else {
            &sum["ref"]
        }),
        sha7(&sum["commit"]),
        s(&sum["stage"]),
        s(&sum["hosts"]),
        s(&sum["batches"]),
        s(&sum["state"])
    );
    for note in v["notes"].as_array().into_iter().flatten() {
        println!("note: {}", s(note));
    }
}

/// Prints what changed since the last look at a rollout.
#[derive(Default)]
pub struct Progress {
    hosts: BTreeMap<String, String>,
    batch: i64,
    state: String,
}

impl Progress {
    pub fn show(&mut self, v: &Value) {
        let sum = &v["summary"];
        let batch = sum["batch"].as_i64().unwrap_or(0);
        let batches = sum["batches"].as_i64().unwrap_or(0);
        let state = s(&sum["state"]);
        if state != self.state && !self.state.is_empty()
            || (self.state.is_empty() && state != "running")
        {
            println!(
                "rollout {}: {state}{}",
                s(&sum["id"]),
                match sum["reason"].as_str() {
                    Some(r) => format!(" — {r}"),
                    None => String::new(),
                }
            );
        }
        self.state = state;
        let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
        if batch != self.batch && batch > 0 {
            let names: Vec<String> = hosts
                .iter()
                .filter(|h| h["batch"].as_i64() == Some(batch - 1))
                .map(|h| s(&h["host"]))
                .collect();
            if !names.is_empty() {
                println!("batch {batch}/{batches}: {}", names.join(" "));
            }
            self.batch = batch;
        }
        for h in &hosts {
            let name = s(&h["host"]);
            let mut st = s(&h["state"]);
            if let Some(u) = h["undo"]["state"].as_str() {
                st = format!("rolled back: {u}");
            }
            if self.hosts.get(&name) == Some(&st) || st == "pending" {
                continue;
            }
            let detail = match (st.as_str(), h["duration_ms"].as_u64(), h["error"].as_str()) {
                (_, _, Some(e)) => format!("  {e}"),
                ("succeeded", Some(ms), _) => format!("  {:.1} s", ms as f64 / 1000.0),
                _ => String::new(),
            };
            println!("  {name:<24} {st}{detail}");
            self.hosts.insert(name, st);
        }
    }
}

pub fn status(v: &Value) {
    let mut rows = Vec::new();
    for app in v.as_array().into_iter().flatten() {
        for stage in app["stages"].as_array().into_iter().flatten() {
            let rollout = stage["rollouts"]
                .as_array()
                .and_then(|r| r.first())
                .map(|r| {
                    format!(
                        "#{} {} batch {}/{} ({} ok, {} failed)",
                        s(&r["id"]),
                        s(&r["state"]),
                        s(&r["batch"]),
                        s(&r["batches"]),
                        r["counts"]["succeeded"].as_u64().unwrap_or(0),
                        r["failures"].as_u64().unwrap_or(0)
                    )
                })
                .unwrap_or_else(|| "-".into());
            let waiting = app["pipelines"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| {
                    p["state"] == "waiting_for_promotion"
                        && p["gates"]
                            .as_array()
                            .and_then(|g| g.last())
                            .is_some_and(|g| g["after"] == stage["name"])
                })
                .map(|p| {
                    format!(
                        " (pipeline {} waits: convoy promote {})",
                        s(&p["id"]),
                        s(&app["name"])
                    )
                })
                .unwrap_or_default();
            rows.push(vec![
                s(&app["name"]),
                s(&stage["name"]),
                s(&stage["release"]),
                sha7(&stage["commit"]),
                format!("{}{waiting}", s(&stage["gate"])),
                rollout,
            ]);
        }
    }
    table(
        &["APP", "STAGE", "RELEASE", "COMMIT", "GATE", "ROLLOUT"],
        &rows,
    );
}

pub fn hosts(v: &Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let labels: Vec<String> = h["labels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
                .unwrap_or_default();
            let apps: Vec<String> = h["apps"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}:{}", s(v))).collect())
                .unwrap_or_default();
            vec![
                s(&h["host"]),
                s(&h["liveness"]),
                s(&h["last_seen"]).chars().take(19).collect(),
                labels.join(","),
                apps.join(" "),
            ]
        })
        .collect();
    table(&["HOST", "STATE", "LAST SEEN", "LABELS", "RELEASES"], &rows);
}

/// One host's inventory: per app, what runs, the rollback target, every release on disk.
pub fn inventory(v: &Value) {
    println!(
        "{} (answered {})",
        s(&v["host"]),
        s(&v["received_at"]).chars().take(19).collect::<String>()
    );
    let rows: Vec<Vec<String>> = v["apps"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(app, a)| {
            let kept: Vec<String> = v["releases"][app]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![
                app.clone(),
                s(&a["current"]),
                s(&a["previous"]),
                sha7(&a["commit"]),
                kept.join(" "),
            ]
        })
        .collect();
    table(
        &[
            "APP",
            "CURRENT",
            "PREVIOUS",
            "COMMIT",
            "RELEASES ON DISK (oldest first)",
        ],
        &rows,
    );
}

fn ps(v: &Value) -> String {
    printable(&s(v))
}

/// The dead letters kept: how many of each reason, then the newest first.
pub fn dead_letters(v: &Value) {
    let counts: Vec<String> = v["counts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{} {}", ps(&c["reason"]), s(&c["count"])))
        .collect();
    if let Some(why) = v["blocked"].as_str() {
        eprintln!(
            "convoy: the conductor cannot take the dead letters now, so this list may miss some: {why}"
        );
    }
    if counts.is_empty() {
        println!("no dead letters kept");
        return;
    }
    println!("kept: {}", counts.join(", "));
    let rows: Vec<Vec<String>> = v["letters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            vec![
                ps(&l["id"]),
                ps(&l["kept_at"]).chars().take(19).collect(),
                ps(&l["reason"]),
                ps(&l["queue"]),
                ps(&l["routing_key"]),
                ps(&l["detail"]),
            ]
        })
        .collect();
    table(
        &["ID", "KEPT", "REASON", "QUEUE", "ROUTING KEY", "DETAIL"],
        &rows,
    );
    println!("`convoy dead-letters ID` shows one with its body");
}

/// One dead letter in full.
pub fn dead_letter(v: &Value) {
    for (label, key) in [
        ("dead letter", "id"),
        ("kept at", "kept_at"),
        ("reason", "reason"),
        ("detail", "detail"),
        ("queue", "queue"),
        ("routing key", "routing_key"),
        ("refused by", "rejected_by"),
        ("refused at", "rejected_at"),
        ("message id", "message_id"),
        ("kind", "kind"),
        ("size", "size"),
    ] {
        println!("{label:<12} {}", ps(&v[key]));
    }
    if let Some(n) = v["truncated_from"].as_u64() {
        println!("{:<12} {n} bytes when refused; cut to 1 MiB", "truncated");
    }
    println!();
    println!("{}", printable(v["body"].as_str().unwrap_or("")));
    if v["body_cut"] == true {
        println!("(… cut: the conductor keeps the first 64 KiB of a body)");
    }
}

fn duration(from: &Value, to: &Value) -> String {
    let parse = |v: &Value| {
        v.as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    match (parse(from), parse(to)) {
        (Some(a), Some(b)) => format!("{:.1} s", (b - a).num_milliseconds() as f64 / 1000.0),
        _ => "-".into(),
    }
}

pub fn history(v: &Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                s(&r["id"]),
                s(&r["app"]),
                s(&r["stage"]),
                short(if r["ref"].is_null() {
                    &r["release"]
                } else {
                    &r["ref"]
                }),
                s(&r["state"]),
                format!(
                    "{}/{}",
                    r["counts"]["succeeded"].as_u64().unwrap_or(0),
                    s(&r["hosts"])
                ),
                s(&r["started_by"]),
                s(&r["created_at"]).chars().take(19).collect(),
                duration(&r["created_at"], &r["finished_at"]),
            ]
        })
        .collect();
    table(
        &[
            "ID", "APP", "STAGE", "REF", "STATE", "OK", "BY", "STARTED", "TOOK",
        ],
        &rows,
    );
}

pub fn rollout_detail(v: &Value) {
    started(v);
    println!(
        "started by {} at {}; {}",
        s(&v["started_by"]),
        s(&v["created_at"]),
        match v["reason"].as_str() {
            Some(r) => r.to_owned(),
            None => format!("took {}", duration(&v["created_at"], &v["finished_at"])),
        }
    );
    let results: Vec<&Value> = v["results"].as_array().into_iter().flatten().collect();
    let rows: Vec<Vec<String>> = v["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            vec![
                s(&h["host"]),
                format!("{}", h["batch"].as_u64().unwrap_or(0) + 1),
                s(&h["state"]),
                h["duration_ms"]
                    .as_u64()
                    .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                    .unwrap_or("-".into()),
                h["undo"]["state"]
                    .as_str()
                    .map(|u| format!("rollback {u}"))
                    .unwrap_or_default(),
                s(&h["error"]),
            ]
        })
        .collect();
    table(&["HOST", "BATCH", "STATE", "TOOK", "UNDO", "ERROR"], &rows);
    for r in results {
        if r["outcome"] == "succeeded" {
            continue;
        }
        println!(
            "\n{} ({}): {}",
            s(&r["host"]),
            s(&r["action"]),
            s(&r["outcome"])
        );
        for step in r["steps"].as_array().into_iter().flatten() {
            println!(
                "  {:<12} {:<10} exit {:<4} {} ms",
                s(&step["step"]),
                s(&step["state"]),
                s(&step["exit_code"]),
                s(&step["duration_ms"])
            );
            if let Some(tail) = step["output_tail"].as_str().filter(|t| !t.is_empty()) {
                for line in tail
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("    | {line}");
                }
            }
        }
    }
}

pub fn event(kind: &str, d: &Value) {
    let now = chrono::Utc::now().format("%H:%M:%S");
    match kind {
        "rollout" => println!(
            "{now} rollout {} {} {} to {}: {} (batch {}/{}, {} ok, {} failed)",
            s(&d["id"]),
            s(&d["app"]),
            short(&d["ref"]),
            s(&d["stage"]),
            s(&d["state"]),
            s(&d["batch"]),
            s(&d["batches"]),
            d["counts"]["succeeded"].as_u64().unwrap_or(0),
            s(&d["failures"])
        ),
        "progress" => println!(
            "{now} {} {} {} {}",
            s(&d["host"]),
            s(&d["app"]),
            s(&d["step"]),
            s(&d["state"])
        ),
        "result" => println!(
            "{now} {} result: {}{}",
            s(&d["host"]),
            s(&d["outcome"]),
            d["error"]
                .as_str()
                .map(|e| format!(" — {e}"))
                .unwrap_or_default()
        ),
        "pipeline" => println!(
            "{now} pipeline {} {}: {} at stage {}",
            s(&d["id"]),
            s(&d["app"]),
            s(&d["state"]),
            s(&d["stage"])
        ),
        "host" => println!("{now} host {} is {}", s(&d["host"]), s(&d["liveness"])),
        "build" => println!(
            "{now} build {} {} {}: {}",
            s(&d["repo"]),
            short(&d["ref"]),
            sha7(&d["commit"]),
            s(&d["status"])
        ),
        other => println!("{now} {other} {d}"),
    }
}
