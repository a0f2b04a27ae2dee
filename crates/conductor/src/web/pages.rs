//! The HTML of each page. maud escapes every value it interpolates.

use super::session::Session;
use super::{DeployChoices, DeployFields, HistoryFilter};
use crate::config::{Config, Role};
use crate::dead::DeadLetter;
use crate::fleet::{HostView, Liveness};
use crate::rollout::{HostSlot, HostState, Rollout};
use crate::store::AuditEntry;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use convoy_message::DeployResult;
use convoy_message::names::HostName;
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;
use std::collections::BTreeMap;

/// Hosts listed on the dashboard's fleet table (problems first); the rest are counted.
const FLEET_ROWS: usize = 300;

fn layout(user: Option<&Session>, title: &str, nav: &str, live: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · convoy" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "convoy" }
                    @if let Some(u) = user {
                        nav aria-label="Main" {
                            @for (href, label) in [("/", "Dashboard"), ("/deploy", "Deploy"), ("/history", "History"), ("/audit", "Audit"), ("/dead-letters", "Dead letters")] {
                                a href=(href) aria-current=[(nav == label).then_some("page")] { (label) }
                            }
                        }
                        div.who {
                            span #live-status .status role="status" aria-live="polite" {}
                            span { (u.user) " " span.role { (role_name(u.role)) } }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(u.csrf);
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main #main data-live[live] {
                    div #live { (body) }
                }
            }
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Viewer => "read-only",
        Role::Deployer => "deployer",
    }
}

fn csrf(u: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(u.csrf); }
}

/// A button that POSTs (with the CSRF token) to `action`.
fn action_button(
    u: &Session,
    action: &str,
    label: &str,
    class: &str,
    confirm: Option<&str>,
) -> Markup {
    html! {
        form.inline method="post" action=(action) data-confirm=[confirm] {
            (csrf(u))
            button type="submit" class=(class) { (label) }
        }
    }
}

fn ago(t: DateTime<Utc>) -> String {
    let s = (Utc::now() - t).num_seconds();
    match s {
        i64::MIN..=4 => "just now".into(),
        5..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => t.format("%Y-%m-%d %H:%M").to_string(),
    }
}

fn when(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) title=(t.format("%Y-%m-%d %H:%M:%S UTC")) { (ago(t)) } }
}

fn when_str(t: &str) -> Markup {
    match DateTime::parse_from_rfc3339(t) {
        Ok(t) => when(t.with_timezone(&Utc)),
        Err(_) => html! { (t) },
    }
}

fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn short_sha(s: &str) -> &str {
    s.get(..7).unwrap_or(s)
}

fn short_ref(r: &str) -> &str {
    r.strip_prefix("refs/tags/")
        .or_else(|| r.strip_prefix("refs/heads/"))
        .unwrap_or(r)
}

fn badge(state: &str) -> Markup {
    html! { span class={ "badge s-" (state) } { (state.replace('_', " ")) } }
}

/// One host as a coloured cell (colour and a symbol, and the state in words for readers).
fn host_cell(host: &str, state: &str, title: &str) -> Markup {
    let symbol = match state {
        "succeeded" => "✓",
        "failed" => "✗",
        "timed_out" => "⏱",
        "sent" => "…",
        _ => "·",
    };
    html! {
        li class={ "cell s-" (state) } title=(title) data-host=(host) data-state=(state) {
            span.sym aria-hidden="true" { (symbol) }
            span.name { (host) }
            span.sr { ": " (state.replace('_', " ")) }
        }
    }
}

pub fn login(csrf: &str, next: &str, error: Option<&str>) -> Markup {
    layout(
        None,
        "Log in",
        "",
        false,
        html! {
            section.login {
                h1 { "Log in" }
                @if let Some(e) = error { p.error role="alert" { (e) } }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="next" value=(next);
                    label for="user" { "User" }
                    input #user type="text" name="user" autocomplete="username" required autofocus;
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                    button.primary type="submit" { "Log in" }
                }
            }
        },
    )
}

