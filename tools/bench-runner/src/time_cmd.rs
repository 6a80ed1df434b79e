//! `microvm-time --out FILE -- CMD [ARGS...]`: runs CMD with its output passed
//! through and writes `{"wall_ms":T,"status":S}` to FILE: the one meter the
//! comparison uses to time a step of every VMM (a control-API call of this
//! project, a QMP exchange of QEMU), client start-up included for both.

use std::process::Command;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let (out, command): (String, Vec<String>) = match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(out), Some(dashes)) if flag == "--out" && dashes == "--" => {
            (out, args.collect())
        }
        _ => (String::new(), Vec::new()),
    };
    let Some((program, rest)) = command.split_first() else {
        eprintln!("usage: microvm-time --out FILE -- CMD [ARGS...]");
        std::process::exit(2);
    };
    let start = Instant::now();
    let status = match Command::new(program).args(rest).status() {
        Ok(status) => status.code(),
        Err(e) => {
            eprintln!("microvm-time: cannot start {program}: {e}");
            None
        }
    };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let code = status.map_or("null".to_string(), |c| c.to_string());
    if let Err(e) = std::fs::write(&out, format!("{{\"wall_ms\":{ms:.1},\"status\":{code}}}\n")) {
        eprintln!("microvm-time: cannot write {out}: {e}");
        std::process::exit(1);
    }
    std::process::exit(status.unwrap_or(127));
}
