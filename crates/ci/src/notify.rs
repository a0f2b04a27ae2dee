//! Plugin-free build status: a job reports itself, from a shell step with
//! `convoy-ci notify started|succeeded|failed`, or with a `curl` to the bridge's
//! `POST /notify` when the job has no broker credentials.

use crate::config::Config;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use convoy_bus::{Outgoing, Publisher, Retry};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, BuildEvent, BuildStatus, Message};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// A status report, as a job gives it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Report {
    pub status: String,
    pub job: Option<String>,
    pub build_number: Option<u64>,
    pub url: Option<String>,
    pub commit: Option<String>,
    pub repo: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
}

/// Turns a report into a build event, naming what is missing or wrong.
pub fn event(config: &Config, report: &Report, from: &str) -> Result<Message, String> {
    let status = match report.status.as_str() {
        "queued" => BuildStatus::Queued,
        "started" => BuildStatus::Started,
        "succeeded" | "success" => BuildStatus::Succeeded,
        "failed" | "failure" => BuildStatus::Failed,
        "aborted" => BuildStatus::Aborted,
        other => {
            return Err(format!(
                "status {other:?}: use started, succeeded, failed or aborted"
            ));
        }
    };
    let job = report
        .job
        .clone()
        .filter(|j| !j.is_empty())
        .ok_or("no job: set JOB_NAME or --job")?;
    let repo = report
        .repo
        .clone()
        .or_else(|| config.jobs.iter().find(|r| r.job == job).map(|r| r.repo.clone()))
        .ok_or_else(|| format!("cannot tell which repo job {job:?} builds: pass --repo (or add it to jobs in ci.toml)"))?;
    let repo = Name::new(repo).map_err(|e| e.to_string())?;
    let commit = report
        .commit
        .clone()
        .ok_or("no commit: set GIT_COMMIT or --commit")?;
    let commit = Sha::new(commit).map_err(|e| e.to_string())?;
    let git_ref = match &report.git_ref {
        // Jenkins' GIT_BRANCH looks like `origin/main`.
        Some(r) if !r.is_empty() => {
            let short = r.strip_prefix("origin/").unwrap_or(r);
            Some(RefName::expand(short, false).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    // A report repeated (a retried curl) is the same event.
    let id = match report.build_number {
        Some(n) => Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("{job}#{n}:{}", status.as_str()).as_bytes(),
        ),
        None => Uuid::now_v7(),
    };
    Ok(Message::with_id(
        id,
        from,
        Body::Build(BuildEvent {
            repo,
            git_ref,
            commit,
            status,
            job,
            build_number: report.build_number,
            url: report.url.clone(),
            detail: None,
        }),
    ))
}

pub struct Endpoint {
    pub config: Config,
    pub token: String,
    pub publisher: Arc<Publisher>,
    pub from: String,
}

pub fn router(endpoint: Arc<Endpoint>) -> Router {
    Router::new()
        .route("/notify", post(notify))
        .route("/health", get(|| async { "ok\n" }))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(endpoint)
}

fn reply(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (status, text).into_response()
}

async fn notify(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(ep.token.as_bytes())) {
        return reply(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let report: Report = if json {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")),
        }
    } else {
        match serde_urlencoded::from_bytes(&body) {
            Ok(r) => r,
            Err(e) => return reply(StatusCode::BAD_REQUEST, format!("malformed form: {e}")),
        }
    };
    let message = match event(&ep.config, &report, &ep.from) {
        Ok(m) => m,
        Err(why) => return reply(StatusCode::BAD_REQUEST, why),
    };
    let out = match Outgoing::message(&message) {
        Ok(o) => o,
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ep
        .publisher
        .publish(&out, Retry::within(Duration::from_secs(10)))
        .await
    {
        Ok(()) => reply(
            StatusCode::ACCEPTED,
            format!("published as event {}", message.id),
        ),
        Err(e) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not published, retry: {e}"),
        ),
    }
}
