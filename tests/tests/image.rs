//! `berth-hostd image build`, the product's image builder, as a studio runs it: a game's
//! `game.toml` in, an image folder out, cached by digest; a bad manifest or a wrong agent is
//! refused with a message naming what is wrong, and leaves no folder behind.

use anyhow::Result;
use berth_testkit::fixtures::{workspace, TempDir};
use berth_testkit::hostd_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The static agent `cargo xtask image` builds.
fn agent() -> PathBuf {
    workspace().join("target/guest/x86_64-unknown-linux-gnu/release/berth-guest")
}

fn build(manifest: &Path, out: &Path, agent: &Path) -> Output {
    Command::new(hostd_bin())
        .args(["image", "build"])
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .arg("--agent")
        .arg(agent)
        .arg("--debs")
        .arg(workspace().join("target/debs"))
        .output()
        .expect("berth-hostd runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_game_toml_becomes_an_image_once_and_is_reused_after() -> Result<()> {
    let tmp = TempDir::new("image-build")?;
    let out = tmp.0.join("faulty");
    let manifest = workspace().join("tests/games/faulty/game.toml");
    let first = build(&manifest, &out, &agent());
    assert!(first.status.success(), "{}", stderr(&first));
    let said = String::from_utf8_lossy(&first.stdout).into_owned();
    let image = berth_hostd::image::Image::load(&out)?;
    assert_eq!(
        said.trim(),
        format!("{} {}", out.display(), image.manifest.digest)
    );

    let again = build(&manifest, &out, &agent());
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout), said, "same digest");
    assert!(stderr(&again).contains("up to date"), "{}", stderr(&again));
    Ok(())
}

#[test]
fn a_bad_manifest_or_agent_is_refused_naming_what_is_wrong() -> Result<()> {
    let tmp = TempDir::new("image-refused")?;
    let out = tmp.0.join("bad");
    let cases = [
        ("memory_mib = 8", "resources.memory_mib"),
        ("packages = [\"Not A Package\"]", "build.packages"),
        (
            "packages = [\"berth-no-such-package\"]",
            "berth-no-such-package",
        ),
    ];
    for (line, want) in cases {
        let section = if line.starts_with("memory") {
            "[resources]"
        } else {
            "[build]"
        };
        let manifest = tmp.0.join("game.toml");
        std::fs::write(
            &manifest,
            format!("name = \"bad\"\n[server]\ncommand = [\"/bin/busybox\", \"true\"]\n{section}\n{line}\n"),
        )?;
        let o = build(&manifest, &out, &agent());
        assert!(!o.status.success(), "{line}: built anyway");
        assert!(stderr(&o).contains(want), "{line}: {}", stderr(&o));
        assert!(!out.exists(), "{line}: no image folder left");
    }
    // The agent runs as PID 1 with no C library: a dynamically linked one is refused.
    let manifest = workspace().join("tests/games/faulty/game.toml");
    let o = build(&manifest, &out, &hostd_bin());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("linked dynamically"), "{}", stderr(&o));
    assert!(!out.exists());
    Ok(())
}

#[test]
fn hostd_builds_the_images_its_config_names_by_manifest() -> Result<()> {
    let tmp = TempDir::new("image-config")?;
    let faulty = workspace().join("tests/games/faulty/game.toml");
    let config_path = tmp.0.join("hostd.toml");
    let write = |name: &str| {
        std::fs::write(
            &config_path,
            format!(
                "[[images]]\nname = \"{name}\"\nmanifest = \"{}\"\n",
                faulty.display()
            ),
        )
    };
    write("faulty")?;
    // The packages the other tests downloaded (`cargo xtask image` keeps them there).
    std::env::set_var(
        berth_hostd::build::DEB_CACHE_ENV,
        workspace().join("target/debs"),
    );
    let config = berth_hostd::HostdConfig::load(&config_path)?;
    berth_hostd::build::configured_images(&config, &agent())?;
    let image = berth_hostd::image::Image::load(&tmp.0.join("images/faulty"))?;
    assert_eq!(image.manifest.game.name, "faulty");
    assert_eq!(image.manifest.game.framing.as_str(), "lines");

    // The config's name for the image must be the manifest's.
    write("other")?;
    let config = berth_hostd::HostdConfig::load(&config_path)?;
    let e = berth_hostd::build::configured_images(&config, &agent()).expect_err("refused");
    assert!(format!("{e:#}").contains("images[0].manifest"), "{e:#}");
    assert!(!tmp.0.join("images/other").exists());
    Ok(())
}
