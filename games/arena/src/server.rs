//! The arena's server: start-up work at boot, then the arena for one session after activation.
//!
//! Threads, all but the per-connection ones started at boot (so the substrate holds them and
//! activating a clone starts none):
//! - the acceptor: answers every TCP connection with `hello` (or `not_activated`), then starts a
//!   reader and a writer thread for it;
//! - the game loop: blocked until activation, then it owns the [`Arena`] — it admits joins,
//!   applies inputs, steps the simulation at the mode's tick and sends every connection its
//!   snapshot, and at the end sends `ended`, closes every connection and tells the agent.
//!
//! Start-up — reading and indexing the maps on the VM's disk — is exactly the work a substrate
//! saves.

use crate::rules::{Arena, Input, Map, Rng};
use berth_protocol::game::{code, GameAnswer, GameParams, GameRequest, Welcome};
use berth_protocol::guest::{decode_line, encode_line, Line, LineBuffer, MAX_LINE};
use berth_protocol::ticket::{self, TicketClaims};
use berth_protocol::PlayerId;
use berth_sdk::Activation;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the game loaded at start-up.
#[derive(Debug)]
pub struct World {
    /// Walkable tiles over all maps.
    pub tiles: u64,
    /// A digest of the indexed maps (keeps the start-up work from being optimised away).
    pub digest: u64,
    pub maps: Vec<Map>,
}

impl World {
    /// Loads `maps/*.map` under `data_dir` and indexes them, spending at least `work` doing so.
    pub fn load(data_dir: &Path, work: Duration) -> Result<Self, std::io::Error> {
        let started = Instant::now();
        let dir = data_dir.join("maps");
        let err = |source: std::io::Error| {
            std::io::Error::new(source.kind(), format!("{}: {source}", dir.display()))
        };
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(err)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "map"))
            .collect();
        entries.sort();
        let mut maps = Vec::new();
        let mut digest = 0xcbf2_9ce4_8422_2325u64;
        for path in &entries {
            let text = std::fs::read_to_string(path).map_err(err)?;
            for b in text.bytes() {
                digest = (digest ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Some(map) = Map::parse(&name, &text) {
                maps.push(map);
            }
        }
        if maps.is_empty() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no usable .map file",
            )));
        }
        let tiles = maps.iter().map(Map::floor_tiles).sum();
        // Real servers build navigation meshes and warm caches here; we hash until the
        // configured start-up time has passed, so the saving a substrate brings is visible.
        while started.elapsed() < work {
            for _ in 0..10_000 {
                digest = digest.rotate_left(7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tiles;
            }
        }
        Ok(Self {
            tiles,
            digest,
            maps,
        })
    }

    /// The map `params` names, else one drawn with `seed`.
    fn pick_map(&self, name: &str, seed: u64) -> Map {
        self.maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or(&self.maps[(seed % self.maps.len() as u64) as usize])
            .clone()
    }
}

pub use berth_protocol::now_ms;

/// A game over, sent from the game loop to the agent.
#[derive(Debug)]
pub struct GameOver {
    pub reason: String,
    pub results: serde_json::Value,
}

/// An activation as the SDK sends it, parsed once per warm-up.
pub const SAMPLE_ACTIVATION: &str = r#"{"v":1,"session_id":"warm","vm_id":"warm","hostname":"warm","players":["a","b"],"teams":[["a"],["b"]],"params":{"score_limit":3},"rng_seed":1,"deadline_ms":0,"wall_clock_ms":0}"#;

/// Who a valid ticket belongs to (the SDK's `verify`, or a local check in the warm-up).
#[derive(Debug, Clone)]
pub struct Claims {
    pub player: PlayerId,
    /// The ticket's id: the same ticket twice is a replay or a reconnect.
    pub ticket_id: String,
}

/// Checks a ticket: its claims, or a refusal's code and message.
pub type Verifier = Box<dyn Fn(&str) -> Result<Claims, (String, String)> + Send + Sync>;

/// The session a game server serves: set once, at activation.
pub struct Session {
    pub identity: Activation,
    verify: Verifier,
    rng: Mutex<Rng>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(identity: Activation, verify: Verifier) -> Self {
        let rng = Mutex::new(Rng::new(identity.rng_seed));
        Self {
            identity,
            verify,
            rng,
        }
    }

