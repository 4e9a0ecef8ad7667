//! The arena: Berth's example game server — a real-time, top-down game for two or more
//! players in teams — written against the public game-server SDK ([`berth_sdk`]) and nothing
//! else of Berth's inside the VM. A studio's own server has the same shape:
//!
//! 1. load (here: the maps on the data disk, and the start-up work a real server does);
//! 2. `initialised` — the VM is docked as a substrate here, with all of that loaded;
//! 3. `activation` — blocks until a match needs this VM; then the session's players, teams,
//!    parameters and seed;
//! 4. `ready` — players may join; each join's ticket is checked with `verify`;
//! 5. `health` every couple of seconds while the match runs;
//! 6. `ended` with the reason and the results.
//!
//! - [`rules`]: the game's rules and state (pure, unit-tested).
//! - [`server`]: the game port — connections, joins, the game loop.

pub mod rules;
pub mod server;

use berth_protocol::guest::GAME_PORT;
use berth_sdk::{Sdk, SdkError};
use server::{Claims, Command, GameOver, Inputs, Session, World};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How often the running game tells the SDK it is alive.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// The arena's settings, from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the maps are (`BERTH_DATA_DIR`, else `/data`).
    pub data_dir: PathBuf,
    /// The start-up work's least duration (`BERTH_INIT_MS`, else 1000).
    pub init_work: Duration,
    /// The game port (`BERTH_GAME_PORT`, else 7000).
    pub port: u16,
}

impl Config {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Config {
            data_dir: var("BERTH_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/data".into()),
            init_work: Duration::from_millis(
                var("BERTH_INIT_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
            ),
            port: var("BERTH_GAME_PORT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(GAME_PORT),
        }
    }
}

/// Why the arena stopped.
#[derive(Debug)]
pub enum ArenaError {
    Load(std::io::Error),
    Bind(std::io::Error),
    Sdk(SdkError),
}

impl std::fmt::Display for ArenaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArenaError::Load(e) => write!(f, "loading the maps: {e}"),
            ArenaError::Bind(e) => write!(f, "binding the game port: {e}"),
            ArenaError::Sdk(e) => write!(f, "the SDK: {e}"),
        }
    }
}

impl From<SdkError> for ArenaError {
    fn from(e: SdkError) -> Self {
        ArenaError::Sdk(e)
    }
}

/// Loads, parks, serves one session, reports its end — then keeps the game port answering
/// until the VM is destroyed.
pub fn run(config: Config) -> Result<(), ArenaError> {
    let sdk = Sdk::from_env();
    let world =
        Arc::new(World::load(&config.data_dir, config.init_work).map_err(ArenaError::Load)?);
    server::warm_up(&world);
    let listener = bind(config.port).map_err(ArenaError::Bind)?;
    // Every thread exists before docking, so that activating a clone starts none.
    let session = Arc::new(OnceLock::new());
    let (commands, inbox) = mpsc::channel::<Command>();
    let (over_tx, over) = mpsc::channel::<GameOver>();
    let inputs = Inputs::default();
    {
        let (session, tiles, commands, inputs) = (
            session.clone(),
            world.tiles,
            commands.clone(),
            inputs.clone(),
        );
        std::thread::spawn(move || server::serve(listener, session, tiles, commands, inputs));
    }
    {
        let world = world.clone();
        std::thread::spawn(move || server::run_loop(world, inbox, inputs, over_tx));
    }
    {
        let (sdk, world) = (sdk.clone(), world.clone());
        std::thread::spawn(move || warm_ups(&sdk, &world));
    }
    sdk.initialised_with_warm_ups()?;
    let activation = sdk.activation()?;
    let verifier = sdk.clone();
    let current = Arc::new(Session::new(
        activation,
        Box::new(move |ticket| {
            verifier
                .verify(ticket)
                .map(|v| Claims {
                    player: v.player,
                    ticket_id: v.ticket_id,
                })
                .map_err(|e| match e.code() {
                    Some(code) => (code.to_owned(), e.to_string()),
                    None => ("game_unreachable".to_owned(), e.to_string()),
                })
        }),
    ));
    let _ = session.set(current.clone());
    sdk.ready()?;
    // Built while the players are told `matched` (joins before it wait in the game loop).
    let _ = commands.send(Command::Start(current.clone()));
    let result = serve_until_over(&sdk, &over, &current);
    // The VM is destroyed after `ended`; until then the port keeps answering.
    loop {
        std::thread::park();
        let _ = &result;
    }
}

/// Runs the game's first-use paths each time Berth asks (the SDK's warm-up hook): a throwaway
/// match on loopback, and the SDK calls and parsing the activation takes.
fn warm_ups(sdk: &Sdk, world: &World) {
    while sdk.prewarm().is_ok() {
        server::warm_up(world);
        let _ = sdk.session();
        let _ = sdk.health();
        let _ = serde_json::from_str::<berth_sdk::Activation>(server::SAMPLE_ACTIVATION);
        if sdk.prewarmed().is_err() {
            return;
        }
    }
}

/// Health every [`HEALTH_EVERY`] until the game loop says the game is over; then `ended`.
/// The activation is logged at the first health call, off the players' path: under TCG a
/// console write costs milliseconds.
fn serve_until_over(
    sdk: &Sdk,
    over: &mpsc::Receiver<GameOver>,
    session: &Session,
) -> Result<(), SdkError> {
    let mut logged = false;
    loop {
        match over.recv_timeout(HEALTH_EVERY) {
            Ok(o) => return sdk.ended(&o.reason, &o.results),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !logged {
                    logged = true;
                    eprintln!(
                        "berth-arena: activated for session {} ({} players)",
                        session.identity.session_id,
                        session.identity.players.len()
                    );
                }
                if let Err(e) = sdk.health() {
                    eprintln!("berth-arena: health: {e}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Binds the game port on every address, IPv6 and IPv4 (one dual-stack socket; hostd's xen
/// driver reaches the guest by IPv6 link-local), or IPv4 only when the kernel has no IPv6.
pub fn bind(port: u16) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port))
        .or_else(|_| std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)))
}
