//! The game-server SDK's HTTP side: HTTP/1.1 with JSON bodies on loopback
//! ([`berth_protocol::sdk::SDK_ADDR`]), on [`berth_protocol::http1`]. One thread accepts, one
//! thread serves each connection (a game keeps a few open: they exist before docking, so an
//! activation starts no thread). Each call is decided by [`Life`]; a `GET /v1/activation`
//! before activation waits on its connection's thread until [`Sdk::wake`] — in a docked
//! substrate's clones, after their restore. `docs/sdk.md` is the contract.

use crate::life::{Life, Refusal, Report, Sink};
use crate::GuestError;
use berth_protocol::http1::{self, Head, HttpError};
use berth_protocol::sdk::{
    code, path, status_of, Done, Ended, Initialised, PlayerEvent, Prewarm, VerifyRequest, MAX_BODY,
    SDK_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An answer: status and JSON body.
type Answer = (u16, serde_json::Value);

/// The SDK server: its socket, the waiting calls, where reports go.
pub struct Sdk {
    listener: Mutex<Option<TcpListener>>,
    addr: Option<SocketAddr>,
    life: Arc<Life>,
    reports: Sink,
    /// `GET /v1/activation` calls waiting for the activation: their connections, answered
    /// by the thread that activates (no hop through theirs).
    parked: Mutex<Vec<Waiting>>,
    warmups: Warmups,
}

/// The optional warm-up hook: waiting `GET /v1/prewarm` calls, whether the game said it
/// serves the hook, and a count of its `POST /v1/prewarmed`.
#[derive(Default)]
struct Warmups {
    parked: Mutex<Vec<Sender<Answer>>>,
    used: AtomicBool,
    done: Mutex<u64>,
    changed: Condvar,
}

/// A call waiting on its connection: where to write the answer, whether to close after it,
/// and who to tell that it was written.
struct Waiting {
    writer: TcpStream,
    close: bool,
    written: Sender<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sdk {
    /// Binds `addr` (loopback).
    pub fn bind(addr: &str, life: Arc<Life>, reports: Sink) -> Result<Arc<Self>, GuestError> {
        let listener =
            TcpListener::bind(addr).map_err(|e| GuestError::Sdk(format!("binding {addr}: {e}")))?;
        Ok(Arc::new(Sdk {
            addr: listener.local_addr().ok(),
            listener: Mutex::new(Some(listener)),
            life,
            reports,
            parked: Mutex::new(Vec::new()),
            warmups: Warmups::default(),
        }))
    }

    /// The address it listens on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Serves calls until the VM is destroyed (on its own threads).
    pub fn spawn(self: &Arc<Self>) -> Result<(), GuestError> {
        let listener = lock(&self.listener)
            .take()
            .ok_or_else(|| GuestError::Sdk("already serving".into()))?;
        let sdk = self.clone();
        std::thread::Builder::new()
            .name("sdk".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let sdk = sdk.clone();
                    let _ = stream.set_nodelay(true);
                    std::thread::spawn(move || sdk.connection(stream));
                }
            })
            .map(drop)
            .map_err(|e| GuestError::Sdk(e.to_string()))
    }

    /// Answers every waiting `GET /v1/activation` (after hostd's identity was taken).
    pub fn wake(&self) {
        let Some(activation) = self.life.activation() else {
            return;
        };
        let json = serde_json::to_vec(&activation).unwrap_or_default();
        for mut w in std::mem::take(&mut *lock(&self.parked)) {
            let _ = http1::write_response(&mut w.writer, 200, &json, w.close);
            let _ = w.written.send(());
        }
    }

    /// Asks a game that uses the warm-up hook (it said so in `initialised`) to run it, and
    /// waits (at most `timeout`) until it says `prewarmed`. Returns at once for other games.
    pub fn prewarm_game(&self, wall_clock_ms: u64, timeout: Duration) {
        let w = &self.warmups;
        if !w.used.load(Ordering::Relaxed) {
            return;
        }
        let deadline = Instant::now() + timeout;
        let before = *lock(&w.done);
        // A game waits again right after its last warm-up; in a clone that call may reach us
        // only after the restore.
        let waiting = loop {
            let waiting = std::mem::take(&mut *lock(&w.parked));
            if !waiting.is_empty() || Instant::now() >= deadline {
                break waiting;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if waiting.is_empty() {
            return;
        }
        let ask = to_value(&Prewarm {
            v: SDK_VERSION,
            wall_clock_ms,
        });
        for w in waiting {
            let _ = w.send((200, ask.clone()));
        }
        let mut done = lock(&w.done);
        while *done == before {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            done = w
                .changed
                .wait_timeout(done, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// One connection: requests one after another until it closes or breaks the rules.
    fn connection(&self, stream: TcpStream) {
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut writer = stream;
        loop {
            let head = match http1::read_head(&mut reader, true) {
                Ok(head) => head,
                Err(e) => return self.broken(&mut writer, e),
            };
            if head.expect_continue && http1::write_continue(&mut writer).is_err() {
                return;
            }
            let body = match http1::read_body(&mut reader, &head, MAX_BODY) {
                Ok(body) => body,
                Err(e) => return self.broken(&mut writer, e),
            };
            let written = if head.method() == "GET" && head.path() == path::ACTIVATION {
                self.activation(&writer, head.close)
            } else {
                let (status, value) = self.call(&head, &body);
                let json = serde_json::to_vec(&value).unwrap_or_default();
                http1::write_response(&mut writer, status, &json, head.close).is_ok()
            };
            if !written || head.close {
                return;
            }
        }
    }

    /// Answers a request that cannot be read (when there is one) and closes.
    fn broken(&self, writer: &mut TcpStream, e: HttpError) {
        let refusal = match e {
            HttpError::Closed | HttpError::Io(_) => return,
            HttpError::HeadTooLarge => (431, code::TOO_LARGE, e.to_string()),
            HttpError::BodyTooLarge { .. } => (413, code::TOO_LARGE, e.to_string()),
            HttpError::Malformed(m) => (400, code::BAD_REQUEST, m),
        };
        let body = to_value(&berth_protocol::sdk::SdkError {
            code: refusal.1.into(),
            message: refusal.2,
        });
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let _ = http1::write_response(writer, refusal.0, &json, true);
    }

    fn report(&self, report: Option<Report>) {
        if let Some(r) = report {
            (self.reports)(r);
        }
    }

    /// One call: its answer (waiting, for `activation` and `prewarm`).
    fn call(&self, head: &Head, body: &[u8]) -> Answer {
        let path = head.path();
        let answer = match (head.method(), path) {
            ("GET", path::PREWARM) => return self.wait_prewarm(),
            ("GET", path::SESSION) => Ok(to_value(&self.life.session())),
            ("POST", path::INITIALISED) => self.initialised(body),
            ("POST", path::READY) => self.life.ready().map(|r| {
                self.report(r);
                done()
            }),
            ("POST", path::HEALTH) => self.life.health().map(|()| done()),
            ("POST", path::PREWARMED) => {
                *lock(&self.warmups.done) += 1;
                self.warmups.changed.notify_all();
                Ok(done())
            }
            ("POST", path::VERIFY) => parse::<VerifyRequest>(body)
                .and_then(|b| self.life.verify(&b.ticket))
                .map(|v| to_value(&v)),
            ("POST", path::JOINED | path::LEFT) => parse::<PlayerEvent>(body)
                .and_then(|b| self.life.player(b.player, path == path::JOINED))
                .map(|()| done()),
            ("POST", path::ENDED) => parse::<Ended>(body)
                .and_then(|b| self.life.ended(&b.reason, b.results))
                .map(|r| {
                    self.report(Some(r));
                    done()
                }),
            (method, p) if KNOWN.contains(&p) => Err(Refusal {
                code: code::METHOD_NOT_ALLOWED,
                message: format!("{method} is not allowed on {p}"),
            }),
            (_, p) => Err(Refusal {
                code: code::NOT_FOUND,
                message: format!("no SDK call at {p} (this agent speaks /v1)"),
            }),
        };
        match answer {
            Ok(value) => (200, value),
            Err(refusal) => refused(&refusal),
        }
    }

    fn initialised(&self, body: &[u8]) -> Result<serde_json::Value, Refusal> {
        let ask: Initialised = if body.is_empty() {
            Initialised::default()
        } else {
            parse(body)?
        };
        let report = self.life.initialised()?;
        if ask.warm_up {
            self.warmups.used.store(true, Ordering::Relaxed);
        }
        self.report(report);
        Ok(done())
    }

    /// `GET /v1/activation`: answered at once when activated, else by [`Sdk::wake`]; false
    /// when the answer could not be written.
    fn activation(&self, writer: &TcpStream, close: bool) -> bool {
        let (written, done) = mpsc::channel();
        {
            let mut parked = lock(&self.parked);
            // Checked under the parking lock: an activation between the check and the
            // parking would otherwise never wake this call.
            if let Some(a) = self.life.activation() {
                drop(parked);
                let json = serde_json::to_vec(&a).unwrap_or_default();
                let mut w = writer;
                return http1::write_response(&mut w, 200, &json, close).is_ok();
            }
            let Ok(writer) = writer.try_clone() else {
                return false;
            };
            parked.push(Waiting {
                writer,
                close,
                written,
            });
        }
        done.recv().is_ok()
    }

    /// `GET /v1/prewarm`: after [`Sdk::prewarm_game`] asks.
    fn wait_prewarm(&self) -> Answer {
        let (tx, rx) = mpsc::channel();
        lock(&self.warmups.parked).push(tx);
        rx.recv().unwrap_or_else(|_| shutting_down())
    }
}

const KNOWN: [&str; 11] = [
    path::INITIALISED,
    path::ACTIVATION,
    path::READY,
    path::VERIFY,
    path::JOINED,
    path::LEFT,
    path::HEALTH,
    path::ENDED,
    path::SESSION,
    path::PREWARM,
    path::PREWARMED,
];

fn done() -> serde_json::Value {
    to_value(&Done::default())
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn refused(refusal: &Refusal) -> Answer {
    let body = berth_protocol::sdk::SdkError {
        code: refusal.code.to_owned(),
        message: refusal.message.clone(),
    };
    (status_of(refusal.code), to_value(&body))
}

fn shutting_down() -> Answer {
    refused(&Refusal {
        code: code::SHUTTING_DOWN,
        message: "the agent is stopping".into(),
    })
}

/// A request body as the call's JSON.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal {
        code: code::BAD_BODY,
        message: format!("the body is not this call's JSON: {e}"),
    })
}
