//! The envelope every message travels in, and the strict decoder for bytes off the network.
//!
//! ```json
//! {"v":1,"id":"0193…","kind":"push","at":"2026-11-23T10:00:00Z","from":"hook@git1","body":{…}}
//! ```
//!
//! Decoding never panics: oversized input, bad JSON, an unknown version or kind, and a body
//! that fails validation each return a [`Rejection`] naming the problem.

use crate::body::{
    BuildEvent, DeployProgress, DeployResult, FetchReport, Heartbeat, InventoryReport, PushEvent,
};
use crate::command::SignedCommand;
use crate::rejection::{Rejection, RejectionCode};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// The envelope version this build writes and reads.
pub const VERSION: u32 = 1;

/// The largest message accepted or sent. Hook output tails and commit lists are bounded
/// well below it.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// A decoded message.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// The sender, as `<daemon>@<host>`.
    pub from: String,
    pub body: Body,
}

/// The typed body; its variant is the envelope's `kind`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    Push(PushEvent),
    Build(BuildEvent),
    Fetch(FetchReport),
    Command(SignedCommand),
    Progress(DeployProgress),
    Result(DeployResult),
    Inventory(InventoryReport),
    Heartbeat(Heartbeat),
}

impl Body {
    /// The `kind` written in the envelope.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Push(_) => "push",
            Body::Build(_) => "build",
            Body::Fetch(_) => "fetch",
            Body::Command(_) => "command",
            Body::Progress(_) => "progress",
            Body::Result(_) => "result",
            Body::Inventory(_) => "inventory",
            Body::Heartbeat(_) => "heartbeat",
        }
    }

    /// Every kind this build understands.
    pub const KINDS: [&'static str; 8] = [
        "push",
        "build",
        "fetch",
        "command",
        "progress",
        "result",
        "inventory",
        "heartbeat",
    ];
}

#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    id: Uuid,
    kind: &'static str,
    at: DateTime<Utc>,
    from: &'a str,
    body: &'a Body,
}

#[derive(Deserialize)]
struct WireIn<'a> {
    v: u32,
    id: Uuid,
    kind: String,
    at: DateTime<Utc>,
    from: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

impl Message {
    /// A new message with a fresh time-ordered id, stamped now.
    pub fn new(from: impl Into<String>, body: Body) -> Self {
        Self::with_id(Uuid::now_v7(), from, body)
    }

