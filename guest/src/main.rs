//! `berth-guest`: PID 1 of a Berth game VM after the image's `/init` has set up devices.
fn main() {
    let config = berth_guest::Config::from_env();
    #[cfg(feature = "xen")]
    let result = if berth_guest::xen::selected() {
        berth_guest::xen::run(config)
    } else {
        berth_guest::run(config)
    };
    #[cfg(not(feature = "xen"))]
    let result = berth_guest::run(config);
    if let Err(e) = result {
        eprintln!("berth-guest: fatal: {e}");
        std::process::exit(1);
    }
}
