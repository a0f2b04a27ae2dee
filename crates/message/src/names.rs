//! Validated names. Every name that reaches a path, a routing key, a git call or an
//! environment variable passes through one of these types, so a hostile message cannot
//! smuggle `..`, a slash, a NUL byte or a routing wildcard past a daemon.
//!
//! Each type deserialises through its validator: a message with a bad name fails to decode.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

fn err(what: &'static str, value: &str, why: &'static str) -> NameError {
    let mut value = value.to_owned();
    value.truncate(80);
    NameError { what, value, why }
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                $check(&value).map_err(|why| err($what, &value, why))?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

validated_name!(
    /// An app or repository name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 64 bytes. No dots, so
    /// it is one routing-key word and one path component.
    Name,
    "name",
    check_name
);
validated_name!(
    /// A host name as RFC 1123 allows it: letters, digits, `-` and `.`, at most 253 bytes.
    HostName,
    "host name",
    check_host
);
validated_name!(
    /// A release id, the directory name under `releases/`: `[A-Za-z0-9][A-Za-z0-9._-]*`,
    /// at most 128 bytes, never `..`.
    ReleaseId,
    "release id",
    check_release
);
validated_name!(
    /// A full git ref name (`refs/heads/main`, `refs/tags/v1.2`) that `git check-ref-format`
    /// would accept and that is safe to pass to git as an argument.
    RefName,
    "ref name",
    check_ref
);
validated_name!(
    /// A full commit id: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
    Sha,
    "commit id",
    check_sha
);

fn check_name(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    let mut chars = v.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err("may contain only letters, digits, '_' and '-'");
    }
    Ok(())
}

fn check_host(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for label in v.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("may contain only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'");
        }
    }
    Ok(())
}

fn check_release(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !v.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit");
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("may contain only letters, digits, '.', '_' and '-'");
    }
    if v.contains("..") {
        return Err("may not contain '..'");
    }
    Ok(())
}

fn check_ref(v: &str) -> Result<(), &'static str> {
    if !v.starts_with("refs/") {
        return Err("must be a full ref name starting with refs/");
    }
    if v.len() > 255 {
        return Err("must be at most 255 characters");
    }
    if v.contains("..") || v.contains("//") || v.contains("@{") {
        return Err("may not contain '..', '//' or '@{'");
    }
    if v.ends_with('/') || v.ends_with('.') || v.ends_with(".lock") {
        return Err("may not end with '/', '.' or '.lock'");
    }
    if v.chars()
        .any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err("may not contain spaces, control characters or any of ~^:?*[\\");
    }
    if v.split('/')
        .any(|part| part.is_empty() || part.starts_with('.') || part.starts_with('-'))
    {
        return Err("no path component may be empty or start with '.' or '-'");
    }
    Ok(())
}

fn check_sha(v: &str) -> Result<(), &'static str> {
    if v.len() != 40 && v.len() != 64 {
        return Err("must be 40 or 64 hex digits");
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err("must be lowercase hex");
    }
    Ok(())
}

impl Sha {
    /// The all-zero id git uses for "no commit" (a created or deleted ref).
    pub fn zero() -> Self {
        Self("0".repeat(40))
    }

    pub fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }

    /// The first 12 digits, for people.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl RefName {
    /// `main` for `refs/heads/main`, `v1.2` for `refs/tags/v1.2`, the full name otherwise.
    pub fn short(&self) -> &str {
        self.0
            .strip_prefix("refs/heads/")
            .or_else(|| self.0.strip_prefix("refs/tags/"))
            .unwrap_or(&self.0)
    }

    pub fn is_tag(&self) -> bool {
        self.0.starts_with("refs/tags/")
    }

    pub fn is_branch(&self) -> bool {
        self.0.starts_with("refs/heads/")
    }

    /// Expands a short name the way an operator types it: `v1.2` → `refs/tags/v1.2` when
    /// `tag`, `refs/heads/v1.2` otherwise; a full `refs/…` name is kept.
    pub fn expand(short: &str, tag: bool) -> Result<Self, NameError> {
        if short.starts_with("refs/") {
            Self::new(short)
        } else if tag {
            Self::new(format!("refs/tags/{short}"))
        } else {
            Self::new(format!("refs/heads/{short}"))
        }
    }
}

impl HostName {
    /// The host as one routing-key word: dots become `_`, which RFC 1123 forbids in host
    /// names, so the mapping is one to one.
    pub fn routing_word(&self) -> String {
        self.0.replace('.', "_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_traversal_and_wildcards() {
        assert!(Name::new("web").is_ok());
        assert!(Name::new("my_app-2").is_ok());
        for bad in [
            "", "..", "../etc", "a/b", "a.b", "a*", "a#", "-x", "x y", "é",
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn release_ids_are_single_safe_components() {
        assert!(ReleaseId::new("20261123T101500Z-abcdef123456").is_ok());
        assert!(ReleaseId::new("v1.2.3").is_ok());
        for bad in ["", ".", "..", "a/../b", "/abs", "a..b", ".hidden", "a\0b"] {
            assert!(ReleaseId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn refs_follow_check_ref_format() {
        for good in [
            "refs/heads/main",
            "refs/tags/v1.2.3",
            "refs/heads/feature/x-1",
        ] {
            assert!(RefName::new(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "main",
            "refs/heads/../x",
            "refs/heads/x.lock",
            "refs/heads/a b",
            "refs/heads/-rf",
            "refs/heads/a:b",
            "refs/heads/.x",
            "refs/heads/x/",
            "refs/heads/@{1}",
        ] {
            assert!(RefName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            RefName::expand("v1", true).unwrap().as_str(),
            "refs/tags/v1"
        );
        assert_eq!(RefName::new("refs/tags/v1").unwrap().short(), "v1");
    }

    #[test]
    fn shas_are_full_lowercase_hex() {
        assert!(Sha::new("a".repeat(40)).is_ok());
        assert!(Sha::new("a".repeat(64)).is_ok());
        assert!(Sha::new("A".repeat(40)).is_err());
        assert!(Sha::new("abc").is_err());
        assert!(Sha::zero().is_zero());
    }

    #[test]
    fn hosts_map_to_one_routing_word() {
        let h = HostName::new("web-1.dc1.example.com").unwrap();
        assert_eq!(h.routing_word(), "web-1_dc1_example_com");
        for bad in ["", "a..b", "-a", "a_b", "a/b", "a*"] {
            assert!(HostName::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_deserialise_through_their_validator() {
        let r: Result<Name, _> = serde_json::from_str("\"../x\"");
        assert!(r.unwrap_err().to_string().contains("invalid name"));
    }
}
