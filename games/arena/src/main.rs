//! `berth-arena`: the arena's game server, run by the agent in a Berth VM.
fn main() {
    if let Err(e) = berth_arena::run(berth_arena::Config::from_env()) {
        eprintln!("berth-arena: fatal: {e}");
        std::process::exit(1);
    }
}