pub fn error(user: Option<&Session>, status: StatusCode, message: &str) -> Markup {
    layout(
        user,
        "Refused",
        "",
        false,
        html! {
            section.problem {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error role="alert" { (message) }
                p { a href="/" { "Back to the dashboard" } }
            }
        },
    )
}

pub fn dashboard(u: &Session, apps: &Value, hosts: &[HostView]) -> Markup {
    let deployer = u.role == Role::Deployer;
    let body = html! {
        h1.sr { "Dashboard" }
        @for app in apps.as_array().into_iter().flatten() {
            (app_section(u, deployer, app))
        }
        (fleet_section(hosts))
    };
    layout(Some(u), "Dashboard", "Dashboard", true, body)
}

fn app_section(u: &Session, deployer: bool, app: &Value) -> Markup {
    let name = app["name"].as_str().unwrap_or_default();
    let stages = app["stages"].as_array().cloned().unwrap_or_default();
    let pipelines = app["pipelines"].as_array().cloned().unwrap_or_default();
    html! {
        section.app aria-labelledby={ "app-" (name) } {
            h2 #{ "app-" (name) } { (name) " " small { "repo " (app["repo"].as_str().unwrap_or_default()) } }
            ol.pipeline {
                @for (i, stage) in stages.iter().enumerate() {
                    @let stage_name = stage["name"].as_str().unwrap_or_default();
                    @let waiting = pipelines.iter().find(|p| p["stage"].as_u64() == Some(i as u64) && !is_terminal_pipeline(p));
                    li.stage data-stage=(stage_name) {
                        h3 { (stage_name) }
                        p.release {
                            @if let Some(rel) = stage["release"].as_str() {
                                span.k { "release " } code { (rel) }
                            } @else {
                                span.muted { "nothing deployed yet" }
                            }
                        }
                        p.muted {
                            @let named = stage["hosts"].as_array().map(Vec::len).unwrap_or(0);
                            @if named > 0 { (named) " host" @if named != 1 { "s" } }
                            @if let Some(labels) = stage["labels"].as_object().filter(|l| !l.is_empty()) {
                                " labels "
                                @for (k, v) in labels { code { (k) "=" (v.as_str().unwrap_or_default()) } " " }
                            }
                        }
                        @for r in stage["rollouts"].as_array().into_iter().flatten() {
                            (rollout_card(r))
                        }
                        div.gate {
                            @if i + 1 == stages.len() {
                                span.k { "last stage" }
                            } @else {
                                span.k { "gate " } (stage["gate"].as_str().unwrap_or("auto"))
                            }
                            @if let Some(p) = waiting {
                                @match p["state"].as_str().unwrap_or_default() {
                                    "waiting_for_promotion" => {
                                        p.waiting role="status" {
                                            "waiting for promotion: " code { (p["release"].as_str().unwrap_or_default()) }
                                        }
                                        @if deployer {
                                            form.inline method="post" action={ "/apps/" (name) "/promote" } {
                                                (csrf(u))
                                                input type="hidden" name="stage" value=(stage_name);
                                                button.primary type="submit" { "Promote " (p["git_ref"].as_str().map(short_ref).unwrap_or_default()) }
                                            }
                                        }
                                    }
                                    "gating" => { p.muted { "checking (tests running)…" } }
                                    _ => {}
                                }
                            }
                        }
                        @if deployer {
                            p.actions {
                                a.button href={ "/deploy?app=" (name) "&stage=" (stage_name) } { "Deploy…" }
                                @if stage["previous_release"].is_string() && stage["rollouts"].as_array().is_none_or(Vec::is_empty) {
                                    " "
                                    (action_button(u, &format!("/apps/{name}/stages/{stage_name}/rollback"), "Roll back", "",
                                        Some("Roll this stage back to its previous release?")))
                                }
                            }
                        }
                    }
                }
            }
            @if !pipelines.is_empty() {
                details.pipelines {
                    summary { "Recent pipelines" }
                    div.scroll {
                        table {
                            thead { tr { th { "#" } th { "release" } th { "trigger" } th { "state" } th { "stage" } th { "rollouts" } } }
                            tbody {
                                @for p in &pipelines {
                                    tr {
                                        td { (p["id"]) }
                                        td { code { (p["release"].as_str().unwrap_or_default()) } }
                                        td { (p["trigger"].as_str().unwrap_or_default()) }
                                        td { (badge(p["state"].as_str().unwrap_or_default())) }
                                        td { (stages.get(p["stage"].as_u64().unwrap_or(0) as usize).and_then(|s| s["name"].as_str()).unwrap_or("")) }
                                        td { @for r in p["rollouts"].as_array().into_iter().flatten() { a href={ "/rollouts/" (r) } { "#" (r) } " " } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn is_terminal_pipeline(p: &Value) -> bool {
    matches!(
        p["state"].as_str(),
        Some("succeeded" | "failed" | "aborted")
    )
}

/// An active rollout on the dashboard: state, batch, progress and the host grid.
fn rollout_card(r: &Value) -> Markup {
    let total = r["hosts"].as_u64().unwrap_or(0);
    let done = r["counts"]["succeeded"].as_u64().unwrap_or(0);
    html! {
        div.rollout data-rollout=(r["id"]) {
            p {
                a href={ "/rollouts/" (r["id"]) } { "Rollout #" (r["id"]) }
                " " (badge(r["state"].as_str().unwrap_or_default()))
                " " code { (short_ref(r["ref"].as_str().unwrap_or_default())) }
                " · batch " (r["batch"]) "/" (r["batches"])
            }
            @if let Some(reason) = r["reason"].as_str() { p.reason { (reason) } }
            progress value=(done) max=(total.max(1)) aria-label="hosts done" { (done) "/" (total) }
            span.muted { " " (done) "/" (total) " hosts" }
            ul.grid {
                @for h in r["host_states"].as_array().into_iter().flatten() {
                    @let host = h["host"].as_str().unwrap_or_default();
                    @let state = h["state"].as_str().unwrap_or_default();
                    (host_cell(host, state, &format!("{host}: {} (batch {}){}", state.replace('_', " "), h["batch"],
                        h["error"].as_str().map(|e| format!(" — {e}")).unwrap_or_default())))
                }
            }
        }
    }
}

fn fleet_section(hosts: &[HostView]) -> Markup {
    let count = |l: Liveness| hosts.iter().filter(|h| h.liveness == l).count();
    let mut shown: Vec<&HostView> = hosts.iter().collect();
    shown.sort_by_key(|h| match h.liveness {
        Liveness::Gone => 0,
        Liveness::Stale => 1,
        Liveness::Alive => 2,
    });
    let hidden = shown.len().saturating_sub(FLEET_ROWS);
    shown.truncate(FLEET_ROWS);
    html! {
        section #fleet aria-labelledby="fleet-h" {
            h2 #fleet-h { "Fleet" }
            p.counts {
                span.badge.s-alive { (count(Liveness::Alive)) " alive" } " "
                span.badge.s-stale { (count(Liveness::Stale)) " stale" } " "
                span.badge.s-gone { (count(Liveness::Gone)) " gone" }
            }
            @if hosts.is_empty() {
                p.muted { "No heartbeat received yet: is convoy-heartbeat running on the hosts, on the same exchange?" }
            } @else {
                div.scroll {
                    table.fleet {
                        thead { tr { th { "host" } th { "state" } th { "last seen" } th { "labels" } th { "releases" } th { "load" } th { "disk free" } } }
                        tbody {
                            @for h in &shown {
                                @let l = liveness_name(h.liveness);
                                tr class={ "l-" (l) } {
                                    td { a href={ "/hosts/" (h.host.as_str()) } { (h.host.as_str()) } }
                                    td { (badge(l)) }
                                    td { (when(h.last_seen)) }
                                    td { @for (k, v) in &h.labels { code { (k) "=" (v) } " " } }
                                    td { @for (app, rel) in &h.apps { (app) " " code { (rel.as_deref().unwrap_or("—")) } " " } }
                                    td { (format!("{:.2}", h.load[0])) }
                                    td { (format!("{:.1} GiB", h.disk_free_bytes as f64 / (1u64 << 30) as f64)) }
                                }
                            }
                        }
                    }
                }
                @if hidden > 0 { p.muted { "… and " (hidden) " more alive hosts" } }
            }
        }
    }
}

/// One host: its last heartbeat and its agent's inventory, with the button that asks for it.
pub fn host(
    u: &Session,
    name: &HostName,
    view: Option<&HostView>,
    inventory: Option<&Value>,
    refused: Option<&Value>,
) -> Markup {
    let host = name.as_str();
    let body = html! {
        h1 { "Host " code { (host) } " " @if let Some(v) = view { (badge(liveness_name(v.liveness))) } }
        @if let Some(v) = view {
            dl.facts {
                dt { "last heartbeat" } dd { (when(v.last_seen)) }
                dt { "labels" } dd { @for (k, val) in &v.labels { code { (k) "=" (val) } " " } }
                dt { "runs" } dd { @for (app, rel) in &v.apps { (app) " " code { (rel.as_deref().unwrap_or("—")) } " " } }
                dt { "convoy" } dd { @for (k, val) in &v.versions { (k) " " (val) " " } }
                dt { "load" } dd { (format!("{:.2} {:.2} {:.2}", v.load[0], v.load[1], v.load[2])) }
                dt { "disk free" } dd { (format!("{:.1} GiB", v.disk_free_bytes as f64 / (1u64 << 30) as f64)) }
            }
        } @else {
            p.muted { "No heartbeat from this host since the conductor started." }
        }
        section #inventory aria-labelledby="inventory-h" {
            h2 #inventory-h { "Releases on disk" }
            @if let Some(r) = refused {
                p.error role="alert" { "The last question was refused: " (r["refused"].as_str().unwrap_or_default()) }
            }
            @if let Some(inv) = inventory {
                p.muted { "as its agent answered " (when_str(inv["received_at"].as_str().unwrap_or_default())) }
                div.scroll {
                    table.inventory {
                        thead { tr { th { "app" } th { "current" } th { "previous (rollback target)" } th { "commit" } th { "every release kept, oldest first" } } }
                        tbody {
                            @for (app, a) in inv["apps"].as_object().into_iter().flatten() {
                                tr data-app=(app) {
                                    td { (app) }
                                    td data-current { code { (a["current"].as_str().unwrap_or("—")) } }
                                    td { code { (a["previous"].as_str().unwrap_or("—")) } }
                                    td { code { (short_sha(a["commit"].as_str().unwrap_or("—"))) } }
                                    td { @for r in inv["releases"][app.as_str()].as_array().into_iter().flatten() { code { (r.as_str().unwrap_or_default()) } " " } }
                                }
                            }
                        }
                    }
                }
            } @else {
                p.muted { "Not asked since the conductor started." }
            }
            form.inline method="post" action={ "/hosts/" (host) "/inventory" } {
                (csrf(u))
                button type="submit" { "Ask its agent" }
            }
            p.muted { "A signed command the agent answers in a moment; it changes nothing on the host." }
        }
    };
    layout(Some(u), host, "Dashboard", true, body)
}

fn liveness_name(l: Liveness) -> &'static str {
    match l {
        Liveness::Alive => "alive",
        Liveness::Stale => "stale",
        Liveness::Gone => "gone",
    }
}

pub fn rollout(
    u: &Session,
    r: &Rollout,
    json: &Value,
    results: &[DeployResult],
    steps: &BTreeMap<String, Value>,
) -> Markup {
    let deployer = u.role == Role::Deployer;
    let state = r.state.as_str();
    let summary = &json["summary"];
    let total = r.hosts.len();
    let done = r
        .hosts
        .iter()
        .filter(|h| h.state == HostState::Succeeded)
        .count();
    let base = format!("/rollouts/{}", r.id);
    let body = html! {
        h1 { "Rollout #" (r.id) ": " (r.app.as_str()) " → " (r.stage) " " (badge(state)) }
        @if let Some(reason) = &r.reason { p.reason role="status" { (reason) } }
        dl.facts {
            dt { "kind" } dd { (summary["kind"].as_str().unwrap_or_default()) }
            dt { "ref" } dd { code { (r.git_ref.as_ref().map(|g| g.as_str()).unwrap_or("—")) } }
            dt { "commit" } dd { code { (r.commit.as_ref().map(|c| short_sha(c.as_str())).unwrap_or("—")) } }
            dt { "release" } dd { code { (r.release.as_str()) } }
            dt { "started by" } dd { (r.started_by) }
            dt { "started" } dd { (when(r.created_at)) }
            @if let Some(f) = r.finished_at { dt { "finished" } dd { (when(f)) " (" (duration((f - r.created_at).num_milliseconds().max(0) as u64)) ")" } }
            dt { "batch" } dd { ((r.batch + 1).min(r.batches)) "/" (r.batches) }
            dt { "failures" } dd { (summary["failures"]) " of " (summary["allowed_failures"]) " allowed" }
            dt { "strategy" } dd { "batches " code { (r.strategy.batches.to_string()) } ", deadline " (r.strategy.host_deadline_s) " s per host, on failure " (format!("{:?}", r.strategy.on_failure).to_lowercase()) @if r.strategy.pause_s > 0 { ", pause " (r.strategy.pause_s) " s" } }
            @if let Some(p) = r.pipeline { dt { "pipeline" } dd { "#" (p) } }
        }
        progress value=(done) max=(total.max(1)) aria-label="hosts done" { (done) "/" (total) }
        span.muted { " " (done) "/" (total) " hosts succeeded" }
        @if deployer {
            div.actions {
                @if state == "running" || state == "queued" { (action_button(u, &format!("{base}/pause"), "Pause", "", None)) }
                @if state == "paused" { (action_button(u, &format!("{base}/resume"), "Resume", "primary", None)) }
                @if state == "halted" { (action_button(u, &format!("{base}/retry"), "Retry", "primary", None)) }
                @if !r.state.is_terminal() { (action_button(u, &format!("{base}/abort"), "Abort", "danger", Some("Abort this rollout? Hosts not yet sent a command will not get it."))) }
                (action_button(u, &format!("/apps/{}/stages/{}/rollback", r.app.as_str(), r.stage), "Roll back stage", "",
                    Some("Roll the whole stage back to its previous release?")))
            }
        }
        ul.grid {
            @for h in &r.hosts {
                (host_cell(h.host.as_str(), h.state.as_str(), &format!("{}: {} (batch {})", h.host, h.state.as_str(), h.batch + 1)))
            }
        }
        @for batch in 0..r.batches {
            @let hosts: Vec<&HostSlot> = r.hosts.iter().filter(|h| h.batch == batch).collect();
            section.batch {
                h2 { "Batch " (batch + 1) " " span.muted { "(" (hosts.len()) " host" @if hosts.len() != 1 { "s" } ")" } }
                @for h in hosts {
                    (host_timeline(h, results, steps))
                }
            }
        }
    };
    layout(Some(u), &format!("Rollout #{}", r.id), "", true, body)
}

fn host_timeline(
    h: &HostSlot,
    results: &[DeployResult],
    steps: &BTreeMap<String, Value>,
) -> Markup {
    let mine: Vec<&DeployResult> = results.iter().filter(|x| x.host == h.host).collect();
    let now_step = h
        .command
        .filter(|_| h.state == HostState::Sent)
        .and_then(|c| steps.get(&c.to_string()));
    html! {
        article.host data-host=(h.host.as_str()) {
            h3 { (h.host.as_str()) " " (badge(h.state.as_str())) }
            p.muted {
                @if let Some(t) = h.sent_at { "sent " (when(t)) }
                @if h.attempts > 1 { " · " (h.attempts) " attempts" }
                @if let Some(ms) = h.duration_ms { " · took " (duration(ms)) }
                @if let Some(d) = h.deadline_at.filter(|_| h.state == HostState::Sent) { " · deadline " (when(d)) }
                @if let Some(b) = &h.before { " · before: " code { (b.as_str()) } }
            }
            @if let Some(p) = now_step {
                p.now role="status" { "now: " strong { (p["step"].as_str().unwrap_or_default()) } " " (p["state"].as_str().unwrap_or_default()) }
            }
            @if let Some(e) = &h.error { p.error { (e) } }
            @if h.agent_rolled_back { p.reason { "the agent put the previous release back after a failure past the switch" } }
            @if let Some(undo) = &h.undo {
                p { "undo to " code { (undo.release.as_str()) } ": " (badge(undo.state.as_str())) @if let Some(e) = &undo.error { " " span.error { (e) } } }
            }
            @for res in mine {
                details.result open[res.outcome != convoy_message::DeployOutcome::Succeeded] {
                    summary {
                        (res.action) " " (badge(&format!("{:?}", res.outcome).to_lowercase())) " in " (duration(res.duration_ms))
                        @if res.rolled_back { " · rolled back" }
                    }
                    @if let Some(e) = &res.error { p.error { (e) } }
                    @if !res.steps.is_empty() {
                        div.scroll {
                            table.steps {
                                thead { tr { th { "step" } th { "state" } th { "exit" } th { "took" } th { "output (tail)" } } }
                                tbody {
                                    @for st in &res.steps {
                                        @let step = serde_json::to_value(st.step).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                                        @let state = serde_json::to_value(st.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                                        tr {
                                            td { (step) }
                                            td { (badge(&state)) }
                                            td { (st.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into())) }
                                            td { (duration(st.duration_ms)) }
                                            td { @if !st.output_tail.is_empty() { pre { (st.output_tail) } } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn deploy(
    u: &Session,
    config: &Config,
    c: &DeployChoices,
    f: &DeployFields,
    plan: Option<&Value>,
    error: Option<&str>,
) -> Markup {
    let stage_cfg = config
        .apps
        .get(&c.app)
        .and_then(|a| a.stage(&c.stage))
        .map(|(_, s)| s);
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    let body = html! {
        h1 { "Deploy" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        @if u.role != Role::Deployer {
            p.note { "You are read-only: you can preview a plan; deploying needs the deployer role." }
        }
        form.deploy method="post" action="/deploy" {
            (csrf(u))
            div.row {
                div {
                    label for="app" { "App" }
                    select #app name="app" data-reload {
                        @for name in config.apps.keys() { option value=(name) selected[*name == c.app] { (name) } }
                    }
                }
                div {
                    label for="stage" { "Stage" }
                    select #stage name="stage" data-reload {
                        @for s in config.apps.get(&c.app).map(|a| a.stages.as_slice()).unwrap_or_default() {
                            option value=(s.name) selected[s.name == c.stage] { (s.name) }
                        }
                    }
                }
                div.nojs {
                    button type="submit" name="action" value="refs" formnovalidate { "Show refs for this app and stage" }
                }
            }
            p.muted {
                "Target hosts: "
                @if c.hosts.is_empty() { "none" }
                @for h in &c.hosts { code { (h) } " " }
            }
            @for n in &c.notes { p.note { (n) } }
            label for="ref" { "Ref " span.muted { "(only refs present, at the same commit, on every target host)" } }
            select #ref name="ref" required {
                option value="" { "— choose —" }
                @for r in &c.refs {
                    option value=(r.name) selected[f.git_ref.as_deref() == Some(r.name.as_str())] {
                        (short_ref(&r.name)) " — " (short_sha(&r.sha)) @if r.name.starts_with("refs/heads/") { " (branch)" } @else { " (tag)" }
                    }
                }
            }
            fieldset {
                legend { "Strategy " span.muted { "(empty: the stage's own)" } }
                div.row {
                    div {
                        label for="batches" { "Batches" }
                        input #batches name="batches" value=(v(&f.batches)) placeholder=[stage_cfg.map(|s| s.strategy.batches.to_string())] aria-describedby="batches-help";
                        small #batches-help { "counts or percentages, the last repeats: " code { "1, 10%, 50%, 100%" } }
                    }
                    div {
                        label for="max_failures" { "Max failures" }
                        input #max_failures name="max_failures" value=(v(&f.max_failures)) placeholder=[stage_cfg.map(|s| s.strategy.max_failures.to_string())];
                    }
                    div {
                        label for="on_failure" { "On failure" }
                        select #on_failure name="on_failure" {
                            option value="" { "stage default" }
                            @for o in ["halt", "rollback"] { option value=(o) selected[f.on_failure.as_deref() == Some(o)] { (o) } }
                        }
                    }
                    div {
                        label for="pause_s" { "Pause between batches (s)" }
                        input #pause_s name="pause_s" inputmode="numeric" value=(v(&f.pause_s)) placeholder=[stage_cfg.map(|s| s.strategy.pause_s.to_string())];
                    }
                    div {
                        label for="host_deadline_s" { "Deadline per host (s)" }
                        input #host_deadline_s name="host_deadline_s" inputmode="numeric" value=(v(&f.host_deadline_s)) placeholder=[stage_cfg.map(|s| s.strategy.host_deadline_s.to_string())];
                    }
                }
            }
            @if !c.last_stage {
                label.check {
                    input type="checkbox" name="pipeline" value="1" checked[f.pipeline(c.last_stage)];
                    " Then carry it on through the later stages and their gates"
                }
            }
            div.actions {
                button type="submit" name="action" value="preview" { "Preview plan" }
                " "
                button.primary type="submit" name="action" value="deploy" { "Deploy" }
            }
        }
        @if let Some(p) = plan { (plan_view(p)) }
    };
    layout(Some(u), "Deploy", "Deploy", false, body)
}

fn plan_view(p: &Value) -> Markup {
    html! {
        section.plan aria-labelledby="plan-h" {
            h2 #plan-h { "Plan" }
            p {
                "Release " code { (p["release"].as_str().unwrap_or_default()) }
                " of " code { (p["commit"].as_str().map(short_sha).unwrap_or_default()) }
                " to " (p["stage"].as_str().unwrap_or_default())
                "; up to " (p["allowed_failures"]) " failure(s) allowed."
            }
            @if let Some(w) = p["waits_for"].as_i64() { p.note { "It will wait for rollout " a href={ "/rollouts/" (w) } { "#" (w) } " to end first." } }
            @for n in p["notes"].as_array().into_iter().flatten() { p.note { (n.as_str().unwrap_or_default()) } }
            ol.batches {
                @for b in p["batches"].as_array().into_iter().flatten() {
                    li { @for h in b.as_array().into_iter().flatten() { code { (h.as_str().unwrap_or_default()) } " " } }
                }
            }
        }
    }
}

fn filter_form(config: &Config, q: &HistoryFilter, action: &str, with_host: bool) -> Markup {
    let stages: std::collections::BTreeSet<&str> = config
        .apps
        .values()
        .flat_map(|a| a.stages.iter().map(|s| s.name.as_str()))
        .collect();
    html! {
        form.filters method="get" action=(action) {
            div {
                label for="f-app" { "App" }
                select #f-app name="app" {
                    option value="" { "all" }
                    @for a in config.apps.keys() { option value=(a) selected[q.app.as_deref() == Some(a.as_str())] { (a) } }
                }
            }
            div {
                label for="f-stage" { "Stage" }
                select #f-stage name="stage" {
                    option value="" { "all" }
                    @for s in stages { option value=(s) selected[q.stage.as_deref() == Some(s)] { (s) } }
                }
            }
            @if with_host {
                div {
                    label for="f-host" { "Host" }
                    input #f-host name="host" value=(q.host.clone().unwrap_or_default());
                }
            }
            div { button type="submit" { "Filter" } }
        }
    }
}

pub fn history(u: &Session, config: &Config, q: &HistoryFilter, rollouts: &[Rollout]) -> Markup {
    let body = html! {
        h1 { "History" }
        (filter_form(config, q, "/history", true))
        @if rollouts.is_empty() { p.muted { "No rollout matches." } } @else {
            div.scroll {
                table.history {
                    thead { tr { th { "#" } th { "app" } th { "stage" } th { "kind" } th { "ref" } th { "release" } th { "outcome" } th { "hosts ok / failed / all" } th { "started by" } th { "started" } th { "took" } } }
                    tbody {
                        @for r in rollouts {
                            @let ok = r.hosts.iter().filter(|h| h.state == HostState::Succeeded).count();
                            @let failed = r.hosts.iter().filter(|h| matches!(h.state, HostState::Failed | HostState::TimedOut)).count();
                            tr data-rollout=(r.id) {
                                td { a href={ "/rollouts/" (r.id) } { "#" (r.id) } }
                                td { (r.app.as_str()) }
                                td { (r.stage) }
                                td { (format!("{:?}", r.kind).to_lowercase()) }
                                td { code { (r.git_ref.as_ref().map(|g| short_ref(g.as_str())).unwrap_or("—")) } }
                                td { code { (r.release.as_str()) } }
                                td { (badge(r.state.as_str())) }
                                td { (ok) " / " (failed) " / " (r.hosts.len()) }
                                td { (r.started_by) }
                                td { (when(r.created_at)) }
                                td { @if let Some(f) = r.finished_at { (duration((f - r.created_at).num_milliseconds().max(0) as u64)) } }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(Some(u), "History", "History", true, body)
}

pub fn audit(u: &Session, config: &Config, q: &HistoryFilter, entries: &[AuditEntry]) -> Markup {
    let body = html! {
        h1 { "Audit" }
        p.muted { "Every change made through the API, the CLI or these pages, with who made it." }
        (filter_form(config, q, "/audit", false))
        @if entries.is_empty() { p.muted { "Nothing recorded yet." } } @else {
            div.scroll {
                table.audit {
                    thead { tr { th { "when" } th { "who" } th { "action" } th { "app" } th { "stage" } th { "rollout" } th { "detail" } } }
                    tbody {
                        @for e in entries {
                            tr {
                                td { (when_str(&e.at)) }
                                td { (e.actor) }
                                td { (e.action) }
                                td { (e.app.clone().unwrap_or_default()) }
                                td { (e.stage.clone().unwrap_or_default()) }
                                td { @if let Some(r) = e.rollout { a href={ "/rollouts/" (r) } { "#" (r) } } }
                                td { (e.detail) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(Some(u), "Audit", "Audit", true, body)
}

/// What the daemons refused, newest first, each with its reason and its body.
pub fn dead_letters(
    u: &Session,
    reason: Option<&str>,
    counts: &[(String, i64)],
    letters: &[DeadLetter],
    blocked: Option<&str>,
) -> Markup {
    let body = html! {
        h1 { "Dead letters" }
        @if let Some(why) = blocked {
            p.error role="alert" { "The conductor cannot take the dead letters now, so this list may miss some: " (why) }
        }
        p.muted {
            "Messages a convoy daemon refused — unsigned, forged, expired, misaddressed, malformed — "
            "taken from the dead-letter queue with the reason. " code { "convoy dead-letters" } " lists and clears them."
        }
        @if counts.is_empty() {
            p { "None kept." }
        } @else {
            p {
                "Kept: "
                @for (i, (r, n)) in counts.iter().enumerate() {
                    @if i > 0 { ", " }
                    a href={ "/dead-letters?" (serde_urlencoded::to_string([("reason", r)]).unwrap_or_default()) } aria-current=[(reason == Some(r.as_str())).then_some("true")] { (r) } " " (n)
                }
                @if reason.is_some() { " · " a href="/dead-letters" { "all" } }
            }
            div.scroll {
                table.audit {
                    thead { tr { th { "#" } th { "kept" } th { "reason" } th { "queue" } th { "routing key" } th { "detail" } } }
                    tbody {
                        @for l in letters {
                            tr {
                                td { (l.id) }
                                td { (when(l.kept_at)) }
                                td { (l.reason) }
                                td { (l.queue.clone().unwrap_or_default()) }
                                td { (l.routing_key) }
                                td {
                                    (l.detail)
                                    details.result {
                                        summary { "body (" (l.size) " bytes" @if l.size > crate::dead::PREVIEW { ", the first 2 KiB here; " code { "convoy dead-letters " (l.id) } " shows the rest" } ")" }
                                        pre { (l.preview) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(Some(u), "Dead letters", "Dead letters", false, body)
}
