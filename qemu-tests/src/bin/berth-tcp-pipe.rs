//! `berth-tcp-pipe PORT`: joins its stdin and stdout to a TCP connection to
//! 127.0.0.1:PORT. QEMU's `guestfwd=...-cmd:` runs one per guest connection,
//! which is how a guest reaches a server on the host's loopback (a registry)
//! with as many connections as it likes; a `tcp:` chardev carries only one.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

fn main() {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: berth-tcp-pipe PORT");
        std::process::exit(2);
    };
    let Ok(conn) = TcpStream::connect(("127.0.0.1", port)) else {
        std::process::exit(1);
    };
    let Ok(mut up) = conn.try_clone() else {
        std::process::exit(1);
    };
    let to_server = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || up.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up.shutdown(Shutdown::Write);
    });
    let mut down = conn;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = down.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
            break;
        }
    }
    drop(to_server);
}
