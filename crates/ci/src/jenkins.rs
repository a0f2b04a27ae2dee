//! Jenkins' remote-access API, the parts a bridge needs: `buildWithParameters`, the queue
//! item it answers with, and the build the item becomes. Credentials go with the first
//! request (HTTP basic with an API token); a CSRF crumb is fetched only when Jenkins asks for
//! one. Blocking (ureq): call from a blocking thread.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Why a call did not work, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Jenkins down, 5xx, a timeout: retry with backoff.
    Transient(String),
    /// 401, 403, 404 and other answers that retrying will not change.
    Refused { status: u16, why: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transient(why) => write!(f, "{why}"),
            CallError::Refused { status, why } => write!(f, "HTTP {status}: {why}"),
        }
    }
}

/// Where a queue item stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueState {
    Waiting,
    Cancelled,
    Started { number: u64, url: String },
}

/// Where a build stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildState {
    Running,
    /// `SUCCESS`, `FAILURE`, `UNSTABLE`, `ABORTED`, `NOT_BUILT`.
    Done(String),
}

pub struct Jenkins {
    base: String,
    auth: Option<String>,
    agent: ureq::Agent,
    crumb: Mutex<Option<(String, String)>>,
}

#[derive(Deserialize)]
struct Crumb {
    crumb: String,
    #[serde(rename = "crumbRequestField")]
    field: String,
}

#[derive(Deserialize)]
struct QueueItem {
    #[serde(default)]
    cancelled: bool,
    executable: Option<Executable>,
}

#[derive(Deserialize)]
struct Executable {
    number: u64,
    url: String,
}

#[derive(Deserialize)]
struct Build {
    #[serde(default)]
    building: bool,
    result: Option<String>,
}

impl Jenkins {
    pub fn new(base: &str, user: &str, token: Option<&str>, timeout: Duration) -> Self {
        use base64::Engine;
        let auth = token.map(|t| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{t}"))
            )
        });
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .build()
            .new_agent();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            auth,
            agent,
            crumb: Mutex::new(None),
        }
    }

    /// `/job/a/job/b` for a job path `a/b`.
    fn job_url(&self, job: &str) -> String {
        let mut url = self.base.clone();
        for part in job.split('/') {
            url.push_str("/job/");
            url.push_str(&urlencode(part));
        }
        url
    }

    /// Starts a build; returns the queue item URL from `Location`.
    pub fn trigger(
        &self,
        job: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<String, CallError> {
        let endpoint = if params.is_empty() {
            "build"
        } else {
            "buildWithParameters"
        };
        let url = format!("{}/{endpoint}", self.job_url(job));
        for attempt in 0..2 {
            let mut req = self.agent.post(&url);
            if let Some(auth) = &self.auth {
                req = req.header("Authorization", auth.as_str());
            }
            if let Some((field, value)) =
                self.crumb.lock().unwrap_or_else(|p| p.into_inner()).clone()
            {
                req = req.header(field.as_str(), value.as_str());
            }
            let form: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut resp = req
                .send_form(form)
                .map_err(|e| CallError::Transient(format!("POST {url}: {e}")))?;
            let status = resp.status().as_u16();
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            match status {
                200..=299 => {
                    let location = resp
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| CallError::Refused {
                            status,
                            why: format!("{url} answered without a Location header"),
                        })?;
                    return Ok(location.to_owned());
                }
                403 if attempt == 0 && body.contains("rumb") => self.fetch_crumb()?,
                500..=599 => {
                    return Err(CallError::Transient(format!("POST {url}: HTTP {status}")));
                }
                _ => {
                    let why = match status {
                        401 => {
                            "Jenkins refused the credentials (check jenkins.user and the API token)"
                                .to_owned()
                        }
                        403 => "the user may not build this job".to_owned(),
                        404 => format!("no such job {job:?}"),
                        _ => first_line(&body),
                    };
                    return Err(CallError::Refused { status, why });
                }
            }
        }
        Err(CallError::Refused {
            status: 403,
            why: "Jenkins kept refusing the crumb".into(),
        })
    }

    fn fetch_crumb(&self) -> Result<(), CallError> {
        let url = format!("{}/crumbIssuer/api/json", self.base);
        let crumb: Crumb = self.get_json(&url)?;
        *self.crumb.lock().unwrap_or_else(|p| p.into_inner()) = Some((crumb.field, crumb.crumb));
        Ok(())
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, url: &str) -> Result<T, CallError> {
        let mut req = self.agent.get(url);
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth.as_str());
        }
        let mut resp = req
            .call()
            .map_err(|e| CallError::Transient(format!("GET {url}: {e}")))?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        match status {
            200..=299 => serde_json::from_str(&body).map_err(|e| CallError::Refused {
                status,
                why: format!("GET {url}: unexpected JSON: {e}"),
            }),
            500..=599 => Err(CallError::Transient(format!("GET {url}: HTTP {status}"))),
            _ => Err(CallError::Refused {
                status,
                why: format!("GET {url}: {}", first_line(&body)),
            }),
        }
    }

    pub fn queue_item(&self, url: &str) -> Result<QueueState, CallError> {
        let item: QueueItem = self.get_json(&format!("{}/api/json", url.trim_end_matches('/')))?;
        Ok(match (item.cancelled, item.executable) {
            (true, _) => QueueState::Cancelled,
            (false, Some(e)) => QueueState::Started {
                number: e.number,
                url: e.url,
            },
            (false, None) => QueueState::Waiting,
        })
    }

    pub fn build(&self, url: &str) -> Result<BuildState, CallError> {
        let build: Build = self.get_json(&format!("{}/api/json", url.trim_end_matches('/')))?;
        Ok(match (build.building, build.result) {
            (false, Some(result)) => BuildState::Done(result),
            _ => BuildState::Running,
        })
    }
}

fn first_line(body: &str) -> String {
    body.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
