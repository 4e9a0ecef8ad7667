//! The game server: start-up work at boot, one TCP answer per player connection after activation.
//!
//! This is the small real server the substrate work needs; the full arena game replaces the
//! per-connection loop in a later issue. Its start-up — reading and indexing the maps on the
//! VM's disk — is exactly the work a substrate saves.

use crate::GuestError;
use berth_protocol::game::{GameAnswer, GameRequest};
use berth_protocol::guest::{decode_line, encode_line, Identity};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the game loaded at start-up.
#[derive(Debug)]
pub struct World {
    /// Walkable tiles over all maps.
    pub tiles: u64,
    /// A digest of the indexed maps (keeps the start-up work from being optimised away).
    pub digest: u64,
}

impl World {
    /// Loads `maps/*.map` under `data_dir` and indexes them, spending at least `work` doing so.
    pub fn load(data_dir: &Path, work: Duration) -> Result<Self, GuestError> {
        let started = Instant::now();
        let maps = data_dir.join("maps");
        let err = |source| GuestError::Data {
            path: maps.clone(),
            source,
        };
        let mut entries: Vec<_> = std::fs::read_dir(&maps)
            .map_err(err)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "map"))
            .collect();
        entries.sort();
        let mut tiles = 0u64;
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        for path in &entries {
            let text = std::fs::read(path).map_err(err)?;
            for b in &text {
                if *b == b'.' {
                    tiles += 1;
                }
                digest = (digest ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        // Real servers build navigation meshes and warm caches here; we hash until the
        // configured start-up time has passed, so the saving a substrate brings is visible.
        while started.elapsed() < work {
            for _ in 0..10_000 {
                digest = digest.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tiles;
            }
        }
        Ok(Self { tiles, digest })
    }
}

/// xorshift64*: small, seeded from the identity.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x2545_f491_4f6c_dd1d | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A game over, sent from a connection thread to the agent.
#[derive(Debug)]
pub struct GameOver {
    pub reason: String,
    pub results: serde_json::Value,
}

/// The session a game server serves: set once, at activation.
#[derive(Debug)]
pub struct Session {
    pub identity: Identity,
    rng: Mutex<Rng>,
}

impl Session {
    pub fn new(identity: Identity) -> Self {
        let rng = Mutex::new(Rng::new(identity.rng_seed));
        Self { identity, rng }
    }
}

/// Serves players on `listener`, forever. Started at boot, so that the thread already exists
/// in the substrate; until `session` is set, a connection gets a `not_activated` error.
/// The hello is written from the accepting thread (no thread start before the first answer).
pub fn serve(
    listener: TcpListener,
    session: Arc<OnceLock<Session>>,
    map_tiles: u64,
    over: mpsc::Sender<GameOver>,
) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let Some(current) = session.get() else {
            let _ = stream.write_all(&encode_line(&GameAnswer::Error {
                code: "not_activated".into(),
                message: "this game server has no session yet".into(),
            }));
            continue;
        };
        let draw = current
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_u64();
        let identity = &current.identity;
        let hello = GameAnswer::Hello {
            session_id: identity.session_id.clone(),
            vm_id: identity.vm_id.clone(),
            hostname: identity.hostname.clone(),
            players: identity.players.clone(),
            clock_ms: now_ms(),
            rng_draw: draw,
            map_tiles,
        };
        if stream.write_all(&encode_line(&hello)).is_err() {
            continue;
        }
        let over = over.clone();
        std::thread::spawn(move || {
            let _ = connection(stream, &over);
        });
    }
}

fn connection(stream: TcpStream, over: &mpsc::Sender<GameOver>) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(1 << 20);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let (answer, game_over) = match decode_line::<GameRequest>(&line) {
            Ok(GameRequest::Ping { nonce }) => (
                GameAnswer::Pong {
                    nonce,
                    clock_ms: now_ms(),
                },
                None,
            ),
            Ok(_) => (
                GameAnswer::Error {
                    code: "not_yet".into(),
                    message: "the arena game is being built".into(),
                },
                None::<serde_json::Value>,
            ),
            Err(e) => (
                GameAnswer::Error {
                    code: e.code().into(),
                    message: e.to_string(),
                },
                None,
            ),
        };
        // Players hear the answer before hostd hears of the game's end (and ends the VM).
        writer.write_all(&encode_line(&answer))?;
        if let Some(results) = game_over {
            let _ = over.send(GameOver {
                reason: "game_over".into(),
                results,
            });
        }
    }
}
