//! `convoy-hook serve`: push webhooks from GitHub, GitLab and Gitea.
//!
//! Every request is authenticated in constant time (HMAC-SHA256 of the body for GitHub's
//! `X-Hub-Signature-256` and Gitea's `X-Gitea-Signature`, the shared token for GitLab's
//! `X-Gitlab-Token`), de-duplicated by delivery id, written to the spool, and answered
//! `202 Accepted` before anything is published: a slow broker never makes a forge time out.
//! The event id is derived from the push itself (repository, ref, before, after), so a
//! delivery accepted twice, or a captured body replayed under a new delivery id, reaches
//! consumers as one event.

use crate::spool::Spool;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use convoy_message::names::{Name, RefName, Sha};
use convoy_message::{Body, CommitSummary, Message, PushChange, PushEvent, RefKind};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use uuid::Uuid;

/// What the receiver needs.
pub struct Receiver {
    pub github_secret: Option<String>,
    pub gitlab_token: Option<String>,
    pub gitea_secret: Option<String>,
    /// Webhook repository name → convoy repo name, for names convoy would refuse.
    pub repo_names: BTreeMap<String, String>,
    pub max_commits: usize,
    pub spool: Spool,
    pub deliveries: Deliveries,
    /// Woken after each spooled event, so the drainer publishes it at once.
    pub spooled: Arc<Notify>,
    pub from: String,
}

/// Delivery ids already accepted, remembered on disk (`<spool>/deliveries`).
pub struct Deliveries {
    path: PathBuf,
    seen: Mutex<HashSet<String>>,
}

impl Deliveries {
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<&str> = text.lines().collect();
        // Keep the newest 100,000: forges retry for hours, not for months.
        if lines.len() > 100_000 {
            lines.drain(..lines.len() - 100_000);
            convoy_release::write_atomic(&path, (lines.join("\n") + "\n").as_bytes())
                .map_err(std::io::Error::other)?;
        }
        let seen = lines.iter().map(|l| l.to_string()).collect();
        Ok(Self {
            path,
            seen: Mutex::new(seen),
        })
    }

    fn contains(&self, id: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn record(&self, id: &str) -> std::io::Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_data()?;
        seen.insert(id.to_owned());
        Ok(())
    }
}

pub fn router(receiver: Arc<Receiver>, body_limit: usize) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/health", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(receiver)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forge {
    GitHub,
    GitLab,
    Gitea,
}

fn reply(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (status, text).into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn hmac_matches(secret: &str, body: &[u8], hex_sig: &str) -> bool {
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).is_ok()
}

