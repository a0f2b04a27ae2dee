//! The operators' web pages, served by the conductor beside the API: dashboard, deploy
//! form, rollout pages, history and audit, behind a login.
//!
//! Pages are rendered on the server (maud, escaped by construction) and work without
//! JavaScript; `app.js` adds live updates — it listens to `/events` (SSE) and swaps the
//! page's `#live` region for a freshly rendered one. Every POST carries the session's CSRF
//! token; changes need the deployer role and are recorded with the user's name.

mod pages;
pub mod session;

use crate::api::{ApiError, ApiState};
use crate::config::Role;
use crate::engine::{DeployRequest, Request, StrategyOverrides, rollout_json, stage_hosts};
use crate::store::HistoryQuery;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use convoy_message::names::HostName;
use maud::Markup;
use serde::Deserialize;
use serde_json::Value;
use session::{LOGIN_COOKIE, SESSION_COOKIE, Session, Sessions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the pages share: the API's state (store reader, engine, fleet) and the sessions.
pub struct WebState {
    pub api: Arc<ApiState>,
    pub sessions: Sessions,
}

impl WebState {
    pub fn new(api: Arc<ApiState>) -> Self {
        let idle = Duration::from_secs(api.shared.config.web.session_idle_h * 3600);
        Self {
            api,
            sessions: Sessions::new(idle),
        }
    }

    fn cookie<'c>(&self, name: &'c str, value: String) -> Cookie<'c> {
        Cookie::build((name, value))
            .http_only(true)
            .same_site(SameSite::Lax)
            .secure(self.api.shared.config.web.secure_cookies)
            .path("/")
            .build()
    }
}

const CSS: &str = include_str!("../../web/app.css");
const JS: &str = include_str!("../../web/app.js");

/// The pages' routes.
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/deploy", get(deploy_form).post(deploy))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/{action}", post(act))
        .route("/apps/{app}/promote", post(promote))
        .route("/apps/{app}/stages/{stage}/rollback", post(rollback))
        .route("/hosts/{host}", get(host_page))
        .route("/hosts/{host}/inventory", post(ask_inventory))
        .route("/history", get(history))
        .route("/audit", get(audit))
        .route("/dead-letters", get(dead_letters))
        .route("/events", get(events))
        .route(
            "/static/app.css",
            get(|| asset("text/css; charset=utf-8", CSS)),
        )
        .route(
            "/static/app.js",
            get(|| asset("text/javascript; charset=utf-8", JS)),
        )
        .with_state(state)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// An HTML answer with the headers every page gets.
fn html(status: StatusCode, markup: Markup) -> Response {
    let mut resp = (status, axum::response::Html(markup.into_string())).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A refusal or failure, shown as a page that says what happened and what to do.
pub struct WebError {
    status: StatusCode,
    message: String,
    user: Option<Session>,
}

impl WebError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            user: None,
        }
    }

    fn for_user(mut self, s: &Session) -> Self {
        self.user = Some(s.clone());
        self
    }
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        Self::new(e.0, e.1)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        html(
            self.status,
            pages::error(self.user.as_ref(), self.status, &self.message),
        )
    }
}

/// The logged-in user of a request; pages without one send the browser to `/login`.
pub struct User(pub Session);

impl FromRequestParts<Arc<WebState>> for User {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<WebState>,
    ) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        if let Some(s) = jar
            .get(SESSION_COOKIE)
            .and_then(|c| state.sessions.get(c.value()))
        {
            return Ok(User(s));
        }
        if parts.method == axum::http::Method::GET {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let target = format!(
                "/login?{}",
                serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
            );
            Err(Redirect::to(&target).into_response())
        } else {
            Err(WebError::new(
                StatusCode::UNAUTHORIZED,
                "You are not logged in (or your session expired): log in and try again.",
            )
            .into_response())
        }
    }
}

impl User {
    /// The CSRF token of a form must be this session's.
    fn check_csrf(&self, presented: Option<&str>) -> Result<(), WebError> {
        if self.0.csrf_ok(presented) {
            Ok(())
        } else {
            Err(WebError::new(
                StatusCode::FORBIDDEN,
                "This form's CSRF token is missing or not this session's: reload the page and submit it again.",
            )
            .for_user(&self.0))
        }
    }