    /// Checks a ticket for this session (the SDK checks signature, expiry, session, player).
    pub fn check(&self, token: &str) -> Result<Claims, (String, String)> {
        (self.verify)(token)
    }
}

/// A verifier checking tickets locally with `key` (the warm-up's throwaway session).
fn local_verifier(key: Vec<u8>, session: Activation) -> Verifier {
    Box::new(move |token| {
        let claims = ticket::verify(token, &key, &session.session_id, now_ms() / 1000)
            .map_err(|e| (e.code().to_owned(), e.to_string()))?;
        if !session.players.contains(&claims.sub) {
            return Err((code::NOT_A_PLAYER.into(), "not a player".into()));
        }
        Ok(Claims {
            player: claims.sub,
            ticket_id: claims.jti,
        })
    })
}

type ConnId = u64;

/// What a connection's writer thread is given.
enum Out {
    Line(Vec<u8>),
    /// Write what came before, then close the socket.
    Close,
}

/// The sending half of a connection: bounded, so a client that stops reading costs snapshots
/// (dropped when full: the next one supersedes them), never the game loop's time.
#[derive(Clone)]
pub struct Outbox {
    tx: SyncSender<Out>,
    stream: Arc<TcpStream>,
}

impl Outbox {
    fn send(&self, answer: &GameAnswer) {
        let _ = self.tx.try_send(Out::Line(encode_line(answer)));
    }
    fn error(&self, code: &str, message: impl Into<String>) {
        self.send(&GameAnswer::Error {
            code: code.into(),
            message: message.into(),
        });
    }
    fn close(&self) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Out::Close) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Each connection's latest input (`seq`, controls), read by the game loop at every tick.
/// Inputs come at the client's rate (20 Hz per player): a mailbox instead of a message saves
/// waking the game loop for each (a thread switch costs much under TCG), and only the latest
/// input matters anyway.
pub type Inputs = Arc<Mutex<HashMap<ConnId, (u32, Input)>>>;

/// What connections and the agent tell the game loop.
pub enum Command {
    /// Activation: build the arena and start ticking.
    Start(Arc<Session>),
    Join {
        conn: ConnId,
        claims: Claims,
        out: Outbox,
    },
    Surrender {
        conn: ConnId,
    },
    Leave {
        conn: ConnId,
    },
    Closed {
        conn: ConnId,
    },
}

