//! The health check of a release: an HTTP URL answering 2xx, or a command exiting 0, tried
//! every `interval_ms` until one try succeeds or `deadline_s` passes.

use crate::config::HealthCheck;
use crate::hooks::{self, HookEnv};
use std::time::{Duration, Instant};

/// How the check ended.
#[derive(Debug)]
pub struct HealthOutcome {
    pub healthy: bool,
    pub attempts: u32,
    pub duration: Duration,
    /// The last try's answer, for the result.
    pub detail: String,
}

/// Tries until healthy or `deadline_s` passes; `cap` (the host deadline) ends it
/// sooner, each try included.
pub async fn check(spec: &HealthCheck, env: &HookEnv<'_>, cap: Option<Instant>) -> HealthOutcome {
    let started = Instant::now();
    let mut deadline = started + Duration::from_secs(spec.deadline_s);
    if let Some(cap) = cap {
        deadline = deadline.min(cap);
    }
    let mut attempts = 0;
    loop {
        attempts += 1;
        let try_timeout = Duration::from_secs(spec.try_timeout_s.max(1))
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let (ok, detail) = match (&spec.url, &spec.command) {
            (Some(url), _) => http(url.clone(), try_timeout).await,
            (None, Some(command)) => {
                let try_env = HookEnv {
                    timeout: try_timeout,
                    ..*env
                };
                let run = hooks::run(&command.argv(), &try_env).await;
                let detail = format!("{}\n{}", run.describe("health command"), run.output_tail);
                (run.ok(), detail)
            }
            (None, None) => (true, "no health check configured".to_owned()),
        };
        if ok || Instant::now() + Duration::from_millis(spec.interval_ms) > deadline {
            let detail = if ok {
                detail
            } else {
                format!(
                    "unhealthy after {attempts} tries in {:?}: {detail}",
                    started.elapsed()
                )
            };
            return HealthOutcome {
                healthy: ok,
                attempts,
                duration: started.elapsed(),
                detail,
            };
        }
        tokio::time::sleep(Duration::from_millis(spec.interval_ms)).await;
    }
}

async fn http(url: String, timeout: Duration) -> (bool, String) {
    let shown = url.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        agent.get(&url).call().map(|r| r.status().as_u16())
    })
    .await;
    match answer {
        Ok(Ok(status)) if (200..300).contains(&status) => (true, format!("GET {shown}: {status}")),
        Ok(Ok(status)) => (false, format!("GET {shown}: HTTP {status}")),
        Ok(Err(e)) => (false, format!("GET {shown}: {e}")),
        Err(e) => (false, format!("GET {shown}: {e}")),
    }
}