    /// Changes need the deployer role.
    fn deployer(&self) -> Result<(), WebError> {
        if self.0.role == Role::Deployer {
            Ok(())
        } else {
            Err(WebError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} is read-only: deploying, promoting and changing rollouts needs the deployer role.",
                    self.0.user
                ),
            )
            .for_user(&self.0))
        }
    }

    /// Both checks of a form that changes something.
    fn may_change(&self, csrf: Option<&str>) -> Result<(), WebError> {
        self.check_csrf(csrf)?;
        self.deployer()
    }

    async fn ask(&self, s: &WebState, request: Request) -> Result<Value, WebError> {
        s.api
            .ask(request, self.0.user.clone())
            .await
            .map_err(|e| WebError::from(e).for_user(&self.0))
    }
}

/// Password checks running at once (each takes argon2's 19 MiB).
static PASSWORD_CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Where to go after logging in: only a path on this site. Browsers drop tabs and line
/// breaks from a URL (`/\t/evil.example` becomes `//evil.example`, another site), and a
/// header cannot carry control characters: only printable ASCII is kept.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

#[derive(Deserialize, Default)]
struct LoginParams {
    next: Option<String>,
}

async fn login_form(
    State(s): State<Arc<WebState>>,
    jar: CookieJar,
    Query(q): Query<LoginParams>,
) -> Response {
    let token = session::random_token();
    let jar = jar.add(s.cookie(LOGIN_COOKIE, token.clone()));
    let next = safe_next(q.next.as_deref());
    (jar, html(StatusCode::OK, pages::login(&token, &next, None))).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    csrf: Option<String>,
    next: Option<String>,
}

