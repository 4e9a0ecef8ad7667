//! The game server's process: started from the image's [`GameSpec`] with the SDK's address in
//! its environment, its output copied to the VM's console (which hostd keeps per VM) up to a
//! bound, its last stderr lines kept for the report, and its exit reported.
//!
//! As PID 1 the agent also reaps every orphan the game leaves (`waitpid(-1)`), and tells the
//! game's own exit from theirs by its pid.

use crate::GuestError;
use berth_protocol::guest::GameSpec;
use berth_protocol::sdk::SDK_ENV;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Game output copied to the console at most (bytes, over the VM's life); then one note.
pub const MAX_OUTPUT: u64 = 4 << 20;
/// Stderr lines kept for the exit report.
pub const TAIL_LINES: usize = 20;
/// The longest line kept or copied (longer lines are cut).
const MAX_LINE: usize = 1024;

/// The game's exit: its status and last stderr lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub status: String,
    /// It exited with status 0.
    pub success: bool,
    pub stderr: Vec<String>,
}

/// Starts the game; `exited` is called once, from another thread, when it exits.
pub fn start(
    spec: &GameSpec,
    sdk_addr: &str,
    exited: impl FnOnce(Exit) + Send + 'static,
) -> Result<(), GuestError> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| GuestError::Game("the game spec has an empty command".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(&spec.env)
        .env(SDK_ENV, sdk_addr)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| GuestError::Game(format!("starting {program}: {e}")))?;
    let budget = Arc::new(AtomicU64::new(MAX_OUTPUT));
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let out = child.stdout.take().map(|s| copy(s, "out", &budget, None));
    let err = child
        .stderr
        .take()
        .map(|s| copy(s, "err", &budget, Some(&tail)));
    std::thread::Builder::new()
        .name("game-wait".into())
        .spawn(move || {
            let (status, success) = wait(child);
            // The pipes close when the game (and whatever inherited them) is gone: the tail is
            // then complete.
            for t in [out, err].into_iter().flatten() {
                let _ = t.join();
            }
            let stderr = tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            exited(Exit {
                status,
                success,
                stderr,
            });
        })
        .map(drop)
        .map_err(|e| GuestError::Game(e.to_string()))
}

/// Waits for the game; as PID 1, reaps every other child on the way. Its status, and
/// whether it was a success.
fn wait(mut child: Child) -> (String, bool) {
    if std::process::id() != 1 {
        return match child.wait() {
            Ok(s) => (s.to_string(), s.success()),
            Err(e) => (format!("wait failed: {e}"), false),
        };
    }
    use nix::sys::wait::{waitpid, WaitStatus};
    let game = nix::unistd::Pid::from_raw(child.id() as i32);
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == game => {
                return (format!("exit status: {code}"), code == 0)
            }
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == game => {
                return (format!("killed by {signal}"), false)
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return (format!("wait failed: {e}"), false),
        }
    }
}

/// Copies `stream`'s lines to the console as `game <name>: …` while `budget` lasts, keeping
/// the last [`TAIL_LINES`] in `tail`.
fn copy(
    stream: impl Read + Send + 'static,
    name: &'static str,
    budget: &Arc<AtomicU64>,
    tail: Option<&Arc<Mutex<VecDeque<String>>>>,
) -> std::thread::JoinHandle<()> {
    let budget = budget.clone();
    let tail = tail.cloned();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            raw.truncate(MAX_LINE);
            let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
            echo(&budget, name, &line);
            if let Some(tail) = &tail {
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    })
}

/// Writes one line to the console unless the budget is spent (then says so once).
fn echo(budget: &AtomicU64, name: &str, line: &str) {
    let cost = line.len() as u64 + 16;
    let left = budget.fetch_sub(cost.min(budget.load(Ordering::Relaxed)), Ordering::Relaxed);
    let mut console = std::io::stderr().lock();
    if left >= cost {
        let _ = writeln!(console, "game {name}: {line}");
    } else if left > 0 {
        let _ = writeln!(
            console,
            "game {name}: [output past {MAX_OUTPUT} bytes dropped]"
        );
        budget.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn spec(command: &[&str]) -> GameSpec {
        GameSpec {
            name: "t".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            cwd: "/".into(),
            game_port: 7000,
            health_timeout_ms: 1000,
            sdk: true,
        }
    }

    #[test]
    fn the_exit_is_reported_with_the_last_stderr_lines() {
        let (tx, rx) = mpsc::channel();
        let script = "for i in $(seq 1 30); do echo line $i >&2; done; echo $BERTH_SDK >&2; exit 3";
        start(&spec(&["/bin/sh", "-c", script]), "127.0.0.1:9", move |e| {
            let _ = tx.send(e);
        })
        .expect("start");
        let exit = rx.recv_timeout(Duration::from_secs(10)).expect("exited");
        assert!(exit.status.contains('3'), "{}", exit.status);
        assert_eq!(exit.stderr.len(), TAIL_LINES);
        assert_eq!(exit.stderr.last().map(String::as_str), Some("127.0.0.1:9"));
        assert_eq!(exit.stderr[0], "line 12");
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error_naming_it() {
        let e = start(&spec(&["/nonexistent/game"]), "x", |_| {}).expect_err("refused");
        assert!(e.to_string().contains("/nonexistent/game"), "{e}");
        assert!(start(&spec(&[]), "x", |_| {}).is_err());
    }

    #[test]
    fn the_console_budget_runs_out_once() {
        let budget = AtomicU64::new(40);
        echo(&budget, "out", "0123456789");
        assert_eq!(budget.load(Ordering::Relaxed), 14);
        echo(&budget, "out", "0123456789");
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        echo(&budget, "out", "more");
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }
}
