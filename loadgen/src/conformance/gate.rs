//! `tapgate conformance gate`: runs the [`Referee`] on a QUIC endpoint. Gates under test connect
//! to it as to a gateway; the run ends when the expected number of gates has completed the
//! script, or at the deadline, and returns every rule with its verdict.

use super::Check;
use super::referee::{Action, ConnectionId, Referee, RefereeSettings};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tapgate_transport::finish_when_acknowledged;
use tokio::sync::Notify;

/// How often held answers and deadlines are looked at.
const TICK: Duration = Duration::from_millis(2);
/// The protocol's Hello deadline, counted here from the connection to the stream.
const STREAM_DEADLINE: Duration = Duration::from_secs(5);

pub struct RefereeRun {
    pub checks: Vec<Check>,
    pub completed: usize,
    pub connections: u64,
}

/// Referees every gate that connects to `endpoint` until `gates` of them have completed the
/// script or `deadline` has passed.
pub async fn referee(
    endpoint: quinn::Endpoint,
    settings: RefereeSettings,
    gates: usize,
    deadline: Duration,
) -> RefereeRun {
    let referee = Arc::new(Mutex::new(Referee::new(settings)));
    let completed = Arc::new(Notify::new());
    let started = Instant::now();
    let ids = AtomicU64::new(0);
    let end = tokio::time::sleep(deadline);
    tokio::pin!(end);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(connection(
                    incoming,
                    id,
                    referee.clone(),
                    completed.clone(),
                    gates,
                    started,
                ));
            }
            _ = completed.notified() => break,
            _ = &mut end => break,
        }
    }
    endpoint.close(0u32.into(), b"done");
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let referee = referee.lock().expect("referee lock");
    RefereeRun {
        checks: referee.checks(),
        completed: referee.completed(),
        connections: ids.load(Ordering::Relaxed),
    }
}

async fn connection(
    incoming: quinn::Incoming,
    id: ConnectionId,
    referee: Arc<Mutex<Referee>>,
    completed: Arc<Notify>,
    gates: usize,
    started: Instant,
) {
    let Ok(connection) = incoming.await else {
        return;
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(STREAM_DEADLINE, connection.accept_bi()).await
    else {
        connection.close(16u32.into(), b"hello_timeout");
        return;
    };
    let version = tapgate_transport::tls::negotiated_version(&connection);
    let now = || started.elapsed().as_millis() as u64;
    let call = |f: &mut dyn FnMut(&mut Referee) -> Vec<Action>| {
        let mut referee = referee.lock().expect("referee lock");
        let actions = f(&mut referee);
        // For the person running the gate under test, beside the report on stdout.
        for notice in referee.take_notices() {
            eprintln!("{notice}");
        }
        if referee.completed() >= gates {
            completed.notify_one();
        }
        actions
    };
    call(&mut |r| {
        r.opened(id, version);
        Vec::new()
    });
    let mut ticks = tokio::time::interval(TICK);
    let mut reading = true;
    'session: loop {
        let actions = tokio::select! {
            chunk = recv.read_chunk(1024, true), if reading => match chunk {
                Ok(Some(chunk)) => call(&mut |r| r.received(id, &chunk.bytes, now())),
                Ok(None) => {
                    reading = false;
                    call(&mut |r| r.gate_finished(id, now()))
                }
                Err(_) => break 'session,
            },
            _ = ticks.tick() => call(&mut |r| r.tick(id, now())),
            _ = connection.closed() => break 'session,
        };
        for action in actions {
            match action {
                Action::Write(bytes) => {
                    if send.write_all(&bytes).await.is_err() {
                        break 'session;
                    }
                }
                Action::Close { code, reason } => {
                    finish_when_acknowledged(&mut send, &connection).await;
                    connection.close(code.into(), reason.as_bytes());
                    break 'session;
                }
            }
        }
    }
    call(&mut |r| {
        r.closed(id);
        Vec::new()
    });
}
