//! Pipelines: one commit carried through an app's stages, each stage a rollout, each gate
//! deciding whether the next one starts.

use chrono::{DateTime, Utc};
use convoy_message::names::{Name, RefName, ReleaseId, Sha};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    /// A stage's rollout runs.
    Deploying,
    /// A gate is being evaluated (a tests command runs).
    Gating,
    /// A gate waits for a person: a manual gate, or an inconclusive check.
    WaitingForPromotion,
    Succeeded,
    Failed,
    Aborted,
}

impl PipelineState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Gating => "gating",
            Self::WaitingForPromotion => "waiting_for_promotion",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Aborted)
    }
}

/// What a gate said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateState {
    Running,
    Waiting,
    Passed,
    Failed,
    /// A person pressed Promote.
    Promoted,
}

/// One gate's evaluation, kept in the pipeline's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    /// The stage the gate follows.
    pub after: String,
    pub kind: String,
    pub state: GateState,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Who promoted (manual gates), or `conductor`.
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The last part of a tests command's output.
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: i64,
    pub app: Name,
    #[serde(default)]
    pub git_ref: Option<RefName>,
    pub commit: Sha,
    pub release: ReleaseId,
    /// Index of the stage in progress (or whose gate is being decided).
    pub stage: usize,
    pub state: PipelineState,
    /// What started it (e.g. `build web #42`).
    pub trigger: String,
    /// Rollout ids, one per stage reached.
    #[serde(default)]
    pub rollouts: Vec<i64>,
    #[serde(default)]
    pub gates: Vec<GateRecord>,
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a gate check concluded. Metric-analysis gates answer `Inconclusive` when the data
/// cannot decide; the pipeline then waits for a person, as at a manual gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Inconclusive(String),
}

/// What a gate check knows about the stage it judges.
#[derive(Clone, Debug)]
pub struct GateContext {
    pub pipeline: i64,
    pub app: String,
    pub stage: String,
    pub next_stage: String,
    pub release: String,
    pub commit: String,
    pub git_ref: Option<String>,
    pub hosts: Vec<String>,
}

/// The result of a check, with what it printed.
#[derive(Clone, Debug)]
pub struct GateOutcome {
    pub verdict: Verdict,
    pub exit_code: Option<i32>,
    pub output: String,
}

/// A gate that decides by itself (tests now; metric analysis next). Manual gates are not
/// checks: they wait for Promote.
pub trait GateCheck: Send + Sync + 'static {
    fn evaluate(
        &self,
        ctx: GateContext,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = GateOutcome> + Send>>;
}

/// Output kept per gate run.
pub const GATE_OUTPUT_BYTES: usize = 16 * 1024;

/// Runs an integration-test command (argv, no shell) against a stage: exit 0 passes.
pub struct TestsGate {
    pub command: Vec<String>,
    pub timeout: std::time::Duration,
}

impl GateCheck for TestsGate {
    fn evaluate(
        &self,
        ctx: GateContext,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = GateOutcome> + Send>> {
        let command = self.command.clone();
        let timeout = self.timeout;
        Box::pin(async move { run_tests(command, timeout, ctx).await })
    }
}

async fn run_tests(
    command: Vec<String>,
    timeout: std::time::Duration,
    ctx: GateContext,
) -> GateOutcome {
    use std::process::Stdio;
    let fail = |output: String| GateOutcome {
        verdict: Verdict::Fail(output.clone()),
        exit_code: None,
        output,
    };
    let Some((program, args)) = command.split_first() else {
        return fail("the tests gate has no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("CONVOY_PIPELINE", ctx.pipeline.to_string())
        .env("CONVOY_APP", &ctx.app)
        .env("CONVOY_STAGE", &ctx.stage)
        .env("CONVOY_NEXT_STAGE", &ctx.next_stage)
        .env("CONVOY_RELEASE", &ctx.release)
        .env("CONVOY_COMMIT", &ctx.commit)
        .env("CONVOY_REF", ctx.git_ref.as_deref().unwrap_or(""))
        .env("CONVOY_HOSTS", ctx.hosts.join(" "))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {program}: {e}")),
    };
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let output = tail(&text, GATE_OUTPUT_BYTES);
            let code = out.status.code();
            let verdict = if out.status.success() {
                Verdict::Pass
            } else {
                Verdict::Fail(match code {
                    Some(c) => format!("the tests command exited with {c}"),
                    None => "the tests command was killed by a signal".into(),
                })
            };
            GateOutcome {
                verdict,
                exit_code: code,
                output,
            }
        }
        Ok(Err(e)) => fail(format!("waiting for the tests command: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                // The whole process group: tests often start servers of their own.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            fail(format!(
                "the tests command did not finish within {} s and was killed",
                timeout.as_secs()
            ))
        }
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