async fn login(
    State(s): State<Arc<WebState>>,
    jar: CookieJar,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let cookie_token = jar.get(LOGIN_COOKIE).map(|c| c.value().to_owned());
    let csrf_ok = match (&cookie_token, &f.csrf) {
        (Some(c), Some(p)) => session::equal(c, p),
        _ => false,
    };
    // A fresh token for the form shown again.
    let token = session::random_token();
    let jar = jar.add(s.cookie(LOGIN_COOKIE, token.clone()));
    if !csrf_ok {
        let page = pages::login(
            &token,
            &next,
            Some("The login form's CSRF token is missing or stale: submit the form again."),
        );
        return (jar, html(StatusCode::FORBIDDEN, page)).into_response();
    }
    let users = s.api.shared.config.users.clone();
    let (name, password) = (f.user.clone(), f.password);
    // A password check costs argon2's memory (19 MiB) and a core for a moment: a flood of
    // logins waits its turn instead of taking the machine's memory.
    let Ok(_turn) = PASSWORD_CHECKS.acquire().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    let role =
        tokio::task::spawn_blocking(move || session::check_password(&users, &name, &password))
            .await
            .ok()
            .flatten();
    match role {
        Some(role) => {
            tracing::info!(user = %f.user, "web login");
            let id = s.sessions.open(&f.user, role);
            let jar = jar
                .remove(Cookie::build(LOGIN_COOKIE).path("/"))
                .add(s.cookie(SESSION_COOKIE, id));
            (jar, Redirect::to(&next)).into_response()
        }
        None => {
            tracing::warn!(user = %f.user, "web login refused: wrong user name or password");
            let page = pages::login(&token, &next, Some("Wrong user name or password."));
            (jar, html(StatusCode::UNAUTHORIZED, page)).into_response()
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(s): State<Arc<WebState>>,
    jar: CookieJar,
    user: User,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    user.check_csrf(f.csrf.as_deref())?;
    if let Some(c) = jar.get(SESSION_COOKIE) {
        s.sessions.close(c.value());
    }
    let jar = jar.remove(Cookie::build(SESSION_COOKIE).path("/"));
    Ok((jar, Redirect::to("/login")).into_response())
}

async fn dashboard(State(s): State<Arc<WebState>>, User(u): User) -> Result<Response, WebError> {
    let mut apps = crate::api::apps_view(&s.api).map_err(|e| WebError::from(e).for_user(&u))?;
    // A stage with nothing moving shows how its last rollout ended.
    for app in apps.as_array_mut().into_iter().flatten() {
        let name = app["name"].as_str().unwrap_or_default().to_owned();
        for stage in app["stages"].as_array_mut().into_iter().flatten() {
            if stage["rollouts"].as_array().is_some_and(|r| !r.is_empty()) {
                continue;
            }
            let query = HistoryQuery {
                app: Some(name.clone()),
                stage: stage["name"].as_str().map(str::to_owned),
                host: None,
                limit: 1,
            };
            let last = s
                .api
                .read(|st| st.history(&query))
                .map_err(|e| WebError::from(e).for_user(&u))?;
            stage["rollouts"] = Value::Array(last.iter().map(crate::engine::summary).collect());
        }
    }
    let hosts = s.api.shared.fleet.view(chrono::Utc::now());
    Ok(html(StatusCode::OK, pages::dashboard(&u, &apps, &hosts)))
}

/// One host: its heartbeat, and what its agent answered when asked for its inventory.
async fn host_page(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Path(host): Path<String>,
) -> Result<Response, WebError> {
    let unknown = || {
        WebError::new(
            StatusCode::NOT_FOUND,
            format!("No host named {host:?} has sent a heartbeat since the conductor started."),
        )
        .for_user(&u)
    };
    let name = HostName::new(&host).map_err(|_| unknown())?;
    let view = s
        .api
        .shared
        .fleet
        .view(chrono::Utc::now())
        .into_iter()
        .find(|h| h.host == name);
    let (inventory, _, refused) = s.api.shared.inventory_of(&name);
    if view.is_none() && inventory.is_none() {
        return Err(unknown());
    }
    Ok(html(
        StatusCode::OK,
        pages::host(
            &u,
            &name,
            view.as_ref(),
            inventory.as_ref(),
            refused.as_ref(),
        ),
    ))
}

/// Asks the host's agent for its inventory; any logged-in user may (it changes nothing).
async fn ask_inventory(
    State(s): State<Arc<WebState>>,
    user: User,
    Path(host): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    user.check_csrf(f.csrf.as_deref())?;
    let asked = user.ask(&s, Request::Inventory { host }).await?;
    let host = asked["host"].as_str().unwrap_or_default();
    Ok(Redirect::to(&format!("/hosts/{host}")).into_response())
}

/// What each in-flight command of `r` reported last, by command id.
fn current_steps(s: &WebState, r: &crate::rollout::Rollout) -> BTreeMap<String, Value> {
    r.hosts
        .iter()
        .filter_map(|h| h.command)
        .filter_map(|id| {
            s.api
                .shared
                .step_of(id)
                .map(|p| (id.to_string(), serde_json::json!(p)))
        })
        .collect()
}

/// The deploy form's fields (query string on GET, form body on POST).
#[derive(Deserialize, Default, Clone)]
pub struct DeployFields {
    #[serde(default)]
    pub app: Option<String>,
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub batches: Option<String>,
    #[serde(default)]
    pub max_failures: Option<String>,
    #[serde(default)]
    pub on_failure: Option<String>,
    #[serde(default)]
    pub pause_s: Option<String>,
    #[serde(default)]
    pub host_deadline_s: Option<String>,
    #[serde(default)]
    pub csrf: Option<String>,
    /// `preview`, `deploy`, or `refs` (the form again for another app or stage).
    #[serde(default)]
    pub action: Option<String>,
    /// The checkbox "then carry it through the later stages' gates".
    #[serde(default)]
    pub pipeline: Option<String>,
}

impl DeployFields {
    /// Whether the deploy goes on through the later stages: the checkbox once the form
    /// was submitted; before that, yes unless the stage is the app's last.
    pub fn pipeline(&self, last_stage: bool) -> bool {
        if self.csrf.is_some() {
            self.pipeline.is_some()
        } else {
            !last_stage
        }
    }
}

/// A ref the deploy form offers: present, with one commit, on every target host.
pub struct OfferedRef {
    pub name: String,
    pub sha: String,
}

/// The deploy form's choices for an app and stage.
pub struct DeployChoices {
    pub app: String,
    pub stage: String,
    pub hosts: Vec<String>,
    pub refs: Vec<OfferedRef>,
    /// Why fewer refs (or none) are offered.
    pub notes: Vec<String>,
    /// The stage is the app's last (nothing to carry the commit on to).
    pub last_stage: bool,
}

fn deploy_choices(s: &WebState, f: &DeployFields) -> Result<DeployChoices, WebError> {
    let config = &s.api.shared.config;
    let (app_name, app) = match f.app.as_deref() {
        Some(name) => config
            .apps
            .get_key_value(name)
            .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, format!("no app {name:?}")))?,
        None => config
            .apps
            .iter()
            .next()
            .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, "no app is configured"))?,
    };
    let stage = match f.stage.as_deref() {
        Some(name) => app.stage(name).map(|(_, st)| st).ok_or_else(|| {
            WebError::new(
                StatusCode::NOT_FOUND,
                format!("app {app_name} has no stage {name:?}"),
            )
        })?,
        None => app
            .stages
            .first()
            .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, "the app has no stage"))?,
    };
    let mut choices = DeployChoices {
        app: app_name.clone(),
        stage: stage.name.clone(),
        hosts: Vec::new(),
        refs: Vec::new(),
        notes: Vec::new(),
        last_stage: app.stages.last().is_some_and(|l| l.name == stage.name),
    };
    let (hosts, notes) = match stage_hosts(&s.api.shared.fleet, stage) {
        Ok(found) => found,
        Err(e) => {
            choices.notes.push(e.to_string());
            return Ok(choices);
        }
    };
    choices.notes = notes;
    choices.hosts = hosts.iter().map(|h| h.to_string()).collect();
    let repo = app.repo(app_name);
    let mut common: Option<BTreeMap<String, String>> = None;
    let mut disagree = 0usize;
    for host in &hosts {
        let refs: BTreeMap<String, String> = s
            .api
            .read(|st| st.refs_of(&repo, host.as_str()))?
            .into_iter()
            .collect();
        if refs.is_empty() {
            choices.notes.push(format!(
                "{host} has not reported its mirror of {repo} yet (its fetcher reports after each fetch): no ref can be offered until every target host has"
            ));
        }
        common = Some(match common {
            None => refs,
            Some(mut acc) => {
                acc.retain(|name, sha| match refs.get(name) {
                    Some(other) if other == sha => true,
                    Some(_) => {
                        disagree += 1;
                        false
                    }
                    None => false,
                });
                acc
            }
        });
    }
    if disagree > 0 {
        choices.notes.push(format!(
            "{disagree} ref(s) left out: the target hosts' mirrors disagree on their commit (a fetch is still under way?)"
        ));
    }
    let mut refs: Vec<OfferedRef> = common
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| name.starts_with("refs/tags/") || name.starts_with("refs/heads/"))
        .map(|(name, sha)| OfferedRef { name, sha })
        .collect();
    // Tags first, newest-looking names first; then branches.
    refs.sort_by(|a, b| {
        let tag = |r: &OfferedRef| r.name.starts_with("refs/tags/");
        tag(b).cmp(&tag(a)).then_with(|| b.name.cmp(&a.name))
    });
    choices.refs = refs;
    Ok(choices)
}

