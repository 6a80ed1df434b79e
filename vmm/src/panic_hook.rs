//! The VMM's panic hook: a panic's message and location reach stderr on
//! every thread, seccomp-filtered ones included.
//!
//! std's default hook captures a backtrace under RUST_BACKTRACE=1, which
//! needs syscalls no filter allows (getcwd first), so the SIGSYS handler
//! reported the refused syscall instead of the panic. This hook formats
//! into memory (allowed everywhere) and writes with plain write(2); it
//! never takes a backtrace.

use std::panic::PanicHookInfo;

/// Installs the hook (call before any filter exists; idempotent).
pub fn install() {
    std::panic::set_hook(Box::new(report));
}

/// One line: the thread, where it panicked and why.
fn line(info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let location = info.location().map_or_else(
        || "an unknown location".to_string(),
        |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
    );
    format!("microvm: thread '{name}' panicked at {location}: {message}\n")
}

fn report(info: &PanicHookInfo<'_>) {
    let line = line(info);
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        // SAFETY: write(2) on stderr from a buffer valid for its length;
        // every thread's filter allows it.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(0) => return,
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(_) => return,
        }
    }
}
