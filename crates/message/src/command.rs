//! Commands: what the conductor (or an operator's CLI) orders one host to do.
//!
//! A [`Command`] is serialised once into its exact payload bytes, signed over those bytes,
//! and travels as a [`SignedCommand`] body; the agent verifies the bytes it received and
//! only then parses them (see [`crate::signing`]). Nothing in a command is ever interpolated
//! into a shell; every name in it is a validated type.

use crate::names::{HostName, Name, RefName, ReleaseId, Sha};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A command as signed. `id` equals the id of the envelope it travels in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: Uuid,
    /// The one host allowed to execute it.
    pub host: HostName,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Who asked for it (an operator's login, or `conductor` for a pipeline step).
    pub issuer: String,
    /// The rollout this command belongs to, for reports; absent for ad-hoc commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Export a commit into a new release and switch to it (unless `no_switch`).
    Deploy(DeploySpec),
    /// Switch back to `release`, or to the previous release when absent.
    Rollback {
        app: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<ReleaseId>,
    },
    /// Finish a `no_switch` deploy: switch `current` to `release`, restart, check health.
    Switch { app: Name, release: ReleaseId },
    /// Report each app's current and previous release.
    Inventory,
}

/// A deploy of one commit of one app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub app: Name,
    /// The repository (as the host's fetcher names it) to export from.
    pub repo: Name,
    /// The ref the operator chose; the agent refuses if it now resolves to another commit.
    #[serde(rename = "ref")]
    pub git_ref: RefName,
    pub commit: Sha,
    pub release: ReleaseId,
    /// Stop after the health check of the new release, without switching `current`.
    #[serde(default)]
    pub no_switch: bool,
}

impl Action {
    /// The app the action concerns, if any.
    pub fn app(&self) -> Option<&Name> {
        match self {
            Action::Deploy(spec) => Some(&spec.app),
            Action::Rollback { app, .. } | Action::Switch { app, .. } => Some(app),
            Action::Inventory => None,
        }
    }

    /// A short word for logs and reports.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Deploy(_) => "deploy",
            Action::Rollback { .. } => "rollback",
            Action::Switch { .. } => "switch",
            Action::Inventory => "inventory",
        }
    }
}

/// The body of a `command` message: the exact signed bytes and their signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// Which trusted key signed it; keys rotate by id.
    pub key_id: String,
    /// base64 of the 64-byte ed25519 signature over [`crate::signing::SIGNING_CONTEXT`]
    /// followed by the payload bytes.
    pub sig: String,
    /// The [`Command`] as JSON, exactly as signed.
    pub payload: String,
}