/// Serves players on `listener`, forever. Started at boot, so that the thread already exists
/// in the substrate; until `session` is set, a connection gets a `not_activated` error.
/// The hello is written from the accepting thread (no thread start before the first answer).
pub fn serve(
    listener: TcpListener,
    session: Arc<OnceLock<Arc<Session>>>,
    map_tiles: u64,
    commands: Sender<Command>,
    inputs: Inputs,
) {
    let ids = AtomicU64::new(1);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let Some(current) = session.get() else {
            let _ = stream.write_all(&encode_line(&GameAnswer::Error {
                code: code::NOT_ACTIVATED.into(),
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
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let current = current.clone();
        let commands = commands.clone();
        let inputs = inputs.clone();
        std::thread::spawn(move || connection(conn, stream, &current, &commands, &inputs));
    }
}

/// One player connection: a writer thread drains its outbox; this thread reads its lines.
fn connection(
    conn: ConnId,
    stream: TcpStream,
    session: &Session,
    commands: &Sender<Command>,
    inputs: &Inputs,
) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let stream = Arc::new(stream);
    let (tx, rx) = mpsc::sync_channel::<Out>(64);
    let out = Outbox {
        tx,
        stream: stream.clone(),
    };
    let writer = std::thread::spawn(move || write_loop(write_half, &rx));
    read_loop(conn, &stream, session, commands, inputs, &out);
    let _ = commands.send(Command::Closed { conn });
    drop(out);
    let _ = writer.join();
}

fn write_loop(mut stream: TcpStream, rx: &Receiver<Out>) {
    for out in rx {
        match out {
            Out::Line(line) => {
                if stream.write_all(&line).is_err() {
                    break;
                }
            }
            Out::Close => break,
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn read_loop(
    conn: ConnId,
    mut stream: &TcpStream,
    session: &Session,
    commands: &Sender<Command>,
    inputs: &Inputs,
    out: &Outbox,
) {
    let mut joined = false;
    let mut lines = LineBuffer::default();
    let mut chunk = vec![0u8; 8 * 1024];
    let mut batch = Vec::new();
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        lines.push(&chunk[..n], &mut batch);
        for line in batch.drain(..) {
            let line = match line {
                Line::Complete(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Complete(l) => l,
                Line::TooLong => {
                    out.error(
                        "line_too_long",
                        format!("lines are limited to {MAX_LINE} bytes"),
                    );
                    continue;
                }
            };
            let request = match decode_line::<GameRequest>(&line) {
                Ok(r) => r,
                Err(e) => {
                    out.error(e.code(), e.to_string());
                    continue;
                }
            };
            let command = match (joined, request) {
                (_, GameRequest::Ping { nonce }) => {
                    out.send(&GameAnswer::Pong {
                        nonce,
                        clock_ms: now_ms(),
                    });
                    continue;
                }
                (false, GameRequest::Join { ticket }) => match session.check(&ticket) {
                    Ok(claims) => {
                        joined = true;
                        Command::Join {
                            conn,
                            claims,
                            out: out.clone(),
                        }
                    }
                    Err((code, message)) => {
                        out.error(&code, message);
                        out.close();
                        return;
                    }
                },
                (false, _) => {
                    out.error(code::JOIN_FIRST, "send join with your session ticket first");
                    out.close();
                    return;
                }
                (true, GameRequest::Join { .. }) => {
                    out.error("already_joined", "this connection has joined already");
                    continue;
                }
                (
                    true,
                    GameRequest::Input {
                        seq,
                        dx,
                        dy,
                        fire,
                        aim,
                    },
                ) => {
                    let mut inputs = inputs.lock().unwrap_or_else(|p| p.into_inner());
                    let slot = inputs.entry(conn).or_insert((0, Input::default()));
                    if seq >= slot.0 {
                        *slot = (seq, Input { dx, dy, fire, aim });
                    }
                    continue;
                }
                (true, GameRequest::Surrender) => Command::Surrender { conn },
                (true, GameRequest::Leave) => Command::Leave { conn },
            };
            if commands.send(command).is_err() {
                return;
            }
        }
    }
}

/// A joined connection, as the game loop knows it.
struct Conn {
    player: PlayerId,
    jti: String,
    out: Outbox,
    ack: u32,
}

/// The game loop. Started at boot; blocked until [`Command::Start`].
pub fn run_loop(
    world: Arc<World>,
    commands: Receiver<Command>,
    inputs: Inputs,
    over: Sender<GameOver>,
) {
    // Connections are served once the session is set, which is just before `Start`: what
    // they send first waits here until the arena exists.
    let mut early = Vec::new();
    let session = loop {
        match commands.recv() {
            Ok(Command::Start(session)) => break session,
            Ok(other) => early.push(other),
            Err(_) => return,
        }
    };
    let identity = &session.identity;
    let params = game_params(&identity.params);
    let map = world.pick_map(&params.map, identity.rng_seed);
    let mut game = Game {
        arena: Arena::new(
            params,
            map,
            &identity.players,
            &identity.teams,
            identity.rng_seed,
        ),
        inputs,
        pending: Vec::new(),
        session_id: identity.session_id.clone(),
        conns: HashMap::new(),
        started_ms: now_ms(),
        over: Some(over),
    };
    for command in early {
        game.handle(command);
    }
    let tick = Duration::from_millis(1000 / u64::from(game.arena.params.tick_hz));
    let started = Instant::now();
    let mut next = started + tick;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match commands.recv_timeout(wait) {
            Ok(command) => game.handle(command),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !game.pending.is_empty() {
                    game.retry_pending();
                }
                if game.arena.outcome().is_none() {
                    game.apply_inputs();
                    // Catch up on game time (a busy host delays ticks), at most 5 at once.
                    let due = (started.elapsed().as_millis() / tick.as_millis()) as u64;
                    let steps = due.saturating_sub(game.arena.tick).clamp(1, 5);
                    for _ in 0..steps {
                        game.arena.step(tick.as_millis() as u64);
                    }
                    game.broadcast();
                }
                next += tick;
                let now = Instant::now();
                if next < now {
                    next = now + tick;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        game.finish_if_over();
    }
}

/// The mode's `[params]`, with out-of-range values brought into range.
pub fn game_params(value: &serde_json::Value) -> GameParams {
    let mut p: GameParams = if value.is_null() {
        GameParams::default()
    } else {
        serde_json::from_value(value.clone()).unwrap_or_else(|e| {
            eprintln!("berth-arena: game params {value}: {e}; using the defaults");
            GameParams::default()
        })
    };
    p.tick_hz = p.tick_hz.clamp(1, 60);
    p.score_limit = p.score_limit.max(1);
    p.time_limit_s = p.time_limit_s.clamp(1, 24 * 3600);
    p.abandon_after_s = p.abandon_after_s.max(1);
    p
}

/// How long a join whose ticket a live connection holds waits for that connection to close
/// before it is refused with `ticket_in_use`.
const TICKET_RELEASE_WAIT: Duration = Duration::from_millis(500);

/// A join waiting for its ticket to be released.
struct PendingJoin {
    conn: ConnId,
    claims: Claims,
    out: Outbox,
    until: Instant,
}

struct Game {
    arena: Arena,
    inputs: Inputs,
    pending: Vec<PendingJoin>,
    session_id: berth_protocol::SessionId,
    conns: HashMap<ConnId, Conn>,
    started_ms: u64,
    /// Taken when the game over is reported (once).
    over: Option<Sender<GameOver>>,
}

impl Game {
    fn handle(&mut self, command: Command) {
        match command {
            Command::Start(_) => {}
            Command::Join { conn, claims, out } => self.join(conn, claims, out),
            Command::Surrender { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    self.arena.surrender(&c.player.clone());
                }
            }
            Command::Leave { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    c.out.close();
                    self.arena.leave(&c.player);
                }
            }
            Command::Closed { conn } => {
                self.inputs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&conn);
                self.pending.retain(|p| p.conn != conn);
                if let Some(c) = self.conns.remove(&conn) {
                    self.arena.disconnect(&c.player);
                    self.retry_pending();
                }
            }
        }
    }

    /// Admits waiting joins whose ticket is free now; refuses those that waited too long.
    fn retry_pending(&mut self) {
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            let held = self.conns.values().any(|c| c.jti == p.claims.ticket_id);
            if !held {
                self.join(p.conn, p.claims, p.out);
            } else if now >= p.until {
                p.out.error(
                    code::TICKET_IN_USE,
                    "another live connection uses this ticket",
                );
                p.out.close();
            } else {
                self.pending.push(p);
            }
        }
    }

    fn join(&mut self, conn: ConnId, claims: Claims, out: Outbox) {
        let refuse = |code: &str, message: String| {
            out.error(code, message);
            out.close();
        };
        if self.arena.outcome().is_some() {
            return refuse(code::GAME_OVER, "the game is over".into());
        }
        let player = claims.player.clone();
        if self.arena.has_left(&player) {
            return refuse(code::LEFT, format!("{player} left this game"));
        }
        // Connections' joins race each other through their reader threads: the newer
        // connection (higher id) wins, whatever order the joins arrive in.
        if self
            .conns
            .iter()
            .any(|(id, c)| c.player == player && *id > conn)
        {
            return refuse(
                code::REPLACED,
                "a newer connection of this player took over".into(),
            );
        }
        if self.conns.values().any(|c| c.jti == claims.ticket_id) {
            // The connection holding this ticket may be gone already with its close not yet
            // read (a phone's quick reconnect): wait a moment for it before refusing.
            self.pending.push(PendingJoin {
                conn,
                claims,
                out,
                until: Instant::now() + TICKET_RELEASE_WAIT,
            });
            return;
        }
        let older: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.player == player)
            .map(|(id, _)| *id)
            .collect();
        for id in older {
            if let Some(c) = self.conns.remove(&id) {
                c.out.error(
                    code::REPLACED,
                    "a newer connection of this player took over",
                );
                c.out.close();
            }
        }
        let rejoined = self.arena.connect(&player);
        let welcome = Welcome {
            session_id: self.session_id.clone(),
            player: player.clone(),
            team: self.arena.team_of(&player).unwrap_or(0),
            teams: self.arena.teams().to_vec(),
            tick_hz: self.arena.params.tick_hz,
            score_limit: self.arena.params.score_limit,
            ends_at_ms: now_ms() + self.arena.time_left_ms(),
            rejoined,
            map: self.arena.map.view(),
        };
        out.send(&GameAnswer::Welcome(welcome));
        // The first state right away: a player waits no tick for it.
        out.send(&GameAnswer::State(self.arena.snapshot(now_ms(), 0)));
        self.conns.insert(
            conn,
            Conn {
                player,
                jti: claims.ticket_id,
                out,
                ack: 0,
            },
        );
    }

    /// Applies the latest input of every joined connection.
    fn apply_inputs(&mut self) {
        let latest = std::mem::take(&mut *self.inputs.lock().unwrap_or_else(|p| p.into_inner()));
        for (conn, (seq, input)) in latest {
            if let Some(c) = self.conns.get_mut(&conn) {
                if seq >= c.ack {
                    c.ack = seq;
                    self.arena.input(&c.player, input);
                }
            }
        }
    }

    fn broadcast(&self) {
        let clock = now_ms();
        let mut snapshot = self.arena.snapshot(clock, 0);
        for c in self.conns.values() {
            snapshot.ack = c.ack;
            c.out.send(&GameAnswer::State(snapshot.clone()));
        }
    }

    fn finish_if_over(&mut self) {
        let Some(outcome) = self.arena.outcome().cloned() else {
            return;
        };
        let Some(over) = self.over.take() else {
            return;
        };
        let ended = GameAnswer::Ended {
            reason: outcome.reason.into(),
            results: outcome.results.clone(),
        };
        for (_, c) in self.conns.drain() {
            c.out.send(&ended);
            c.out.close();
        }
        eprintln!(
            "berth-arena: game over after {} ms: {}",
            now_ms().saturating_sub(self.started_ms),
            outcome.reason
        );
        // Players hear `ended` before hostd hears of the game's end (and ends the VM).
        std::thread::sleep(Duration::from_millis(20));
        let _ = over.send(GameOver {
            reason: outcome.reason.into(),
            results: serde_json::to_value(&outcome.results).unwrap_or_default(),
        });
    }
}

/// Runs the game's code paths once on a throwaway arena, so that under TCG a restored clone
/// finds them translated already (see `HostToGuest::Prewarm`).
pub fn warm_up(world: &World) {
    let (a, b) = (
        PlayerId::new("warm-a").expect("literal id"),
        PlayerId::new("warm-b").expect("literal id"),
    );
    let mut arena = Arena::new(
        GameParams::default(),
        world.maps[0].clone(),
        &[a.clone(), b.clone()],
        &[vec![a.clone()], vec![b.clone()]],
        1,
    );
    arena.connect(&a);
    arena.connect(&b);
    arena.input(
        &a,
        Input {
            dx: 1.0,
            dy: 0.5,
            fire: true,
            aim: 0.3,
        },
    );
    for _ in 0..5 {
        arena.step(50);
        let _ = encode_line(&GameAnswer::State(arena.snapshot(now_ms(), 1)));
    }
    let _ = encode_line(&GameAnswer::Welcome(Welcome {
        session_id: berth_protocol::SessionId::new("warm").expect("literal id"),
        player: a.clone(),
        team: 0,
        teams: arena.teams().to_vec(),
        tick_hz: 20,
        score_limit: 1,
        ends_at_ms: 0,
        rejoined: false,
        map: arena.map.view(),
    }));
    arena.surrender(&b);
    if let Some(o) = arena.outcome() {
        let _ = serde_json::to_value(&o.results);
    }
    let _ = decode_line::<GameRequest>(
        br#"{"type":"input","seq":1,"dx":1,"dy":0,"fire":true,"aim":0}"#,
    );
    if let Err(e) = warm_up_connection(world) {
        eprintln!("berth-arena: warm-up connection: {e}");
    }
}

/// A throwaway session for the warm-up, with one player and a ticket for it.
fn warm_session(player: &PlayerId) -> (Arc<Session>, String) {
    let session_id = berth_protocol::SessionId::new("warm").expect("literal id");
    let key = {
        let mut rng = Rng::new(now_ms());
        format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())
    };
    let identity = Activation {
        v: berth_protocol::sdk::SDK_VERSION,
        session_id: session_id.clone(),
        vm_id: berth_protocol::VmId::new("warm").expect("literal id"),
        hostname: "warm".into(),
        players: vec![player.clone()],
        teams: vec![],
        params: serde_json::Value::Null,
        rng_seed: 1,
        deadline_ms: 0,
        wall_clock_ms: now_ms(),
    };
    let ticket = ticket::mint(
        &TicketClaims {
            sub: player.clone(),
            sid: session_id,
            aud: ticket::TICKET_AUDIENCE.into(),
            iss: "warm-up".into(),
            exp: now_ms() / 1000 + 60,
            iat: now_ms() / 1000,
            jti: "warm".into(),
        },
        &hex::decode(&key).unwrap_or_default(),
    );
    let verify = local_verifier(hex::decode(&key).unwrap_or_default(), identity.clone());
    (Arc::new(Session::new(identity, verify)), ticket)
}