async fn webhook(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    // Gitea also sends X-GitHub-Event for compatibility: look for it first.
    let forge = if headers.contains_key("x-gitea-event") {
        Forge::Gitea
    } else if headers.contains_key("x-github-event") {
        Forge::GitHub
    } else if headers.contains_key("x-gitlab-event") {
        Forge::GitLab
    } else {
        return reply(
            StatusCode::BAD_REQUEST,
            "not a GitHub, GitLab or Gitea webhook (no X-GitHub-Event, X-Gitlab-Event or X-Gitea-Event header)",
        );
    };
    let authentic = match forge {
        Forge::GitHub => match &rx.github_secret {
            None => {
                return reply(
                    StatusCode::FORBIDDEN,
                    "GitHub webhooks are not enabled here (set serve.github_secret)",
                );
            }
            Some(secret) => header(&headers, "x-hub-signature-256")
                .and_then(|s| s.strip_prefix("sha256="))
                .is_some_and(|sig| hmac_matches(secret, &body, sig)),
        },
        Forge::Gitea => match &rx.gitea_secret {
            None => {
                return reply(
                    StatusCode::FORBIDDEN,
                    "Gitea webhooks are not enabled here (set serve.gitea_secret)",
                );
            }
            Some(secret) => header(&headers, "x-gitea-signature")
                .is_some_and(|sig| hmac_matches(secret, &body, sig)),
        },
        Forge::GitLab => match &rx.gitlab_token {
            None => {
                return reply(
                    StatusCode::FORBIDDEN,
                    "GitLab webhooks are not enabled here (set serve.gitlab_token)",
                );
            }
            Some(token) => header(&headers, "x-gitlab-token")
                .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes()))),
        },
    };
    if !authentic {
        tracing::warn!(?forge, "webhook with a bad or missing signature refused");
        return reply(
            StatusCode::UNAUTHORIZED,
            "signature or token does not match",
        );
    }
    let event = match forge {
        Forge::GitHub => header(&headers, "x-github-event"),
        Forge::Gitea => header(&headers, "x-gitea-event"),
        Forge::GitLab => header(&headers, "x-gitlab-event"),
    }
    .unwrap_or("");
    match (forge, event) {
        (_, "ping") | (Forge::GitLab, "System Hook") => return reply(StatusCode::OK, "pong"),
        (Forge::GitHub | Forge::Gitea, "push") | (Forge::GitLab, "Push Hook" | "Tag Push Hook") => {
        }
        (_, other) => {
            return reply(
                StatusCode::ACCEPTED,
                format!("ignored: {other:?} is not a push event"),
            );
        }
    }
    let delivery = match forge {
        Forge::GitHub => header(&headers, "x-github-delivery"),
        Forge::Gitea => header(&headers, "x-gitea-delivery"),
        Forge::GitLab => {
            header(&headers, "x-gitlab-event-uuid").or(header(&headers, "idempotency-key"))
        }
    };
    let Some(delivery) = delivery.filter(|d| !d.is_empty() && d.len() <= 200) else {
        return reply(
            StatusCode::BAD_REQUEST,
            "no delivery id header (X-GitHub-Delivery, X-Gitea-Delivery or X-Gitlab-Event-UUID)",
        );
    };
    let delivery_key = format!("{forge:?}:{delivery}");
    if rx.deliveries.contains(&delivery_key) {
        return reply(
            StatusCode::OK,
            format!("delivery {delivery} was already accepted"),
        );
    }
    let push = match parse_push(&body, &rx.repo_names, rx.max_commits) {
        Ok(p) => p,
        Err(why) => return reply(StatusCode::BAD_REQUEST, why),
    };
    // The id names the push itself (repository, ref, before, after): a redelivery, or a
    // captured body replayed under a fresh delivery id, is the same event to consumers.
    let identity = format!(
        "{forge:?}:{}:{}:{}:{}",
        push.repo, push.git_ref, push.old, push.new
    );
    let id = Uuid::new_v5(&Uuid::NAMESPACE_URL, identity.as_bytes());
    let message = Message::with_id(id, rx.from.clone(), Body::Push(push));
    let bytes = match message.encode() {
        Ok(b) => b,
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = rx.spool.put(&bytes, id) {
        tracing::error!(error = %e, "cannot spool a webhook event");
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot store the event; retry later",
        );
    }
    if let Err(e) = rx.deliveries.record(&delivery_key) {
        tracing::warn!(error = %e, "cannot record the delivery id; a redelivery keeps its event id");
    }
    rx.spooled.notify_one();
    tracing::info!(?forge, %delivery, %id, "push webhook accepted");
    reply(StatusCode::ACCEPTED, format!("accepted as event {id}"))
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    forced: bool,
    repository: Option<Repo>,
    project: Option<Repo>,
    #[serde(default)]
    commits: Vec<PayloadCommit>,
    pusher: Option<Pusher>,
    user_username: Option<String>,
}

#[derive(Deserialize)]
struct Repo {
    name: String,
}

#[derive(Deserialize)]
struct PayloadCommit {
    id: String,
    #[serde(default)]
    message: String,
    author: Option<Author>,
}

#[derive(Deserialize)]
struct Author {
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Pusher {
    name: Option<String>,
    login: Option<String>,
    username: Option<String>,
}

fn parse_push(
    body: &[u8],
    names: &BTreeMap<String, String>,
    max_commits: usize,
) -> Result<PushEvent, String> {
    let p: Payload =
        serde_json::from_slice(body).map_err(|e| format!("malformed push payload: {e}"))?;
    let raw_name = p
        .repository
        .or(p.project)
        .map(|r| r.name)
        .ok_or("push payload names no repository (repository.name or project.name)")?;
    let mapped = names
        .get(&raw_name)
        .cloned()
        .unwrap_or_else(|| raw_name.clone());
    let repo = Name::new(mapped).map_err(|e| {
        format!("{e}; map repository {raw_name:?} to a convoy name in serve.repo_names")
    })?;
    let git_ref = RefName::new(p.git_ref).map_err(|e| e.to_string())?;
    let old = Sha::new(p.before).map_err(|e| e.to_string())?;
    let new = Sha::new(p.after).map_err(|e| e.to_string())?;
    let change = if old.is_zero() {
        PushChange::Created
    } else if new.is_zero() {
        PushChange::Deleted
    } else if p.forced {
        PushChange::Forced
    } else {
        PushChange::Updated
    };
    let total = p.commits.len();
    let commits: Vec<CommitSummary> = p
        .commits
        .into_iter()
        .rev()
        .take(max_commits)
        .filter_map(|c| {
            Some(CommitSummary {
                sha: Sha::new(c.id).ok()?,
                author: c
                    .author
                    .map(|a| a.name)
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect(),
                summary: c
                    .message
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(500)
                    .collect(),
            })
        })
        .collect();
    let pusher = p
        .pusher
        .and_then(|u| u.login.or(u.username).or(u.name))
        .or(p.user_username);
    Ok(PushEvent {
        repo,
        ref_kind: RefKind::of(&git_ref),
        git_ref,
        old,
        new,
        change,
        truncated: total > commits.len(),
        commits,
        pusher,
    })
}
