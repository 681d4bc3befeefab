//! The cheapest proxy that can stand between a client and a registry: a TCP relay with blocking
//! sockets, one thread per direction and a 256 KiB buffer, optionally hashing every byte it passes
//! from the registry to the client with the same SHA-256 implementation regmux uses.
//!
//! `bench/run.sh` measures it beside regmux to show what bounds a proxy on this machine: whatever
//! regmux does on top (HTTP, routing, verification that can withhold the last chunk), it cannot cost
//! less CPU per GiB, or move more MiB/s, than this relay does.
//!
//! Usage: `relay UPSTREAM_ADDR [--sha256]`; prints the port it listens on (127.0.0.1) and serves
//! until killed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use sha2::Digest as _;

const BUFFER: usize = 256 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let upstream = args.next().expect("usage: relay UPSTREAM_ADDR [--sha256]");
    let hash = matches!(args.next().as_deref(), Some("--sha256"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    println!("{}", listener.local_addr().expect("local address").port());
    for client in listener.incoming().flatten() {
        let Ok(server) = TcpStream::connect(&upstream) else { continue };
        let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        thread::spawn(move || pipe(c2, s2, false));
        thread::spawn(move || pipe(server, client, hash));
    }
}

/// Copies `from` to `to` until EOF or an error, then shuts down `to`'s write side.
fn pipe(mut from: TcpStream, mut to: TcpStream, hash: bool) {
    let _ = from.set_nodelay(true);
    let _ = to.set_nodelay(true);
    let mut buf = vec![0u8; BUFFER];
    let mut sha = sha2::Sha256::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if hash {
            sha.update(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    std::hint::black_box(sha.finalize());
    let _ = to.shutdown(Shutdown::Write);
}
