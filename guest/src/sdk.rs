//! The game-server SDK's HTTP side: HTTP/1.1 with JSON bodies on loopback
//! ([`berth_protocol::sdk::SDK_ADDR`]), one thread, started at boot. Each call is decided by
//! [`Life`]; a `GET /v1/activation` before activation is parked (no thread waits on it) and
//! answered by [`Sdk::wake`] when hostd's identity arrives — in a docked substrate's clones,
//! after their restore. `docs/sdk.md` is the contract.

use crate::life::{Life, Refusal, Report, Sink};
use crate::GuestError;
use berth_protocol::sdk::{
    code, path, status_of, Done, Ended, Initialised, PlayerEvent, Prewarm, VerifyRequest, MAX_BODY,
    SDK_VERSION,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response, Server};

/// The SDK server: its socket, the parked activation calls, where reports go.
pub struct Sdk {
    server: Server,
    life: Arc<Life>,
    reports: Sink,
    parked: Mutex<Vec<Request>>,
    warmups: Warmups,
}

/// The optional warm-up hook: parked `GET /v1/prewarm` calls, whether the game ever made one,
/// and a count of its `POST /v1/prewarmed`.
#[derive(Default)]
struct Warmups {
    parked: Mutex<Vec<Request>>,
    used: AtomicBool,
    done: Mutex<u64>,
    changed: Condvar,
}

impl Sdk {
    /// Binds `addr` (loopback).
    pub fn bind(addr: &str, life: Arc<Life>, reports: Sink) -> Result<Arc<Self>, GuestError> {
        let server = Server::http(addr).map_err(|e| GuestError::Sdk(e.to_string()))?;
        Ok(Arc::new(Sdk {
            server,
            life,
            reports,
            parked: Mutex::new(Vec::new()),
            warmups: Warmups::default(),
        }))
    }