async fn deploy_form(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Query(f): Query<DeployFields>,
) -> Result<Response, WebError> {
    let choices = deploy_choices(&s, &f).map_err(|e| e.for_user(&u))?;
    Ok(html(
        StatusCode::OK,
        pages::deploy(&u, &s.api.shared.config, &choices, &f, None, None),
    ))
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn overrides(f: &DeployFields) -> Result<StrategyOverrides, String> {
    let mut o = StrategyOverrides::default();
    if let Some(b) = given(&f.batches) {
        o.batches = Some(
            b.parse()
                .map_err(|e| format!("batches: {e} (e.g. `1, 10%, 50%, 100%`)"))?,
        );
    }
    if let Some(m) = given(&f.max_failures) {
        o.max_failures = Some(
            m.parse()
                .map_err(|e| format!("max failures: {e} (a count like 0 or 2, or 10%)"))?,
        );
    }
    if let Some(p) = given(&f.pause_s) {
        o.pause_s = Some(
            p.parse()
                .map_err(|_| format!("pause between batches: {p:?} is not a number of seconds"))?,
        );
    }
    if let Some(d) = given(&f.host_deadline_s) {
        o.host_deadline_s = Some(
            d.parse()
                .map_err(|_| format!("host deadline: {d:?} is not a number of seconds"))?,
        );
    }
    if let Some(x) = given(&f.on_failure) {
        o.on_failure = Some(
            serde_json::from_value(Value::String(x.to_owned()))
                .map_err(|_| format!("on failure: {x:?} is not halt or rollback"))?,
        );
    }
    Ok(o)
}

async fn deploy(
    State(s): State<Arc<WebState>>,
    user: User,
    Form(f): Form<DeployFields>,
) -> Result<Response, WebError> {
    user.check_csrf(f.csrf.as_deref())?;
    let u = &user.0;
    let choices = deploy_choices(&s, &f).map_err(|e| e.for_user(u))?;
    let config = &s.api.shared.config;
    // Without scripts, "Show refs" posts the form (a GET would put the CSRF token in the
    // URL, where history and proxies keep it): the form again, for the app and stage chosen.
    if f.action.as_deref() == Some("refs") {
        return Ok(html(
            StatusCode::OK,
            pages::deploy(u, config, &choices, &f, None, None),
        ));
    }
    let preview = f.action.as_deref() == Some("preview");
    if !preview {
        user.deployer()?;
    }
    let refuse = |status: StatusCode, msg: String| {
        html(
            status,
            pages::deploy(u, config, &choices, &f, None, Some(&msg)),
        )
    };
    let Some(wanted) = f.git_ref.as_deref().filter(|r| !r.is_empty()) else {
        return Ok(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Choose a ref to deploy.".into(),
        ));
    };
    let Some(offered) = choices.refs.iter().find(|r| r.name == wanted) else {
        return Ok(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{wanted} is not present on every target host of {}: choose one of the refs offered.",
                choices.stage
            ),
        ));
    };
    let strategy = match overrides(&f) {
        Ok(o) => o,
        Err(msg) => return Ok(refuse(StatusCode::UNPROCESSABLE_ENTITY, msg)),
    };
    let request = DeployRequest {
        app: choices.app.clone(),
        stage: choices.stage.clone(),
        git_ref: offered.name.clone(),
        commit: Some(offered.sha.clone()),
        strategy,
        plan: preview,
        pipeline: f.pipeline(choices.last_stage),
    };
    match s.api.ask(Request::Deploy(request), u.user.clone()).await {
        Ok(plan) if preview => Ok(html(
            StatusCode::OK,
            pages::deploy(u, config, &choices, &f, Some(&plan), None),
        )),
        Ok(created) => match created["id"].as_i64() {
            Some(id) => Ok(Redirect::to(&format!("/rollouts/{id}")).into_response()),
            None => Ok(Redirect::to("/").into_response()),
        },
        Err(e) => Ok(refuse(e.0, e.1)),
    }
}

