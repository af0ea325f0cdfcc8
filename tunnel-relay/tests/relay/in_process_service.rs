//! In-process services of the provider role (`ExposeOptions::handlers`), on loopback with a real
//! relay: the program embedding `expose` (the worker agent) gets the tunnel stream itself, with
//! the opener's relay-authenticated name; bytes flow both ways with FIN; the link state is
//! published; a handler that is gone refuses with its reason; TCP services still work beside it.

use std::path::Path;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tunnel_relay::client::{self, ExposeOptions, IncomingStream};
use tunnel_relay::link::LinkState;
use tunnel_relay::{ClientError, Reason, RelayConfig};

use crate::relay_lab;
use relay_lab::{start_relay, tmp};

async fn wait_connected(link: &mut watch::Receiver<LinkState>) -> LinkState {
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        link.wait_for(|l| matches!(l, LinkState::Connected(_))),
    )
    .await
    .map(|r| r.map(|l| l.clone()));
    match got {
        Ok(Ok(l)) => l,
        _ => panic!("never connected: {:?}", *link.borrow()),
    }
}

async fn open(eng: &Path, service: &str) -> Result<(Vec<u8>, String), ClientError> {
    let s = client::session(eng).await?;
    let (mut send, mut recv) = s.open("w", service).await?;
    send.write_all(b"ping")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    send.finish().unwrap_or_else(|e| panic!("{e}"));
    let got = recv
        .read_to_end(1 << 20)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.close().await;
    Ok((got, service.to_string()))
}

#[tokio::test]
async fn in_process_service_gets_the_stream_and_the_authenticated_caller() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let wdir = tmp();
    let (tx, mut rx) = mpsc::channel::<IncomingStream>(4);
    let (link_tx, mut link) = watch::channel(LinkState::Connecting { attempt: 1 });
    let mut opts = ExposeOptions::new(wdir.path().to_path_buf(), "w".into(), Vec::new());
    opts.token = Some(lab.token("worker", None, Some(1)));
    opts.handlers.insert("api".into(), tx);
    opts.link = Some(link_tx);
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(client::expose(opts, async {
        let _ = stopped.await;
    }));
    match wait_connected(&mut link).await {
        LinkState::Connected(a) => {
            assert_eq!(a.name, "w");
            assert_eq!(a.tags, vec!["worker".to_string()]);
            assert_eq!(a.address, lab.addr);
        }
        other => panic!("{other:?}"),
    }

    // The handler: answers "<from>/<service>:" + what it read, then FIN.
    let server = tokio::spawn(async move {
        let mut inc = rx.recv().await.unwrap_or_else(|| panic!("no stream"));
        let got = inc
            .recv
            .read_to_end(1 << 20)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = format!("{}/{}:", inc.from, inc.service).into_bytes();
        answer.extend_from_slice(&got);
        inc.send
            .write_all(&answer)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        inc.send.finish().unwrap_or_else(|e| panic!("{e}"));
        // Keep the stream until the engineer has read it all.
        let _ = inc.send.stopped().await;
        rx
    });

    let eng = tmp();
    client::login(eng.path(), &lab.token("engineer", None, Some(1)), "alice")
        .await
        .unwrap_or_else(|e| panic!("login: {e}"));
    let (got, _) = open(eng.path(), "api")
        .await
        .unwrap_or_else(|e| panic!("open api: {e}"));
    assert_eq!(got, b"alice/api:ping");

    // The handler's receiver gone: refused with the reason, not a hanging stream.
    let rx = server.await.unwrap_or_else(|e| panic!("{e}"));
    drop(rx);
    match open(eng.path(), "api").await {
        Err(ClientError::Rejected(r)) => {
            assert_eq!(r.reason, Reason::ServiceUnavailable, "{r}");
            assert!(r.to_string().contains("api"), "{r}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let _ = stop.send(());
    let res = tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap_or_else(|_| panic!("expose did not stop"));
    assert!(matches!(res, Ok(Ok(()))), "{res:?}");
    assert_eq!(*link.borrow(), LinkState::Stopped);
}

#[tokio::test]
async fn a_refused_worker_publishes_the_reason() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let wdir = tmp();
    let (link_tx, link) = watch::channel(LinkState::Connecting { attempt: 1 });
    let mut opts = ExposeOptions::new(wdir.path().to_path_buf(), "w".into(), Vec::new());
    // A secret this relay never issued (another relay's): refused for good.
    let mut tok = lab.token("worker", None, Some(1));
    let other = start_relay(RelayConfig::default()).await;
    tok.secret = other.token("worker", None, Some(1)).secret;
    opts.token = Some(tok);
    opts.link = Some(link_tx);
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        client::expose(opts, std::future::pending()),
    )
    .await
    .unwrap_or_else(|_| panic!("expose did not give up"));
    assert!(matches!(res, Err(ClientError::Rejected(_))), "{res:?}");
    let last = link.borrow().clone();
    match last {
        LinkState::Failed { reason } => assert!(reason.contains("token unknown"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
