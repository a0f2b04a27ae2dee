//! The conductor's HTTP API, from the CLI's side.

use serde_json::Value;
use std::io::BufRead;
use std::time::Duration;

/// Why a command failed, and the exit code it gives.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or a local problem (exit 2).
    Usage(String),
    /// The conductor refused the request (exit 3).
    Refused(String),
    /// The conductor cannot be reached, refused the token, or failed (exit 4).
    Unreachable(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Refused(m) | Failure::Unreachable(m) => m,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Refused(_) => 3,
            Failure::Unreachable(_) => 4,
        }
    }
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    fn auth(&self) -> Result<String, Failure> {
        match &self.token {
            Some(t) => Ok(format!("Bearer {t}")),
            None => Err(Failure::Usage(
                "no API token: set CONVOY_TOKEN or pass --token (the conductor's [[tokens]])"
                    .into(),
            )),
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .agent
            .get(&url)
            .header("Authorization", self.auth()?)
            .call()
            .map_err(|e| unreachable(&self.base, e))?;
        answer(resp)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .agent
            .post(&url)
            .header("Authorization", self.auth()?)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| unreachable(&self.base, e))?;
        answer(resp)
    }

    /// Reads the live event stream, calling `each(kind, data)` per event, until it ends.
    pub fn events(&self, mut each: impl FnMut(&str, &Value)) -> Result<(), Failure> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let url = format!("{}/api/events", self.base);
        let resp = agent
            .get(&url)
            .header("Authorization", self.auth()?)
            .header("Accept", "text/event-stream")
            .call()
            .map_err(|e| unreachable(&self.base, e))?;
        if !resp.status().is_success() {
            return answer(resp).map(|_| ());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut kind = String::from("message");
        for line in reader.lines() {
            let line =
                line.map_err(|e| Failure::Unreachable(format!("the event stream broke: {e}")))?;
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                let data: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                each(&kind, &data);
            } else if line.is_empty() {
                kind = String::from("message");
            }
        }
        Ok(())
    }
}

fn unreachable(base: &str, e: ureq::Error) -> Failure {
    Failure::Unreachable(format!(
        "cannot reach the conductor at {base}: {e} (is convoy-conductor running? set CONVOY_URL)"
    ))
}

fn answer(mut resp: ureq::http::Response<ureq::Body>) -> Result<Value, Failure> {
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let message = value["error"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| text.trim().to_owned());
    match status {
        200..=299 => Ok(value),
        401 | 403 => Err(Failure::Unreachable(format!(
            "the conductor refused the token: {message}"
        ))),
        400..=499 => Err(Failure::Refused(message)),
        _ => Err(Failure::Unreachable(format!(
            "the conductor failed ({status}): {message}"
        ))),
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A new random API token and its SHA-256, hex.
pub fn new_token() -> Result<(String, String), String> {
    use sha2::Digest;
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    let token = format!("cvy_{}", hex::encode(bytes));
    let sha = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    Ok((token, sha))
}
