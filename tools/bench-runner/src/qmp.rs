//! `microvm-qmp --socket PATH [--timeout SECS] STEP...`: a small QMP client for
//! driving a QEMU peer in the test host (which has no Python or socat).
//!
//! Connects, reads the greeting, negotiates capabilities, then runs each STEP
//! in order and prints one JSON line per step:
//!   `{"step":N,"ms":T,"reply":{...}}` for a command (a QMP JSON object): the
//!   time from sending it to its `return` or `error` reply;
//!   `{"step":N,"ms":T,"event":{...}}` for `event:NAME`: waits for that event
//!   (or `"timeout":true` after --timeout seconds, then the remaining steps are
//!   still run).
//! Exits 1 if the socket fails; a command's QMP error is data, not a failure.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Args {
    socket: String,
    timeout: Duration,
    steps: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut timeout = Duration::from_secs(30);
    let mut steps = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => socket = Some(args.next().ok_or("--socket takes a path")?),
            "--timeout" => {
                let secs: u64 = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0 && n <= 3600)
                    .ok_or("--timeout takes 1 to 3600 seconds")?;
                timeout = Duration::from_secs(secs);
            }
            _ => steps.push(arg),
        }
    }
    let socket = socket.ok_or("usage: microvm-qmp --socket PATH [--timeout SECS] STEP...")?;
    Ok(Args {
        socket,
        timeout,
        steps,
    })
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &str, timeout: Duration) -> Result<Qmp, String> {
        let stream =
            UnixStream::connect(path).map_err(|e| format!("cannot connect to {path}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let writer = stream
            .try_clone()
            .map_err(|e| format!("cannot clone the socket: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        let reply = qmp.command(&json!({"execute": "qmp_capabilities"}))?;
        if reply.get("return").is_none() {
            return Err(format!("qmp_capabilities refused: {reply}"));
        }
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        self.try_read_message()?
            .ok_or_else(|| "QMP did not answer in time".to_string())
    }

    /// The next message, or `None` when the read timeout passed first.
    fn try_read_message(&mut self) -> Result<Option<Value>, String> {
        let mut line = String::new();
        let n = match self.reader.read_line(&mut line) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(format!("read from QMP: {e}")),
        };
        if n == 0 {
            return Err("QMP closed the connection".into());
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| format!("QMP sent no JSON ({e}): {line}"))
    }

    /// Sends `cmd` and returns its reply; events read meanwhile are kept.
    fn command(&mut self, cmd: &Value) -> Result<Value, String> {
        let mut text = cmd.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("write to QMP: {e}"))?;
        loop {
            let msg = self.read_message()?;
            if msg.get("return").is_some() || msg.get("error").is_some() {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// Waits for event `name` until `deadline`; `None` on timeout.
    fn event(&mut self, name: &str, deadline: Instant) -> Result<Option<Value>, String> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(Some(self.events.remove(i)));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| format!("set_read_timeout: {e}"))?;
            match self.try_read_message()? {
                Some(msg) if msg["event"] == name => return Ok(Some(msg)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let mut qmp = Qmp::connect(&args.socket, args.timeout)?;
    for (n, step) in args.steps.iter().enumerate() {
        let start = Instant::now();
        let line = if let Some(name) = step.strip_prefix("event:") {
            let got = qmp.event(name, start + args.timeout)?;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            match got {
                Some(ev) => json!({"step": n, "ms": ms, "event": ev}),
                None => json!({"step": n, "ms": ms, "event": name, "timeout": true}),
            }
        } else {
            let cmd: Value =
                serde_json::from_str(step).map_err(|e| format!("step {n} is not JSON: {e}"))?;
            qmp.reader
                .get_ref()
                .set_read_timeout(Some(args.timeout))
                .map_err(|e| format!("set_read_timeout: {e}"))?;
            let reply = qmp.command(&cmd)?;
            json!({"step": n, "ms": start.elapsed().as_secs_f64() * 1000.0, "reply": reply})
        };
        println!("{line}");
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("microvm-qmp: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("microvm-qmp: {e}");
        std::process::exit(1);
    }
}
