//! The signaling server's memory per idle connection, measured on a real
//! `peerlink serve` process.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};

pub(super) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// A `peerlink serve --no-turn` child on a free loopback port, with `extra`
/// flags, once it accepts connections: (child, pid, port).
pub(super) async fn spawn_server(extra: &[&str]) -> anyhow::Result<(tokio::process::Child, u32, u16)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--no-turn"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("server pid")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, pid, port))
}

pub(super) async fn signal_memory(conns: usize) -> anyhow::Result<()> {
    // Every connection comes from 127.0.0.1.
    let (mut child, pid, port) =
        spawn_server(&["--max-connections-per-ip", &(conns + 64).to_string()]).await?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let result = async {
        let open = |i: usize| {
            let url = url.clone();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                use tokio_tungstenite::tungstenite::Message as M;
                ws.send(M::Text(r#"{"type":"hello","version":1}"#.into())).await?;
                ws.send(M::Text(format!(r#"{{"type":"join","room":"idle-{}"}}"#, i / 16).into())).await?;
                // welcome + joined
                for _ in 0..2 {
                    ws.next().await.context("server closed")??;
                }
                anyhow::Ok(ws)
            }
        };
        let mut held = Vec::new();
        for i in 0..16 {
            held.push(open(i).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid)?;
        for i in 16..16 + conns {
            held.push(open(i).await?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid)?;
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / conns as f64;
        println!(
            "signal server memory: {conns} idle connections (greeted, in rooms of 16) add {} KiB RSS: {:.1} KiB per connection",
            after.saturating_sub(before),
            per / 1024.0
        );
        drop(held);
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill().await;
    result
}
