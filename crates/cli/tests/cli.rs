//! The real `peerlink` binary: `serve` and two `chat` processes on loopback.

mod common;

use common::Proc;

#[test]
fn chat_between_two_processes_and_clean_shutdown() {
    let mut server = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let line = server.expect("listening on");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let url = format!("ws://{addr}/ws");

    let chat = |name: &str| {
        Proc::spawn(&["chat", "lobby", "--server", &url, "--name", name, "--ice-addr", "127.0.0.1"])
    };
    let mut ada = chat("ada");
    ada.expect("* joined lobby");
    let mut bob = chat("bob");
    bob.expect("* joined lobby");
    bob.expect("* ada");
    ada.expect("* bob");
    bob.expect("* connected to ada");
    ada.expect("* connected to bob");

    ada.type_line("hello bob, über alles");
    assert_eq!(bob.expect("hello bob"), "ada: hello bob, über alles");
    bob.type_line("hi ada");
    assert_eq!(ada.expect("hi ada"), "bob: hi ada");

    // SIGTERM leaves the room cleanly; the other side is told.
    ada.terminate();
    assert_eq!(ada.wait_exit(), 0);
    bob.expect("* ada left");

    // The server shuts down gracefully on SIGTERM too, and tells its clients.
    server.terminate();
    assert_eq!(server.wait_exit(), 0);
    assert_eq!(bob.wait_exit(), 1, "bob's room closed with the server");
}

#[test]
fn chat_reports_an_unreachable_server() {
    // Port 9 on loopback: nothing listens there.
    let mut p = Proc::spawn(&["chat", "lobby", "--server", "ws://127.0.0.1:9/ws", "--ice-addr", "127.0.0.1"]);
    assert_eq!(p.wait_exit(), 1);
}