async fn rollout(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Path(id): Path<i64>,
) -> Result<Response, WebError> {
    let r = s
        .api
        .read(|st| st.rollout(id))
        .map_err(|e| WebError::from(e).for_user(&u))?
        .ok_or_else(|| {
            WebError::new(StatusCode::NOT_FOUND, format!("There is no rollout {id}.")).for_user(&u)
        })?;
    let results = s
        .api
        .read(|st| st.results(id))
        .map_err(|e| WebError::from(e).for_user(&u))?;
    let steps = current_steps(&s, &r);
    let json = rollout_json(&r);
    Ok(html(
        StatusCode::OK,
        pages::rollout(&u, &r, &json, &results, &steps),
    ))
}

async fn act(
    State(s): State<Arc<WebState>>,
    user: User,
    Path((id, action)): Path<(i64, String)>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    user.may_change(f.csrf.as_deref())?;
    let request = Request::rollout_action(id, &action)
        .map_err(|e| WebError::new(StatusCode::NOT_FOUND, e).for_user(&user.0))?;
    user.ask(&s, request).await?;
    Ok(Redirect::to(&format!("/rollouts/{id}")).into_response())
}

#[derive(Deserialize)]
struct PromoteForm {
    csrf: Option<String>,
    stage: Option<String>,
}

