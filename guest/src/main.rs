//! `berth-guest`: PID 1 of a Berth game VM after the image's `/init` has set up devices.
fn main() {
    let config = berth_guest::Config::from_env();
    if let Err(e) = berth_guest::run(config) {
        eprintln!("berth-guest: fatal: {e}");
        std::process::exit(1);
    }
}
