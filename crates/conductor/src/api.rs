//! The HTTP JSON API (`/api/…`, bearer tokens), the live event stream (`/api/events`, SSE),
//! `/health` and `/metrics`. Every route is documented in `docs/api.md`.

use crate::config::Role;
use crate::engine::{DeployRequest, Input, Request, RequestError, Shared, rollout_json};
use crate::store::{HistoryQuery, Store};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use convoy_message::names::HostName;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::BroadcastStream;

pub struct ApiState {
    pub shared: Arc<Shared>,
    pub engine: mpsc::Sender<Input>,
    /// A read-only connection: reads never wait for the engine.
    pub reader: Mutex<Store>,
    tokens: Vec<([u8; 32], String, Role)>,
}

impl ApiState {
    pub fn new(shared: Arc<Shared>, engine: mpsc::Sender<Input>, reader: Store) -> Self {
        let tokens = shared
            .config
            .tokens
            .iter()
            .filter_map(|t| {
                let hash: [u8; 32] = match (&t.sha256, &t.token) {
                    (Some(h), _) => hex::decode(h).ok()?.try_into().ok()?,
                    (None, Some(tok)) => Sha256::digest(tok.as_bytes()).into(),
                    (None, None) => return None,
                };
                Some((hash, t.name.clone(), t.role))
            })
            .collect();
        Self {
            shared,
            engine,
            reader: Mutex::new(reader),
            tokens,
        }
    }

