//! AMQP URLs (`amqp[s]://user:password@host:port/vhost?query`): taken apart and put
//! back together with another virtual host or other credentials.

use anyhow::{Context, bail};

/// An AMQP URL in parts. The virtual host is kept decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpUrl {
    pub scheme: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `host[:port]`.
    pub host: String,
    pub vhost: String,
    /// What follows `?`, without it (`heartbeat=30`).
    pub query: Option<String>,
}

impl AmqpUrl {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            bail!(
                "{:?} is not an AMQP URL like amqp://host:5672/%2f",
                redact(url)
            );
        };
        if scheme != "amqp" && scheme != "amqps" {
            bail!(
                "{:?}: the scheme must be amqp or amqps, not {scheme}",
                redact(url)
            );
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q.to_owned())),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if host.is_empty() {
            bail!("{:?} names no broker host", redact(url));
        }
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (Some(decode(n)?), Some(decode(p)?)),
                None => (Some(decode(u)?), None),
            },
            None => (None, None),
        };
        let vhost = match path {
            None | Some("") => "/".to_owned(),
            Some(p) => decode(p).with_context(|| format!("the virtual host of {}", redact(url)))?,
        };
        Ok(Self {
            scheme: scheme.to_owned(),
            user,
            password,
            host: host.to_owned(),
            vhost,
            query,
        })
    }

    /// The same URL on another virtual host.
    pub fn with_vhost(&self, vhost: &str) -> Self {
        Self {
            vhost: vhost.to_owned(),
            ..self.clone()
        }
    }

    /// The same broker and virtual host, as another user.
    pub fn with_credentials(&self, user: &str, password: &str) -> Self {
        Self {
            user: Some(user.to_owned()),
            password: Some(password.to_owned()),
            ..self.clone()
        }
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> String {
        convoy_bus::config::redact(&self.to_string())
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.user {
            write!(f, "{}", encode(user))?;
            if let Some(p) = &self.password {
                write!(f, ":{}", encode(p))?;
            }
            write!(f, "@")?;
        }
        write!(f, "{}/{}", self.host, encode(&self.vhost))?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

fn redact(url: &str) -> String {
    convoy_bus::config::redact(url)
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .context("a % not followed by two hex digits")?;
            out.push(u8::from_str_radix(hex, 16).context("a % not followed by two hex digits")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("percent-encoding that is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::AmqpUrl;

    #[test]
    fn round_trips_and_swaps_parts() {
        let u = AmqpUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.vhost, "/");
        assert_eq!(u.host, "127.0.0.1:5672");
        assert_eq!(u.to_string(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        let h = u
            .with_vhost("prod")
            .with_credentials("convoy-host-web1.dc1", "s3cret");
        assert_eq!(
            h.to_string(),
            "amqp://convoy-host-web1.dc1:s3cret@127.0.0.1:5672/prod"
        );
        assert_eq!(
            h.redacted(),
            "amqp://convoy-host-web1.dc1:***@127.0.0.1:5672/prod"
        );
        let q = AmqpUrl::parse("amqps://mq.example.com?heartbeat=10").unwrap();
        assert_eq!(q.vhost, "/");
        assert_eq!(q.to_string(), "amqps://mq.example.com/%2f?heartbeat=10");
        assert!(AmqpUrl::parse("http://x").is_err());
        assert!(AmqpUrl::parse("mq:5672").is_err());
    }
}
