//! Why a message was refused. The code and the detail travel as headers on the dead-letter
//! queue (`x-convoy-reason`, `x-convoy-detail`), so an operator reading it knows what to fix.

use std::fmt;

/// The most of a detail that travels in the `x-convoy-detail` header. AMQP cannot split a
/// header frame, and at the default 4 KiB `frame_max` a longer header would make the
/// broker close the connection; the whole message body is on the dead-letter queue anyway.
pub const MAX_DETAIL_BYTES: usize = 1024;

/// `detail` cut to [`MAX_DETAIL_BYTES`] at a character boundary, marked with `…` when cut.
pub fn header_detail(detail: &str) -> String {
    if detail.len() <= MAX_DETAIL_BYTES {
        return detail.to_owned();
    }
    let mut end = MAX_DETAIL_BYTES - '…'.len_utf8();
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &detail[..end])
}

/// A stable, machine-readable reason for refusing a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectionCode {
    /// Not JSON, truncated, or a field of the wrong type.
    Malformed,
    /// Larger than [`crate::MAX_MESSAGE_BYTES`].
    Oversized,
    /// An envelope version this build does not speak.
    UnsupportedVersion,
    /// A `kind` this build does not know.
    UnknownKind,
    /// A field that fails validation (a name with `..`, a sha that is not hex, …).
    InvalidField,
    /// The signature does not verify against the named key.
    BadSignature,
    /// The command names a key id that is not in the trust set.
    UnknownKey,
    /// The command is signed by a key that is not allowed (weak or revoked).
    WeakKey,
    /// The command's validity window ended.
    Expired,
    /// The command's validity window has not started (issued in the future beyond the skew).
    NotYetValid,
    /// The command is addressed to another host.
    WrongHost,
    /// A command id that was already executed with a different payload.
    Replayed,
    /// The ref named by a deploy now resolves to another commit than the signed one.
    RefMoved,
    /// A well-formed message this consumer has no use for (e.g. a result on a command queue).
    Unexpected,
}

impl RejectionCode {
    /// The code as written in the `x-convoy-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownKind => "unknown_kind",
            Self::InvalidField => "invalid_field",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::WeakKey => "weak_key",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongHost => "wrong_host",
            Self::Replayed => "replayed",
            Self::RefMoved => "ref_moved",
            Self::Unexpected => "unexpected",
        }
    }
}

impl fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the code and a sentence naming what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Rejection {
    pub code: RejectionCode,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: RejectionCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_detail_is_cut_at_a_character_boundary() {
        assert_eq!(header_detail("short"), "short");
        let long = "é".repeat(MAX_DETAIL_BYTES);
        let cut = header_detail(&long);
        assert!(cut.len() <= MAX_DETAIL_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