    /// Who presents this bearer token. Every configured token is compared, in constant time.
    pub fn caller(&self, headers: &HeaderMap) -> Result<(String, Role), ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer <token>` (the CLI reads CONVOY_TOKEN)".into(),
                )
            })?;
        let hash: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let mut found = None;
        for (h, name, role) in &self.tokens {
            if bool::from(h.ct_eq(&hash)) {
                found = Some((name.clone(), *role));
            }
        }
        found.ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "unknown API token".into()))
    }

    fn deployer(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        match self.caller(headers)? {
            (name, Role::Deployer) => Ok(name),
            (name, _) => Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "{name} is read-only: deploying and changing rollouts needs the deployer role"
                ),
            )),
        }
    }

    /// Runs a read on the API's own connection (reads never wait for the engine).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError>,
    ) -> Result<T, ApiError> {
        let store = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&store).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }

    /// Hands a request to the engine and waits for its answer.
    pub async fn ask(&self, request: Request, user: String) -> Result<Value, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.engine
            .send(Input::Request {
                request,
                user,
                reply,
            })
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the conductor is shutting down".into(),
                )
            })?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the conductor is shutting down".into(),
            )),
        }
    }
}

/// An error answer: a status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match &e {
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
            RequestError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RequestError::Conflict(_) => StatusCode::CONFLICT,
            RequestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

type PathResult<T> = Result<Path<T>, axum::extract::rejection::PathRejection>;
type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;
type JsonResult<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// A request's path, query or body that did not parse: a 400 saying what, as JSON like
/// every other error. Handlers take them as `Result`s and check the caller first, so a
/// caller without a token learns 401, not how the request was wrong.
fn malformed<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ApiError {
    move |e| ApiError(StatusCode::BAD_REQUEST, format!("{what}: {e}"))
}

/// Any other `/api/…` path: a 404 in JSON naming the reference.
async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no API route {} (see docs/api.md)", uri.path()),
    )
}

/// The API routes (the web pages are added beside them).
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/apps", get(apps))
        .route("/api/hosts", get(hosts))
        .route(
            "/api/hosts/{host}/inventory",
            get(inventory).post(ask_inventory),
        )
        .route("/api/rollouts", get(history).post(deploy))
        .route("/api/rollouts/{id}", get(rollout))
        .route("/api/rollouts/{id}/{action}", post(act))
        .route("/api/apps/{app}/stages/{stage}/rollback", post(rollback))
        .route("/api/apps/{app}/promote", post(promote))
        .route("/api/pipelines", get(pipelines))
        .route("/api/audit", get(audit))
        .route("/api/dead-letters", get(dead_letters))
        .route("/api/dead-letters/clear", post(clear_dead_letters))
        .route("/api/dead-letters/{id}", get(dead_letter))
        .route("/api/events", get(events))
        .route("/api/{*rest}", axum::routing::any(no_such_route))
        .with_state(state)
}

async fn health(State(s): State<Arc<ApiState>>) -> Response {
    let store_ok = s.read(|st| st.audit(1)).is_ok();
    let status = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "status": if store_ok { "ok" } else { "store unavailable" } })),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let m = &s.shared.metrics;
    let [alive, stale, gone] = s.shared.fleet.counts(chrono::Utc::now());
    let active = s
        .shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    let body = format!(
        "# HELP convoy_rollouts_active Rollouts not yet ended.\n# TYPE convoy_rollouts_active gauge\nconvoy_rollouts_active {active}\n\
# HELP convoy_rollouts_started_total Rollouts created.\n# TYPE convoy_rollouts_started_total counter\nconvoy_rollouts_started_total {}\n\
# HELP convoy_commands_sent_total Commands confirmed by the broker.\n# TYPE convoy_commands_sent_total counter\nconvoy_commands_sent_total {}\n\
# HELP convoy_dead_letters_total Refused messages taken from the dead-letter queue into the store.\n# TYPE convoy_dead_letters_total counter\nconvoy_dead_letters_total {}\n\
# HELP convoy_results_total Agent results received.\n# TYPE convoy_results_total counter\nconvoy_results_total {}\n\
# HELP convoy_results_duplicate_total Agent results received again and ignored.\n# TYPE convoy_results_duplicate_total counter\nconvoy_results_duplicate_total {}\n\
# HELP convoy_heartbeats_total Heartbeats received.\n# TYPE convoy_heartbeats_total counter\nconvoy_heartbeats_total {}\n\
# HELP convoy_store_errors_total Failed writes to the store.\n# TYPE convoy_store_errors_total counter\nconvoy_store_errors_total {}\n\
# HELP convoy_hosts Hosts by liveness.\n# TYPE convoy_hosts gauge\nconvoy_hosts{{liveness=\"alive\"}} {alive}\nconvoy_hosts{{liveness=\"stale\"}} {stale}\nconvoy_hosts{{liveness=\"gone\"}} {gone}\n",
        m.rollouts_started.load(Ordering::Relaxed),
        m.commands_sent.load(Ordering::Relaxed),
        m.dead_letters.load(Ordering::Relaxed),
        m.results.load(Ordering::Relaxed),
        m.duplicate_results.load(Ordering::Relaxed),
        m.heartbeats.load(Ordering::Relaxed),
        m.store_errors.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Each app's stages: current release, the rollout on it, its gate, waiting pipelines.
pub fn apps_view(s: &ApiState) -> Result<Value, ApiError> {
    let active: Vec<Value> = s
        .shared
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    let mut out = Vec::new();
    for (name, app) in &s.shared.config.apps {
        let pipelines = s.read(|st| st.pipelines(Some(name), 5))?;
        let mut stages = Vec::new();
        for stage in &app.stages {
            let releases = s.read(|st| st.stage_releases(name, &stage.name))?;
            let rollouts: Vec<&Value> = active
                .iter()
                .filter(|r| r["app"] == json!(name) && r["stage"] == json!(stage.name))
                .collect();
            stages.push(json!({
                "name": stage.name,
                "hosts": stage.hosts,
                "labels": stage.labels,
                "gate": stage.gate.kind(),
                "strategy": stage.strategy,
                "release": releases.first().map(|(r, _)| r),
                "commit": releases.first().and_then(|(_, c)| c.clone()),
                "previous_release": releases.get(1).map(|(r, _)| r),
                "rollouts": rollouts,
            }));
        }
        out.push(json!({
            "name": name,
            "repo": app.repo(name),
            "concurrency": app.concurrency,
            "auto_deploy": app.pipeline.auto_deploy,
            "stages": stages,
            "pipelines": pipelines,
        }));
    }
    Ok(json!(out))
}

async fn apps(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> ApiResult {
    s.caller(&headers)?;
    Ok(Json(apps_view(&s)?))
}

async fn hosts(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> ApiResult {
    s.caller(&headers)?;
    Ok(Json(json!(s.shared.fleet.view(chrono::Utc::now()))))
}

/// The host's last inventory report.
async fn inventory(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<String>,
) -> ApiResult {
    s.caller(&headers)?;
    let Path(host) = path.map_err(malformed("the host in the path"))?;
    let Ok(name) = HostName::new(&host) else {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{host:?} is not a host name (letters, digits, '.', '-', '_')"),
        ));
    };
    let (answer, pending, refused) = s.shared.inventory_of(&name);
    // The last question was refused outright: that is its answer.
    if let Some(refused) = refused {
        return Ok(Json(refused));
    }
    let why = match pending {
        Some((command, expires_at)) => format!(
            "{host} has not answered yet (command {command}, valid until {expires_at}): is its \
             agent running and connected (`convoy hosts`)?"
        ),
        _ => format!(
            "no inventory from {host} since the conductor started: ask with \
             POST /api/hosts/{host}/inventory (`convoy inventory {host}`)"
        ),
    };
    answer.map(Json).ok_or(ApiError(StatusCode::NOT_FOUND, why))
}

/// Sends the host an inventory command. It changes nothing on the host, so any API user
/// may ask; the audit log says who did.
async fn ask_inventory(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<String>,
) -> Result<Response, ApiError> {
    let (user, _) = s.caller(&headers)?;
    let Path(host) = path.map_err(malformed("the host in the path"))?;
    let v = s.ask(Request::Inventory { host }, user).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

#[derive(Deserialize)]
struct HistoryParams {
    app: Option<String>,
    stage: Option<String>,
    host: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: QueryResult<HistoryParams>,
) -> ApiResult {
    s.caller(&headers)?;
    let Query(q) = query.map_err(malformed("the query (app, stage, host, limit)"))?;
    let query = HistoryQuery {
        app: q.app,
        stage: q.stage,
        host: q.host,
        limit: q.limit.unwrap_or(50),
    };
    let rollouts = s.read(|st| st.history(&query))?;
    Ok(Json(json!(
        rollouts
            .iter()
            .map(crate::engine::summary)
            .collect::<Vec<_>>()
    )))
}

async fn rollout(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<i64>,
) -> ApiResult {
    s.caller(&headers)?;
    let Path(id) = path.map_err(malformed("the rollout id in the path"))?;
    let r = s
        .read(|st| st.rollout(id))?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("there is no rollout {id}")))?;
    let results = s.read(|st| st.results(id))?;
    let mut v = rollout_json(&r);
    v["results"] = json!(results);
    Ok(Json(v))
}

async fn deploy(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: JsonResult<DeployRequest>,
) -> Result<Response, ApiError> {
    let plan_only_caller = s.caller(&headers)?;
    let Json(req) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("a deploy request: {}", e.body_text()),
        )
    })?;
    let user = if req.plan {
        plan_only_caller.0
    } else {
        s.deployer(&headers)?
    };
    let plan = req.plan;
    let v = s.ask(Request::Deploy(req), user).await?;
    let status = if plan {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(v)).into_response())
}

async fn act(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<(i64, String)>,
) -> ApiResult {
    let user = s.deployer(&headers)?;
    let Path((id, action)) = path.map_err(malformed("the rollout id in the path"))?;
    let request =
        Request::rollout_action(id, &action).map_err(|e| ApiError(StatusCode::NOT_FOUND, e))?;
    Ok(Json(s.ask(request, user).await?))
}

async fn rollback(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<(String, String)>,
) -> Result<Response, ApiError> {
    let user = s.deployer(&headers)?;
    let Path((app, stage)) = path.map_err(malformed("the app and stage in the path"))?;
    let v = s.ask(Request::Rollback { app, stage }, user).await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    stage: Option<String>,
}

async fn promote(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<String>,
    body: JsonResult<PromoteBody>,
) -> ApiResult {
    let user = s.deployer(&headers)?;
    let Path(app) = path.map_err(malformed("the app in the path"))?;
    // No body at all is fine (the first stage waiting is promoted).
    let stage = match body {
        Ok(Json(b)) => b.stage,
        Err(axum::extract::rejection::JsonRejection::MissingJsonContentType(_)) => None,
        Err(e) => {
            return Err(malformed("a promote request ({\"stage\": NAME} or none)")(
                e,
            ));
        }
    };
    Ok(Json(s.ask(Request::Promote { app, stage }, user).await?))
}

#[derive(Deserialize)]
struct PipelineParams {
    app: Option<String>,
    limit: Option<usize>,
}

async fn pipelines(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: QueryResult<PipelineParams>,
) -> ApiResult {
    s.caller(&headers)?;
    let Query(q) = query.map_err(malformed("the query (app, limit)"))?;
    let list = s.read(|st| st.pipelines(q.app.as_deref(), q.limit.unwrap_or(20)))?;
    Ok(Json(json!(list)))
}

async fn audit(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> ApiResult {
    s.caller(&headers)?;
    Ok(Json(json!(s.read(|st| st.audit(200))?)))
}

#[derive(Deserialize)]
struct DeadLetterParams {
    reason: Option<String>,
    limit: Option<usize>,
}

/// The dead letters kept, newest first, with a preview of their bodies; and the count of
/// each reason.
async fn dead_letters(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    query: QueryResult<DeadLetterParams>,
) -> ApiResult {
    s.caller(&headers)?;
    let Query(q) = query.map_err(malformed("the query (reason, limit)"))?;
    let reason = q.reason.filter(|r| !r.trim().is_empty());
    let (letters, counts) =
        s.read(|st| st.dead_letters(reason.as_deref(), q.limit.unwrap_or(50)))?;
    let counts: Vec<Value> = counts
        .into_iter()
        .map(|(reason, count)| json!({ "reason": reason, "count": count }))
        .collect();
    let blocked = s.shared.dead_letters_blocked();
    Ok(Json(
        json!({ "counts": counts, "letters": letters, "blocked": blocked }),
    ))
}

async fn dead_letter(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    path: PathResult<i64>,
) -> ApiResult {
    s.caller(&headers)?;
    let Path(id) = path.map_err(malformed("the dead letter id in the path"))?;
    let letter = s.read(|st| st.dead_letter(id))?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("there is no dead letter {id} (cleared, or beyond the newest kept)"),
        )
    })?;
    Ok(Json(json!(letter)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    through: Option<i64>,
    #[serde(default)]
    all: bool,
}

async fn clear_dead_letters(
    State(s): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: JsonResult<ClearBody>,
) -> ApiResult {
    let user = s.deployer(&headers)?;
    let Json(b) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("clearing dead letters: {}", e.body_text()),
        )
    })?;
    let through = match (b.through, b.all) {
        (Some(id), false) => Some(id),
        (None, true) => None,
        _ => {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                "say which dead letters to clear: {\"through\": ID} (that one and every older \
                 one) or {\"all\": true}"
                    .into(),
            ));
        }
    };
    Ok(Json(
        s.ask(Request::ClearDeadLetters { through }, user).await?,
    ))
}

async fn events(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.caller(&headers)?;
    Ok(live_events(&s.shared))
}

/// The live stream (SSE) of rollout, pipeline and host events, for the API and the pages.
pub fn live_events(shared: &Shared) -> Response {
    let stream = BroadcastStream::new(shared.events.subscribe()).map(|item| {
        let event = match item {
            Ok(e) => SseEvent::default()
                .event(e.kind)
                .data(serde_json::to_string(&e.data).unwrap_or_default()),
            // A slow reader missed events: tell it to fetch the state again.
            Err(_) => SseEvent::default().event("lagged").data("{}"),
        };
        Ok::<_, Infallible>(event)
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
