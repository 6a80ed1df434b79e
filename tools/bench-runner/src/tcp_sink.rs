//! `microvm-tcp-sink --port PORT --bytes N`: accepts one TCP connection,
//! reads until N bytes arrived (or the peer closes), closes, and prints one
//! JSON line with the bytes received and the time from the first byte to the
//! last. Measuring at the receiver is what makes a throughput figure honest:
//! a sender finishes when its data is in a socket buffer, not when it has
//! arrived. Knowing N lets the sink close first, which senders without a
//! half-close (busybox nc) need in order to finish.

use std::io::Read;
use std::net::TcpListener;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let numbers: Vec<(String, Option<u64>)> = (0..2)
        .map(|_| {
            (
                args.next().unwrap_or_default(),
                args.next().and_then(|v| v.parse().ok()),
            )
        })
        .collect();
    let (port, expected) = match numbers.as_slice() {
        [(p, Some(port)), (b, Some(bytes))]
            if p == "--port" && b == "--bytes" && *port <= 65535 =>
        {
            (*port as u16, *bytes)
        }
        _ => {
            eprintln!("usage: microvm-tcp-sink --port PORT --bytes N");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("microvm-tcp-sink: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    // Tells a script it may let the sender go.
    eprintln!("microvm-tcp-sink: listening on port {port}");
    let (mut stream, _) = match listener.accept() {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("microvm-tcp-sink: accept failed: {e}");
            std::process::exit(1);
        }
    };
    let mut buffer = vec![0u8; 256 * 1024];
    let mut bytes: u64 = 0;
    let mut first_byte = None;
    while bytes < expected {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(Instant::now);
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("microvm-tcp-sink: read failed after {bytes} bytes: {e}");
                std::process::exit(1);
            }
        }
    }
    let seconds = first_byte.map_or(0.0, |t| t.elapsed().as_secs_f64());
    drop(stream);
    println!("{{\"bytes\":{bytes},\"seconds\":{seconds:.6}}}");
}
