//! The typed bodies carried by the envelope, one per message kind.

use crate::names::{HostName, Name, RefName, ReleaseId, Sha};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

/// `push`: one ref changed in a central repository (published by convoy-hook).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushEvent {
    pub repo: Name,
    #[serde(rename = "ref")]
    pub git_ref: RefName,
    pub ref_kind: RefKind,
    /// The previous commit; all zeros when the ref was created.
    pub old: Sha,
    /// The new commit; all zeros when the ref was deleted.
    pub new: Sha,
    pub change: PushChange,
    /// Newest first, at most the hook's configured limit.
    #[serde(default)]
    pub commits: Vec<CommitSummary>,
    /// More commits were pushed than `commits` holds.
    #[serde(default)]
    pub truncated: bool,
    /// Who pushed, when the server knows (e.g. `GL_USERNAME`, the webhook's pusher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pusher: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    Branch,
    Tag,
    Other,
}

impl RefKind {
    pub fn of(r: &RefName) -> Self {
        if r.is_branch() {
            RefKind::Branch
        } else if r.is_tag() {
            RefKind::Tag
        } else {
            RefKind::Other
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushChange {
    Created,
    Updated,
    /// The old commit is not an ancestor of the new one.
    Forced,
    Deleted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitSummary {
    pub sha: Sha,
    pub author: String,
    /// The first line of the message.
    pub summary: String,
}

/// `build`: a CI job's progress for one commit (published by convoy-ci).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildEvent {
    pub repo: Name,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<RefName>,
    pub commit: Sha,
    pub status: BuildStatus,
    pub job: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Why it failed to start or ended badly, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Queued,
    Started,
    Succeeded,
    Failed,
    Aborted,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Started => "started",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }
}

/// `fetch`: a host's mirror fetched a repository, or failed to (published by convoy-fetcher).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FetchReport {
    pub host: HostName,
    pub repo: Name,
    pub status: FetchStatus,
    /// Every branch and tag of the mirror after the fetch, with its commit.
    #[serde(default)]
    pub refs: BTreeMap<String, Sha>,
    /// The push events this fetch answers (coalesced bursts list several).
    #[serde(default)]
    pub for_events: Vec<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchStatus {
    Fetched,
    Failed,
}

/// The steps of a deploy on a host, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Verify,
    Export,
    Build,
    PreSwitch,
    Switch,
    Restart,
    Health,
    PostSwitch,
    /// Switching back to the previous release after a failure.
    Revert,
    Cleanup,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 10] = [
        Self::Verify,
        Self::Export,
        Self::Build,
        Self::PreSwitch,
        Self::Switch,
        Self::Restart,
        Self::Health,
        Self::PostSwitch,
        Self::Revert,
        Self::Cleanup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Export => "export",
            Self::Build => "build",
            Self::PreSwitch => "pre_switch",
            Self::Switch => "switch",
            Self::Restart => "restart",
            Self::Health => "health",
            Self::PostSwitch => "post_switch",
            Self::Revert => "revert",
            Self::Cleanup => "cleanup",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Succeeded,
    Failed,
    Skipped,
}

/// `progress`: one step of a command started or ended on a host (published by convoy-agent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployProgress {
    pub command_id: Uuid,
    pub host: HostName,
    pub app: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    pub release: ReleaseId,
    pub step: Step,
    pub state: StepState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// The record of one step in a [`DeployResult`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: Step,
    pub state: StepState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// The last lines of the hook's combined output, bounded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output_tail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployOutcome {
    Succeeded,
    Failed,
    /// Verified, but not executed (ref moved, app unknown, lock held by a dead command…).
    Refused,
}

/// `result`: how a command ended on a host (published by convoy-agent, exactly one per
/// command id; a redelivered command answers with the recorded result again).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployResult {
    pub command_id: Uuid,
    pub host: HostName,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    pub outcome: DeployOutcome,
    /// After a failure past the switch, `current` was put back on the previous release.
    #[serde(default)]
    pub rolled_back: bool,
    /// What `current` points to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<ReleaseId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ReleaseId>,
    #[serde(default)]
    pub steps: Vec<StepReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// When the result was built, to the microsecond (`duration_ms` is whole milliseconds).
    /// Absent from agents before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// One app's releases on one host.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AppRelease {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<ReleaseId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ReleaseId>,
    /// The commit `current` was exported from, when the release records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<Sha>,
}

/// `inventory`: a host's answer to an inventory command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryReport {
    pub command_id: Uuid,
    pub host: HostName,
    pub apps: BTreeMap<Name, AppRelease>,
    /// Every release directory present per app, oldest first.
    #[serde(default)]
    pub releases: BTreeMap<Name, Vec<ReleaseId>>,
}

/// `heartbeat`: a host is alive, with its labels and what it runs (published by
/// convoy-heartbeat every interval).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host: HostName,
    /// role, stage, datacentre, … as configured on the host.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// convoy component → version.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    #[serde(default)]
    pub apps: BTreeMap<Name, AppRelease>,
    /// 1, 5 and 15 minute load averages.
    #[serde(default)]
    pub load: [f64; 3],
    /// Free bytes on the filesystem holding the app roots.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// Seconds until the next heartbeat; the conductor derives stale/gone from it.
    pub interval_s: u32,
    pub started_at: DateTime<Utc>,
}
