//! A real git server over HTTPS for tests: `git http-backend` (the CGI program git ships) run
//! per request behind a TLS listener on 127.0.0.1 that demands HTTP Basic credentials, with
//! certificates from a throwaway CA made here.
//!
//! The HTTP side is deliberately small (HTTP/1.1, keep-alive, `Content-Length` or chunked
//! request bodies): enough for git clients, counted so a test can see what a client sent.

use anyhow::{Context, bail};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A certificate authority that exists only for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA's certificate, PEM: what a client is told to trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<ServerCert> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
        })
    }
}

/// A server's certificate chain and private key.
pub struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

/// `git http-backend` over HTTPS, serving the repositories under a directory to one user.
/// Stopped on drop.
pub struct GitHttpsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    served: AtomicUsize,
    challenged: AtomicUsize,
    refused: AtomicUsize,
}

struct Site {
    root: PathBuf,
    authorization: String,
    counts: Arc<Counts>,
}

impl GitHttpsServer {
    /// Serves the bare repositories under `root` (`https://127.0.0.1:<port>/<name>.git`) to
    /// `user` with `password`; anything else gets 401.
    pub fn start(
        root: &Path,
        cert: ServerCert,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                cert.chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key)),
            )?;
        let tls = Arc::new(tls);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let site = Arc::new(Site {
            root: root.to_owned(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            counts: counts.clone(),
        });
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (tls, site) = (tls.clone(), site.clone());
                std::thread::spawn(move || {
                    // A connection ends when the client closes it or misbehaves.
                    let _ = serve(conn, tls, &site);
                });
            }
        });
        Ok(Self { addr, stop, counts })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests answered by git (credentials accepted).
    pub fn served(&self) -> usize {
        self.counts.served.load(Ordering::SeqCst)
    }

    /// Requests without credentials, answered with a Basic challenge.
    pub fn challenged(&self) -> usize {
        self.counts.challenged.load(Ordering::SeqCst)
    }

    /// Requests with wrong credentials.
    pub fn refused(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }

    /// Every request that reached the HTTP layer (past the TLS handshake).
    pub fn requests(&self) -> usize {
        self.served() + self.challenged() + self.refused()
    }
}

impl Drop for GitHttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn serve(tcp: TcpStream, tls: Arc<rustls::ServerConfig>, site: &Site) -> anyhow::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let conn = rustls::ServerConnection::new(tls)?;
    let mut stream = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    while let Some(request) = read_request(&mut stream)? {
        let (status, headers, body) = respond(&request, site)?;
        let out = stream.get_mut();
        write!(out, "HTTP/1.1 {status}\r\n")?;
        for (k, v) in &headers {
            write!(out, "{k}: {v}\r\n")?;
        }
        write!(out, "Content-Length: {}\r\n\r\n", body.len())?;
        out.write_all(&body)?;
        out.flush()?;
    }
    Ok(())
}

type Response = (String, Vec<(String, String)>, Vec<u8>);

fn respond(request: &Request, site: &Site) -> anyhow::Result<Response> {
    match request.header("Authorization") {
        Some(given) if given == site.authorization => {}
        given => {
            let counter = match given {
                None => &site.counts.challenged,
                Some(_) => &site.counts.refused,
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let challenge = ("WWW-Authenticate".into(), "Basic realm=\"git\"".into());
            return Ok(("401 Unauthorized".into(), vec![challenge], Vec::new()));
        }
    }
    site.counts.served.fetch_add(1, Ordering::SeqCst);
    let mut cgi = Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &site.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", &request.method)
        .env("PATH_INFO", &request.path)
        .env("QUERY_STRING", &request.query)
        .env("REMOTE_USER", "convoy")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", request.body.len().to_string())
        .env(
            "CONTENT_TYPE",
            request.header("Content-Type").unwrap_or_default(),
        );
    if let Some(encoding) = request.header("Content-Encoding") {
        cgi.env("HTTP_CONTENT_ENCODING", encoding);
    }
    if let Some(protocol) = request.header("Git-Protocol") {
        cgi.env("GIT_PROTOCOL", protocol);
    }
    let mut child = cgi
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning git http-backend")?;
    let mut stdin = child.stdin.take().context("git http-backend's stdin")?;
    let body = request.body.clone();
    // Written from another thread: a large response would otherwise block the backend on its
    // stdout while we block on its stdin.
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output()?;
    let _ = writer.join();
    cgi_response(&output.stdout)
}

/// Splits a CGI program's output into status, headers and body.
fn cgi_response(out: &[u8]) -> anyhow::Result<Response> {
    let (head, body) = match find(out, b"\r\n\r\n") {
        Some(i) => (&out[..i], &out[i + 4..]),
        None => match find(out, b"\n\n") {
            Some(i) => (&out[..i], &out[i + 2..]),
            None => bail!("git http-backend wrote no headers"),
        },
    };
    let mut status = "200 OK".to_owned();
    let mut headers = Vec::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("Status") {
            status = v.trim().to_owned();
        } else {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok((status, headers, body.to_vec()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The next request on a keep-alive connection; `None` when the client closed it.
fn read_request<S: Read + Write>(stream: &mut BufReader<S>) -> anyhow::Result<Option<Request>> {
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("bad request line {line:?}");
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    loop {
        line.clear();
        stream.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            request
                .headers
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    if request
        .header("Expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        stream.get_mut().flush()?;
    }
    if request
        .header("Transfer-Encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            stream.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                loop {
                    line.clear();
                    if stream.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = request.body.len();
            request.body.resize(start + size, 0);
            stream.read_exact(&mut request.body[start..])?;
            line.clear();
            stream.read_line(&mut line)?;
        }
    } else if let Some(length) = request.header("Content-Length") {
        let length: usize = length.parse().context("bad Content-Length")?;
        request.body.resize(length, 0);
        stream.read_exact(&mut request.body)?;
    }
    Ok(Some(request))
}
