//! The cheapest proxy that can stand between a client and a registry: a TCP relay with blocking
//! sockets, one thread per direction and a 256 KiB buffer, optionally hashing every byte it passes
//! from the registry to the client with the same SHA-256 implementation regmux uses. With `--splice`
//! it moves the registry's bytes with splice(2) through a pipe instead, never into user space: the
//! zero-copy bound, which no proxy that looks at the bytes (to verify them) can use.
//!
//! `bench/run.sh` measures it beside regmux to show what bounds a proxy on this machine: whatever
//! regmux does on top (HTTP, routing, verification that can withhold the last chunk), it cannot cost
//! less CPU per GiB, or move more MiB/s, than this relay does.
//!
//! Usage: `relay UPSTREAM_ADDR [--sha256 | --splice]`; prints the port it listens on (127.0.0.1) and serves
//! until killed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use sha2::Digest as _;

const BUFFER: usize = 256 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let upstream = args.next().expect("usage: relay UPSTREAM_ADDR [--sha256 | --splice]");
    let mode = args.next();
    let (hash, zero_copy) = (mode.as_deref() == Some("--sha256"), mode.as_deref() == Some("--splice"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    println!("{}", listener.local_addr().expect("local address").port());
    for client in listener.incoming().flatten() {
        let Ok(server) = TcpStream::connect(&upstream) else { continue };
        let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
        thread::spawn(move || pipe(c2, s2, false));
        if zero_copy {
            thread::spawn(move || splice_pipe(server, client));
        } else {
            thread::spawn(move || pipe(server, client, hash));
        }
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

/// Like [`pipe`] without hashing, but the bytes go socket → pipe → socket inside the kernel.
fn splice_pipe(from: TcpStream, to: TcpStream) {
    use std::os::fd::AsRawFd;
    let _ = to.set_nodelay(true);
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: `wr` is the pipe just created; a larger pipe means fewer splice calls.
    unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, BUFFER as libc::c_int) };
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE;
    'copy: loop {
        // SAFETY: all four descriptors stay open for the whole loop; null offsets are for sockets/pipes.
        let n =
            unsafe { libc::splice(from.as_raw_fd(), std::ptr::null_mut(), wr, std::ptr::null_mut(), BUFFER, flags) };
        if n <= 0 {
            break;
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m =
                unsafe { libc::splice(rd, std::ptr::null_mut(), to.as_raw_fd(), std::ptr::null_mut(), left, flags) };
            if m <= 0 {
                break 'copy;
            }
            left -= m as usize;
        }
    }
    // SAFETY: closing the two pipe descriptors this function created, once.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    let _ = to.shutdown(Shutdown::Write);
}
