//! The reference for `bench throughput`: raw str0m with the simplest possible
//! blocking driver (one thread and one socket per side, SDP exchanged in
//! memory), moving the same bytes as peerlink in the same run.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

struct Side {
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
}

fn side() -> anyhow::Result<Side> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(addr, "udp")?);
    Ok(Side { rtc, socket, addr })
}

enum Role {
    /// Writes `total` bytes in `size`-byte messages, then keeps answering.
    Send { total: usize, size: usize },
    /// Returns once `total` bytes arrived.
    Receive { total: usize },
}

/// Drives one side until its role is done or `stop` is set.
fn drive(mut s: Side, role: Role, stop: &AtomicBool, deadline: Instant) -> anyhow::Result<usize> {
    let mut buf = vec![0u8; 2048];
    let mut channel: Option<ChannelId> = None;
    let (total, size) = match role {
        Role::Send { total, size } => (total, size),
        Role::Receive { total } => (total, 0),
    };
    let msg = vec![0x5au8; size];
    let mut sent = 0usize;
    let mut received = 0usize;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(received);
        }
        if Instant::now() > deadline {
            bail!("raw str0m run did not finish in time");
        }
        if size > 0
            && sent < total
            && let Some(id) = channel
            && let Some(mut ch) = s.rtc.channel(id)
        {
            while sent < total && ch.write(true, &msg)? {
                sent += size;
            }
        }
        let timeout = loop {
            match s.rtc.poll_output()? {
                Output::Transmit(t) => {
                    s.socket.send_to(&t.contents, t.destination)?;
                }
                Output::Timeout(t) => break t,
                Output::Event(Event::ChannelOpen(id, _)) => channel = Some(id),
                Output::Event(Event::ChannelData(d)) => received += d.data.len(),
                Output::Event(_) => {}
            }
        };
        if size == 0 && received >= total {
            stop.store(true, Ordering::Release);
            return Ok(received);
        }
        let wait = timeout
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_micros(100), Duration::from_millis(20));
        s.socket.set_read_timeout(Some(wait))?;
        match s.socket.recv_from(&mut buf) {
            Ok((n, source)) => {
                let r = Receive::new(Protocol::Udp, source, s.addr, &buf[..n])?;
                s.rtc.handle_input(Input::Receive(Instant::now(), r))?;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                s.rtc.handle_input(Input::Timeout(Instant::now()))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Moves `total` bytes in `size`-byte messages over raw str0m; returns MB/s.
pub fn throughput(total: usize, size: usize) -> anyhow::Result<f64> {
    let mut a = side()?;
    let mut b = side()?;
    let mut api = a.rtc.sdp_api();
    api.add_channel("bulk".into());
    let (offer, pending) = api.apply().context("no offer")?;
    let answer = b.rtc.sdp_api().accept_offer(offer)?;
    a.rtc.sdp_api().accept_answer(pending, answer)?;

    let deadline = Instant::now() + Duration::from_secs(120);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let s2 = stop.clone();
    let sender = std::thread::spawn(move || drive(a, Role::Send { total, size }, &s2, deadline));
    let s3 = stop.clone();
    let receiver = std::thread::spawn(move || drive(b, Role::Receive { total }, &s3, deadline));
    let got = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Release);
    let sent = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let got = got?;
    sent?;
    Ok(got as f64 / elapsed.as_secs_f64() / 1e6)
}