    /// A message with a given id (a spooled event keeps the id it was born with).
    pub fn with_id(id: Uuid, from: impl Into<String>, body: Body) -> Self {
        Self {
            id,
            at: Utc::now().trunc_subsecs(3),
            from: from.into(),
            body,
        }
    }

    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// The JSON bytes to publish. Fails only if the result exceeds [`MAX_MESSAGE_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, Rejection> {
        let wire = WireOut {
            v: VERSION,
            id: self.id,
            kind: self.kind(),
            at: self.at,
            from: &self.from,
            body: &self.body,
        };
        let bytes = serde_json::to_vec(&wire)
            .map_err(|e| Rejection::new(RejectionCode::Malformed, format!("cannot encode: {e}")))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Rejection::new(
                RejectionCode::Oversized,
                format!(
                    "{} message is {} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
                    self.kind(),
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// Decodes bytes from the network. Every failure is a [`Rejection`] fit for the
    /// dead-letter queue.
    pub fn decode(bytes: &[u8]) -> Result<Self, Rejection> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Rejection::new(
                RejectionCode::Oversized,
                format!(
                    "{} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let wire: WireIn<'_> = match serde_json::from_slice(bytes) {
            Ok(wire) => wire,
            Err(e) => {
                // Name the version problem first: a v2 envelope may well have other fields.
                if let Ok(VersionOnly { v }) = serde_json::from_slice(bytes)
                    && v != VERSION
                {
                    return Err(unsupported(v));
                }
                return Err(json_rejection("envelope", &e));
            }
        };
        if wire.v != VERSION {
            return Err(unsupported(wire.v));
        }
        let raw = wire.body.get();
        let body = match wire.kind.as_str() {
            "push" => Body::Push(parse(raw, "push")?),
            "build" => Body::Build(parse(raw, "build")?),
            "fetch" => Body::Fetch(parse(raw, "fetch")?),
            "command" => Body::Command(parse(raw, "command")?),
            "progress" => Body::Progress(parse(raw, "progress")?),
            "result" => Body::Result(parse(raw, "result")?),
            "inventory" => Body::Inventory(parse(raw, "inventory")?),
            "heartbeat" => Body::Heartbeat(parse(raw, "heartbeat")?),
            other => {
                let mut other = other.to_owned();
                other.truncate(64);
                return Err(Rejection::new(
                    RejectionCode::UnknownKind,
                    format!(
                        "unknown kind {other:?}; this build knows {}",
                        Body::KINDS.join(", ")
                    ),
                ));
            }
        };
        Ok(Self {
            id: wire.id,
            at: wire.at,
            from: wire.from,
            body,
        })
    }
}

fn unsupported(v: u32) -> Rejection {
    Rejection::new(
        RejectionCode::UnsupportedVersion,
        format!("envelope version {v} is not supported; this build speaks version {VERSION}"),
    )
}

fn parse<T: for<'de> Deserialize<'de>>(raw: &str, kind: &str) -> Result<T, Rejection> {
    serde_json::from_str(raw).map_err(|e| json_rejection(kind, &e))
}

/// A type or validation error inside well-formed JSON is an invalid field; anything else
/// (syntax, truncation) is malformed.
fn json_rejection(what: &str, e: &serde_json::Error) -> Rejection {
    let code = if e.is_data() {
        RejectionCode::InvalidField
    } else {
        RejectionCode::Malformed
    };
    Rejection::new(code, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{PushChange, RefKind};
    use crate::names::{Name, RefName, Sha};

    fn push() -> Message {
        Message::new(
            "hook@git1",
            Body::Push(PushEvent {
                repo: Name::new("web").unwrap(),
                git_ref: RefName::new("refs/tags/v1").unwrap(),
                ref_kind: RefKind::Tag,
                old: Sha::zero(),
                new: Sha::new("ab".repeat(20)).unwrap(),
                change: PushChange::Created,
                commits: vec![],
                truncated: false,
                pusher: None,
            }),
        )
    }

    #[test]
    fn round_trip() {
        let m = push();
        let bytes = m.encode().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with(r#"{"v":1,"id":""#), "{text}");
        assert!(text.contains(r#""kind":"push""#));
        assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    fn code_of(bytes: &[u8]) -> RejectionCode {
        Message::decode(bytes).unwrap_err().code
    }

    #[test]
    fn bad_input_is_named() {
        let good = String::from_utf8(push().encode().unwrap()).unwrap();
        assert_eq!(code_of(b"not json"), RejectionCode::Malformed);
        assert_eq!(
            code_of(&good.as_bytes()[..good.len() / 2]),
            RejectionCode::Malformed
        );
        assert_eq!(
            code_of(good.replacen(r#""v":1"#, r#""v":9"#, 1).as_bytes()),
            RejectionCode::UnsupportedVersion
        );
        assert_eq!(
            code_of(r#"{"v":2,"whatever":true}"#.as_bytes()),
            RejectionCode::UnsupportedVersion
        );
        assert_eq!(
            code_of(
                good.replacen(r#""kind":"push""#, r#""kind":"nuke""#, 1)
                    .as_bytes()
            ),
            RejectionCode::UnknownKind
        );
        assert_eq!(
            code_of(
                good.replacen(r#""repo":"web""#, r#""repo":"../web""#, 1)
                    .as_bytes()
            ),
            RejectionCode::InvalidField
        );
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(code_of(&big), RejectionCode::Oversized);
    }
}
