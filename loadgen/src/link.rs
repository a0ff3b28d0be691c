//! A slower link for the gates: every datagram they send is held back for a set time before it
//! goes out, so a run on one machine sees round trips as long as a cellular link's. Round trips
//! are what resumption and an early Hello save, and on loopback they cost almost nothing.

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Datagrams held back at once; more are dropped, as a congested link drops them (QUIC sends
/// them again).
const HELD_DATAGRAMS: usize = 65_536;

/// A UDP socket whose sends arrive `added_rtt` late: each round trip through it is that much
/// longer. Receives are not delayed.
pub struct DelayedLink {
    socket: Arc<dyn AsyncUdpSocket>,
    held: mpsc::Sender<Held>,
    added_rtt: Duration,
}

impl fmt::Debug for DelayedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DelayedLink")
            .field("added_rtt", &self.added_rtt)
            .finish_non_exhaustive()
    }
}

struct Held {
    due: Instant,
    destination: SocketAddr,
    ecn: Option<quinn::udp::EcnCodepoint>,
    contents: Vec<u8>,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
}

impl DelayedLink {
    /// Wraps `socket`; must be called inside a Tokio runtime (it starts the task that sends).
    pub fn wrap(
        socket: std::net::UdpSocket,
        added_rtt: Duration,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let socket = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let (held, due) = mpsc::channel(HELD_DATAGRAMS);
        tokio::spawn(send_when_due(socket.clone(), due));
        Ok(Arc::new(DelayedLink {
            socket,
            held,
            added_rtt,
        }))
    }
}

/// Sends each held datagram at its time, in the order they were held (one delay for all keeps
/// that order the order of their times).
async fn send_when_due(socket: Arc<dyn AsyncUdpSocket>, mut due: mpsc::Receiver<Held>) {
    let mut writable = socket.clone().create_io_poller();
    while let Some(held) = due.recv().await {
        tokio::time::sleep_until(held.due).await;
        let transmit = Transmit {
            destination: held.destination,
            ecn: held.ecn,
            contents: &held.contents,
            segment_size: held.segment_size,
            src_ip: held.src_ip,
        };
        loop {
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                // Sent, or lost as a datagram may be.
                _ => break,
            }
        }
    }
}

/// Always writable: a send only puts the datagram in the queue.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for DelayedLink {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // A full queue drops the datagram, as a congested link would.
        let _ = self.held.try_send(Held {
            due: Instant::now() + self.added_rtt,
            destination: transmit.destination,
            ecn: transmit.ecn,
            contents: transmit.contents.to_vec(),
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        });
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.socket.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.socket.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.socket.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.socket.may_fragment()
    }
}
