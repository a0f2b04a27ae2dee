//! amqps:// to a private node with a TLS listener and a private CA: the broker's certificate
//! is verified against `bus.tls_ca_file`, and refused without it.

use convoy_bus::{Bus, Consumer, Disposition, Incoming, Outgoing, Publisher, QueueSpec, Retry};
use convoy_message::names::{HostName, Name, Sha};
use convoy_message::{Body, FetchReport, FetchStatus, Message};
use convoy_testkit::{BrokerNode, TestBus, wait_until};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and a server certificate for localhost / 127.0.0.1.
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=convoy test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() -> anyhow::Result<()> {
    anyhow::ensure!(
        BrokerNode::available(),
        "needs a private RabbitMQ node: run scripts/test as root"
    );
    let tls_port = convoy_testkit::free_port();
    let node = BrokerNode::start_with(|dir| {
        make_certs(dir)?;
        Ok(format!(
            "listeners.ssl.default = {tls_port}\nssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\nssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
            d = dir.display()
        ))
    })
    .await?;
    let ca = tempfile::NamedTempFile::new()?;
    let node_ca = node.dir().join("ca.pem");
    std::fs::copy(&node_ca, ca.path())?;

    let tb = TestBus::on(&node.url());
    let mut config = tb.config();
    config.amqp_url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");

    // Without the CA the broker's certificate is refused.
    let untrusting = Publisher::new(Bus::new(config.clone(), "tls-no-ca")?);
    let m = Message::new(
        "test",
        Body::Fetch(FetchReport {
            host: HostName::new("h")?,
            repo: Name::new("web")?,
            status: FetchStatus::Fetched,
            refs: [("refs/heads/main".into(), Sha::zero())].into(),
            for_events: vec![],
            error: None,
            duration_ms: 1,
        }),
    );
    let err = untrusting
        .publish(&Outgoing::message(&m)?, Retry::once())
        .await
        .expect_err("an unknown CA must be refused");
    assert!(err.to_string().contains("connect"), "{err}");

    // With it: a confirmed round trip over TLS.
    config.tuning.tls_ca_file = Some(ca.path().to_owned());
    let bus = Bus::new(config, "tls")?;
    let consumer = Consumer::new(
        bus.clone(),
        QueueSpec::new(tb.queue("tls"), vec!["fetch.#".into()]),
    );
    consumer.declare().await?;
    Publisher::new(bus.clone())
        .publish(
            &Outgoing::message(&m)?,
            Retry::within(Duration::from_secs(10)),
        )
        .await?;
    let got = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let got = got.clone();
        move |i: Incoming| {
            got.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(i.message.id);
            async { Disposition::Ack }
        }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { consumer.run(&handler, cancel).await }
    });
    wait_until(Duration::from_secs(10), "the message over TLS", || {
        let n = got.lock().unwrap_or_else(|p| p.into_inner()).len();
        async move { (n == 1).then_some(()) }
    })
    .await?;
    assert_eq!(got.lock().unwrap_or_else(|p| p.into_inner())[0], m.id);
    cancel.cancel();
    task.await??;
    Ok(())
}