    /// The address it listens on.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.server.server_addr().to_ip()
    }

    /// Serves calls until the VM is destroyed (on its own thread).
    pub fn spawn(self: &Arc<Self>) -> Result<(), GuestError> {
        let sdk = self.clone();
        std::thread::Builder::new()
            .name("sdk".into())
            .spawn(move || {
                for request in sdk.server.incoming_requests() {
                    sdk.handle(request);
                }
            })
            .map(drop)
            .map_err(|e| GuestError::Sdk(e.to_string()))
    }

    /// Answers every parked `GET /v1/activation` (after hostd's identity was taken).
    pub fn wake(&self) {
        let Some(activation) = self.life.activation() else {
            return;
        };
        let parked = std::mem::take(&mut *lock(&self.parked));
        for request in parked {
            respond(request, 200, &activation);
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
        // A game re-parks its next call right after its last warm-up; in a clone that call
        // may reach us only after the restore.
        let parked = loop {
            let parked = std::mem::take(&mut *lock(&w.parked));
            if !parked.is_empty() || Instant::now() >= deadline {
                break parked;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if parked.is_empty() {
            return;
        }
        let ask = Prewarm {
            v: SDK_VERSION,
            wall_clock_ms,
        };
        for request in parked {
            respond(request, 200, &ask);
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

    fn report(&self, report: Option<Report>) {
        if let Some(r) = report {
            (self.reports)(r);
        }
    }

    fn handle(&self, mut request: Request) {
        let method = request.method().clone();
        let url = request
            .url()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned();
        if method == Method::Get && url == path::ACTIVATION {
            return self.activation(request);
        }
        if method == Method::Get && url == path::PREWARM {
            return lock(&self.warmups.parked).push(request);
        }
        let answer = match (&method, url.as_str()) {
            (Method::Get, path::SESSION) => Ok(to_value(&self.life.session())),
            (Method::Post, path::INITIALISED) => body_or_default::<Initialised>(&mut request)
                .and_then(|b| {
                    let report = self.life.initialised()?;
                    if b.warm_up {
                        self.warmups.used.store(true, Ordering::Relaxed);
                    }
                    Ok(report)
                })
                .map(|r| {
                    self.report(r);
                    done()
                }),
            (Method::Post, path::READY) => self.life.ready().map(|r| {
                self.report(r);
                done()
            }),
            (Method::Post, path::HEALTH) => self.life.health().map(|()| done()),
            (Method::Post, path::PREWARMED) => {
                *lock(&self.warmups.done) += 1;
                self.warmups.changed.notify_all();
                Ok(done())
            }
            (Method::Post, path::VERIFY) => body::<VerifyRequest>(&mut request)
                .and_then(|b| self.life.verify(&b.ticket))
                .map(|v| to_value(&v)),
            (Method::Post, path::JOINED | path::LEFT) => body::<PlayerEvent>(&mut request)
                .and_then(|b| self.life.player(b.player, url == path::JOINED))
                .map(|()| done()),
            (Method::Post, path::ENDED) => body::<Ended>(&mut request)
                .and_then(|b| self.life.ended(&b.reason, b.results))
                .map(|r| {
                    self.report(Some(r));
                    done()
                }),
            (_, p) if KNOWN.contains(&p) => Err(Refusal {
                code: code::METHOD_NOT_ALLOWED,
                message: format!("{method} is not allowed on {p}"),
            }),
            (_, p) => Err(Refusal {
                code: code::NOT_FOUND,
                message: format!("no SDK call at {p} (this agent speaks /v1)"),
            }),
        };
        match answer {
            Ok(value) => respond(request, 200, &value),
            Err(refusal) => refuse(request, &refusal),
        }
    }

    /// `GET /v1/activation`: at once when activated, else parked until [`Sdk::wake`].
    fn activation(&self, request: Request) {
        let mut parked = lock(&self.parked);
        // Checked under the parking lock: an activation between the check and the parking
        // would otherwise never wake this call.
        match self.life.activation() {
            Some(a) => {
                drop(parked);
                respond(request, 200, &a)
            }
            None => parked.push(request),
        }
    }
}

const KNOWN: [&str; 11] = [
    path::PREWARM,
    path::PREWARMED,
    path::INITIALISED,
    path::ACTIVATION,
    path::READY,
    path::VERIFY,
    path::JOINED,
    path::LEFT,
    path::HEALTH,
    path::ENDED,
    path::SESSION,
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn done() -> serde_json::Value {
    to_value(&Done::default())
}

fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// [`body`], or `T::default()` for an empty body.
fn body_or_default<T: DeserializeOwned + Default>(request: &mut Request) -> Result<T, Refusal> {
    if request.body_length() == Some(0) {
        return Ok(T::default());
    }
    body(request)
}

/// The request's JSON body as `T`, at most [`MAX_BODY`] bytes.
fn body<T: DeserializeOwned>(request: &mut Request) -> Result<T, Refusal> {
    if request.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Refusal {
            code: code::BAD_BODY,
            message: format!("reading the body: {e}"),
        })?;
    if bytes.len() > MAX_BODY {
        return Err(too_large());
    }
    serde_json::from_slice(&bytes).map_err(|e| Refusal {
        code: code::BAD_BODY,
        message: format!("the body is not this call's JSON: {e}"),
    })
}

fn too_large() -> Refusal {
    Refusal {
        code: code::TOO_LARGE,
        message: format!("bodies are limited to {MAX_BODY} bytes"),
    }
}

fn respond<T: Serialize>(request: Request, status: u16, value: &T) {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let header = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("a static header is valid");
    let _ = request.respond(
        Response::from_data(json)
            .with_status_code(status)
            .with_header(header),
    );
}

fn refuse(request: Request, refusal: &Refusal) {
    let body = berth_protocol::sdk::SdkError {
        code: refusal.code.to_owned(),
        message: refusal.message.clone(),
    };
    respond(request, status_of(refusal.code), &body);
}