async fn promote(
    State(s): State<Arc<WebState>>,
    user: User,
    Path(app): Path<String>,
    Form(f): Form<PromoteForm>,
) -> Result<Response, WebError> {
    user.may_change(f.csrf.as_deref())?;
    user.ask(
        &s,
        Request::Promote {
            app,
            stage: f.stage.filter(|st| !st.is_empty()),
        },
    )
    .await?;
    Ok(Redirect::to("/").into_response())
}

async fn rollback(
    State(s): State<Arc<WebState>>,
    user: User,
    Path((app, stage)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Result<Response, WebError> {
    user.may_change(f.csrf.as_deref())?;
    let v = user.ask(&s, Request::Rollback { app, stage }).await?;
    match v["id"].as_i64() {
        Some(id) => Ok(Redirect::to(&format!("/rollouts/{id}")).into_response()),
        None => Ok(Redirect::to("/").into_response()),
    }
}

/// History filters.
#[derive(Deserialize, Default)]
pub struct HistoryFilter {
    pub app: Option<String>,
    pub stage: Option<String>,
    pub host: Option<String>,
}

fn nonblank(v: &Option<String>) -> Option<String> {
    given(v).map(str::to_owned)
}

async fn history(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Query(q): Query<HistoryFilter>,
) -> Result<Response, WebError> {
    let query = HistoryQuery {
        app: nonblank(&q.app),
        stage: nonblank(&q.stage),
        host: nonblank(&q.host),
        limit: 200,
    };
    let rollouts = s
        .api
        .read(|st| st.history(&query))
        .map_err(|e| WebError::from(e).for_user(&u))?;
    Ok(html(
        StatusCode::OK,
        pages::history(&u, &s.api.shared.config, &q, &rollouts),
    ))
}

async fn audit(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Query(q): Query<HistoryFilter>,
) -> Result<Response, WebError> {
    let entries = s
        .api
        .read(|st| st.audit(1000))
        .map_err(|e| WebError::from(e).for_user(&u))?;
    let (app, stage) = (nonblank(&q.app), nonblank(&q.stage));
    let entries: Vec<_> = entries
        .into_iter()
        .filter(|e| app.is_none() || e.app == app)
        .filter(|e| stage.is_none() || e.stage == stage)
        .take(300)
        .collect();
    Ok(html(
        StatusCode::OK,
        pages::audit(&u, &s.api.shared.config, &q, &entries),
    ))
}

#[derive(Deserialize)]
struct DeadLetterFilter {
    reason: Option<String>,
}

async fn dead_letters(
    State(s): State<Arc<WebState>>,
    User(u): User,
    Query(q): Query<DeadLetterFilter>,
) -> Result<Response, WebError> {
    let reason = nonblank(&q.reason);
    let (letters, counts) = s
        .api
        .read(|st| st.dead_letters(reason.as_deref(), 200))
        .map_err(|e| WebError::from(e).for_user(&u))?;
    Ok(html(
        StatusCode::OK,
        pages::dead_letters(
            &u,
            reason.as_deref(),
            &counts,
            &letters,
            s.api.shared.dead_letters_blocked().as_deref(),
        ),
    ))
}

/// The live stream for the pages (the same events as `/api/events`, with the session).
async fn events(State(s): State<Arc<WebState>>, User(_): User) -> Response {
    crate::api::live_events(&s.api.shared)
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn after_login_only_a_path_of_this_site() {
        for ok in ["/", "/rollouts/3", "/hosts?stale=1"] {
            assert_eq!(safe_next(Some(ok)), ok);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r\nSet-Cookie: x=1",
            "/ /evil.example",
            "/é",
            "",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
