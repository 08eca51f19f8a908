//! Running a step's process: output appended to the step's log file, the
//! tail kept for the report.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

/// The most output a report carries (its end).
pub const TAIL_BYTES: usize = 4096;

/// A step's outcome: exit code (-1 when killed or not a process) and the
/// tail of its output.
pub struct Outcome {
    pub code: i32,
    pub tail: String,
}

/// A failure that ran no process.
pub fn fail(msg: impl Into<String>) -> Outcome {
    Outcome { code: 1, tail: msg.into() }
}

/// Runs a command, appending its output to `log` and keeping the tail.
pub async fn run(mut cmd: tokio::process::Command, log: &Path) -> Outcome {
    if let Some(d) = log.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {program}: {e}")),
    };
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let file = Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(log).ok()));
    let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        let tail = tail.clone();
        let file = file.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Some(f) = file.lock().expect("lock").as_mut() {
                    let _ = std::io::Write::write_all(f, &buf[..n]);
                }
                let mut t = tail.lock().expect("lock");
                t.extend_from_slice(&buf[..n]);
                if t.len() > 2 * TAIL_BYTES {
                    let cut = t.len() - TAIL_BYTES;
                    t.drain(..cut);
                }
            }
        })
    };
    let a = pump(Box::new(child.stdout.take().expect("piped")));
    let b = pump(Box::new(child.stderr.take().expect("piped")));
    let status = child.wait().await;
    let _ = tokio::join!(a, b);
    let t = tail.lock().expect("lock");
    let start = t.len().saturating_sub(TAIL_BYTES);
    let tail = String::from_utf8_lossy(&t[start..]).into_owned();
    match status {
        Ok(s) => Outcome { code: s.code().unwrap_or(-1), tail },
        Err(e) => fail(format!("{program}: {e}")),
    }
}