/// Accepts one connection on `listener` and serves it as the game port does.
fn serve_one(
    listener: TcpListener,
    session: Arc<Session>,
    tx: Sender<Command>,
    inputs: Inputs,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            let identity = &session.identity;
            let _ = stream.write_all(&encode_line(&GameAnswer::Hello {
                session_id: identity.session_id.clone(),
                vm_id: identity.vm_id.clone(),
                hostname: identity.hostname.clone(),
                players: identity.players.clone(),
                clock_ms: now_ms(),
                rng_draw: 0,
                map_tiles: 0,
            }));
            connection(1, stream, &session, &tx, &inputs);
        }
    })
}

/// A whole player connection on a private loopback port, with a throwaway session: accept,
/// hello, reader and writer threads, a real ticket check, join, welcome, states, input, ping
/// and leave — the path every player takes right after activation.
fn warm_up_connection(world: &World) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader};
    let player = PlayerId::new("warm-a").expect("literal id");
    let (session, ticket) = warm_session(&player);
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::channel::<Command>();
    let inputs = Inputs::default();
    let server = serve_one(listener, session.clone(), tx, inputs.clone());
    let client = TcpStream::connect(addr)?;
    client.set_nodelay(true)?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lines = BufReader::new(client.try_clone()?).lines();
    let mut writer = client;
    writer.write_all(&encode_line(&GameRequest::Join { ticket }))?;
    let mut game = Game {
        arena: Arena::new(
            GameParams::default(),
            world.maps[0].clone(),
            std::slice::from_ref(&player),
            &[],
            1,
        ),
        inputs,
        pending: Vec::new(),
        session_id: session.identity.session_id.clone(),
        conns: HashMap::new(),
        started_ms: now_ms(),
        over: None,
    };
    let wait = Duration::from_secs(5);
    // hello, then the join reaches the game loop: welcome and the first state.
    let _ = lines.next();
    if let Ok(command) = rx.recv_timeout(wait) {
        game.handle(command);
    }
    for _ in 0..2 {
        let _ = lines.next();
    }
    // One write, as a client that sends quickly would: input, ping and leave.
    let burst: Vec<u8> = [
        GameRequest::Input {
            seq: 1,
            dx: 1.0,
            dy: 0.0,
            fire: true,
            aim: 0.0,
        },
        GameRequest::Ping { nonce: 1 },
        GameRequest::Leave,
    ]
    .iter()
    .flat_map(encode_line)
    .collect();
    writer.write_all(&burst)?;
    let _ = lines.next();
    while let Ok(command) = rx.recv_timeout(wait) {
        let closed = matches!(command, Command::Closed { .. });
        game.handle(command);
        if !game.conns.is_empty() {
            game.apply_inputs();
            game.arena.step(50);
            game.broadcast();
        }
        if closed {
            break;
        }
    }
    drop(lines);
    let _ = server.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_brought_into_range() {
        let p = game_params(&serde_json::json!({"tick_hz": 0, "score_limit": 0}));
        assert_eq!((p.tick_hz, p.score_limit), (1, 1));
        let p = game_params(&serde_json::json!({"tick_hz": "fast"}));
        assert_eq!(p, GameParams::default());
        assert_eq!(game_params(&serde_json::Value::Null), GameParams::default());
    }
}
