//! `peerlink`: serve signaling, send and receive files, chat in a room,
//! benchmark the stack.

mod bench;
mod chat;
mod common;
mod doc;
mod ping;
mod serve;
mod transfer;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit codes (documented in the README).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A runtime failure: server unreachable, refused, connection lost.
    pub const FAILURE: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// A transfer was cancelled (Ctrl-C here or on the other side).
    pub const CANCELLED: u8 = 3;
    /// Pairing or security failure: wrong code, tampering detected, or an
    /// offer that would write outside the output folder.
    pub const SECURITY: u8 = 4;
    /// The receiver declined the offer.
    pub const DECLINED: u8 = 5;
    /// The receiver's disk is full (partial data is kept for resume).
    pub const DISK_FULL: u8 = 6;
    /// Interrupted by a second Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, Parser)]
#[command(name = "peerlink", version, about = "Peer-to-peer data over WebRTC data channels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the signaling server.
    Serve(Box<serve::ServeArgs>),
    /// Line chat with everyone in ROOM over data channels.
    Chat {
        room: String,
        /// Signaling server: ws://HOST:PORT/ws, http://HOST:PORT or HOST:PORT.
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws", env = "PEERLINK_SERVER")]
        server: String,
        /// Another node of the same deployment to reconnect to when the
        /// server goes away (repeatable); chats carry on meanwhile.
        #[arg(long = "fallback-server")]
        fallback: Vec<String>,
        /// Name shown to the others.
        #[arg(long)]
        name: Option<String>,
        /// Join token for servers that require one (`peerlink token`).
        #[arg(long, env = "PEERLINK_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// An end-to-end encrypted room: the secret every member shares (a
        /// web room link's `#k=` part). The server never sees it; members
        /// without it cannot connect, and a server that tampers with the
        /// signaling is caught.
        #[arg(long, env = "PEERLINK_ROOM_SECRET", hide_env_values = true)]
        room_secret: Option<String>,
        #[command(flatten)]
        ice: common::IceArgs,
    },
    /// Send files, folders or a text; prints a code for the receiver.
    Send(transfer::send::SendArgs),
    /// Receive what a sender offers under CODE.
    Receive(transfer::receive::ReceiveArgs),
    /// Connect to the peers in ROOM and report connect time, path (host,
    /// srflx, relay) and why, RTT, and whether numbered messages arrive once
    /// and in order. Exits 0 when everything arrived.
    Ping(ping::PingArgs),
    /// Sign a join token for a server run with --join-secret (what an
    /// application backend does): prints it.
    Token(serve::TokenArgs),
    /// Stay in ROOM keeping its shared documents (the room page's notes and
    /// whiteboard) on disk, and serve them to peers that come later.
    Keep(doc::KeepArgs),
    /// Print the text of a shared document of ROOM (the room page's notes
    /// by default) once a peer sent it; --follow prints every change.
    Doc(doc::DocArgs),
    /// Measure the stack: two native peers through an in-process server on 127.0.0.1.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

fn init_tracing(default: &str) {
    // The STUN/TURN protocol crates log expected protocol steps (the first,
    // unauthenticated Allocate is refused with 401 by design) at error
    // level; peerlink reports what matters itself.
    let quiet = "stun_proto=off,turn_server_proto=off,turn_client_proto=off";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},{quiet}")));
    // Colours only for a terminal: logs captured to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                init_tracing("info");
                serve::run(*args).await.map(|()| None)
            }
            Command::Chat { room, server, fallback, name, token, room_secret, ice } => {
                init_tracing("warn");
                let servers = std::iter::once(server).chain(fallback).collect();
                let join = chat::Join { room, name, token, room_secret };
                chat::run(servers, join, ice.config()?).await.map(|()| None)
            }
            Command::Token(args) => serve::token(args).map(|()| None),
            Command::Keep(args) => {
                init_tracing("warn");
                doc::keep(args).await.map(|()| None)
            }
            Command::Doc(args) => {
                init_tracing("warn");
                doc::doc(args).await.map(|()| None)
            }
            Command::Send(args) => {
                init_tracing("warn");
                let json = args.json();
                transfer::send::run(args).await.map(Some).inspect_err(|e| {
                    if json {
                        transfer::finished_by_error(e);
                    }
                })
            }
            Command::Receive(args) => {
                init_tracing("warn");
                let json = args.json();
                transfer::receive::run(args).await.map(Some).inspect_err(|e| {
                    if json {
                        transfer::finished_by_error(e);
                    }
                })
            }
            Command::Ping(args) => {
                init_tracing("warn");
                ping::run(args).await.map(|ok| {
                    (!ok).then(|| {
                        transfer::Outcome::Failed("not every message arrived once and in order".into())
                    })
                })
            }
            Command::Bench { what } => {
                init_tracing("warn");
                bench::run(what).await.map(|()| None)
            }
        }
    });
    // Do not wait for blocking tasks: one may be parked reading stdin.
    runtime.shutdown_background();
    match result {
        Ok(None) => ExitCode::from(exit::OK),
        Ok(Some(outcome)) => {
            if outcome != transfer::Outcome::Done {
                eprintln!("peerlink: {}", outcome.message());
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("peerlink: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}
