//! The web client (`/play`) in real headless Chromium at phone size, driven over WebDriver
//! (Debian's `chromedriver`, started on a free port by the test and stopped at its end).
//!
//! - Against a real server without a host: sign in, queue, the live wait counter and the
//!   server's `queue_status`, the play socket dropping and resuming the same queue ticket when
//!   the server comes back, cancel.
//! - The whole stack: server + hostd's pool of real VMs, its link and its player gateway. The
//!   page queues for `sprint`, this test plays the opponent over real websockets (protocol
//!   types, dev token, `/v1/play`, the gateway), moves the page's player with a touch drag on
//!   the virtual joystick, surrenders; the page shows the game, then the results, then queues
//!   again.
//!
//! Screenshots go to `target/screenshots/play-*.png`.

use berth_testkit::player as client;

use anyhow::{bail, Context, Result};
use berth_client::{GameClient, Heard, PlayClient, PlayConfig};
use berth_hostd::gateway::Gateway;
use berth_protocol::game::{GameAnswer, GameRequest, GameResults};
use berth_protocol::play::ServerMessage;
use berth_protocol::{HostId, PlayerId};
use berth_server::app::Server;
use berth_server::auth::Role;
use berth_server::config::ServerConfig;
use berth_server::model::{Binding, HostState};
use berth_testkit::browser::{self, Device};
use berth_testkit::Sandbox;
use fantoccini::actions::{
    Actions, InputSource, KeyAction, KeyActions, MouseActions, PointerAction, TouchActions,
    MOUSE_BUTTON_LEFT,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

fn web_config() -> ServerConfig {
    let mut c = client::config();
    c.auth.dev_tokens = true;
    c.timeouts.host_heartbeat_ms = 500;
    c.timeouts.host_lost_ms = 2000;
    c
}

/// The shared headless Chromium (`berth_testkit::browser`), with what this page's tests ask of
/// it: which screen the page shows, and what is wrong when a wait fails.
struct Browser(browser::Browser);

impl std::ops::Deref for Browser {
    type Target = browser::Browser;
    fn deref(&self) -> &browser::Browser {
        &self.0
    }
}

/// What the page shows, for failure messages (a JavaScript expression).
const PAGE_CONTEXT: &str = "'screen=' + document.body.dataset.screen \
     + ' error=' + (document.querySelector('[data-testid=error]').hidden ? '-' : document.querySelector('[data-testid=error-text]').textContent) \
     + ' net=' + document.getElementById('net-text').textContent";

impl Browser {
    async fn start(name: &str, device: Device) -> Result<Browser> {
        Ok(Browser(browser::Browser::start(name, device).await?))
    }

    /// A browser that trusts the server certificate of `ca`.
    async fn trusting(name: &str, device: Device, ca: &berth_testkit::TestCa) -> Result<Browser> {
        let b = browser::Browser::start_trusting(name, device, ca.spki()).await?;
        Ok(Browser(b))
    }

    /// Waits until the JavaScript expression `cond` is true.
    async fn until(&self, what: &str, within: Duration, cond: &str) -> Result<()> {
        self.0.until(what, within, cond, PAGE_CONTEXT).await
    }

    /// Waits for `screen`, and checks that it is the one displayed and fits the viewport.
    async fn until_screen(&self, screen: &str, within: Duration) -> Result<()> {
        self.until(
            &format!("screen {screen}"),
            within,
            &format!("document.body.dataset.screen === '{screen}'"),
        )
        .await?;
        assert!(
            self.el(&format!("screen-{screen}"))
                .await?
                .is_displayed()
                .await?
        );
        self.fits().await
    }

    /// The screen the page shows (`document.body.dataset.screen`).
    async fn screen(&self) -> Result<String> {
        Ok(self
            .js("return document.body.dataset.screen || ''")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// What is wrong on the page, for failure messages.
    async fn context(&self) -> String {
        self.js(&format!("return {PAGE_CONTEXT}"))
            .await
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("(page unreadable: {e})"))
    }

    async fn finish(self) -> Result<()> {
        self.0.finish().await
    }
}

/// Signs in on the page as `name` (the page remembers the name).
async fn sign_in(b: &Browser, name: &str) -> Result<()> {
    b.until_screen("signin", Duration::from_secs(10)).await?;
    let input = b.el("name").await?;
    input.clear().await?;
    input.send_keys(name).await?;
    b.click("signin").await?;
    b.until_screen("modes", Duration::from_secs(10)).await?;
    assert_eq!(b.text("who").await?, format!("Signed in as {name}"));
    Ok(())
}

/// The wait counter's seconds (`m:ss`).
async fn waited_s(b: &Browser) -> Result<u64> {
    let t = b.text("wait").await?;
    let (m, s) = t.split_once(':').with_context(|| format!("wait {t:?}"))?;
    Ok(m.parse::<u64>()? * 60 + s.parse::<u64>()?)
}

/// The page served over `https://` opens its socket over `wss://` (from `location.protocol`),
/// signs in and queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_works_over_tls() -> Result<()> {
    berth_testkit::init_logs();
    let ca = berth_testkit::TestCa::new()?;
    let mut config = web_config();
    config.tls = Some(ca.files());
    let server = Server::start(config).await?;
    let desktop = Device::Desktop {
        width: 1024,
        height: 768,
    };
    let b = Browser::trusting("tls", desktop, &ca).await?;
    b.goto(&format!("https://localhost:{}/play", server.addr.port()))
        .await?;
    assert_eq!(b.js("return location.protocol").await?, "https:");
    sign_in(&b, "web-tls").await?;
    b.click("mode-sprint").await?;
    b.until_screen("queue", Duration::from_secs(10)).await?;
    let player = berth_protocol::PlayerId::new("web-tls")?;
    assert!(
        server.ctx.registry.player(&player).is_some(),
        "signed in over wss"
    );
    b.finish().await?;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_signs_in_queues_resumes_after_a_drop_and_cancels() -> Result<()> {
    berth_testkit::init_logs();
    let server = Server::start(web_config()).await?;
    let addr = server.addr;
    let store = server.ctx.store.clone();
    // The smallest phone the page is made for.
    let b = Browser::start(
        "queue",
        Device::Phone {
            width: 360,
            height: 640,
        },
    )
    .await?;
    b.goto(&format!("http://{addr}/play")).await?;
    b.until_screen("signin", Duration::from_secs(10)).await?;
    let viewport = b
        .js("return [window.innerWidth, window.innerHeight]")
        .await?;
    assert_eq!(viewport, json!([360, 640]), "mobile emulation");
    b.shot("play-signin").await?;

    // A name the server would refuse is refused plainly.
    b.el("name").await?.send_keys("no spaces").await?;
    b.click("signin").await?;
    b.until(
        "the error banner",
        Duration::from_secs(5),
        "!document.querySelector('[data-testid=error]').hidden",
    )
    .await?;
    assert!(b.text("error-text").await?.contains("bad_player"));
    b.click("error-close").await?;

    sign_in(&b, "web-alice").await?;
    assert_eq!(
        b.js("return localStorage.getItem('berth.player')").await?,
        "web-alice"
    );
    b.shot("play-modes").await?;

    // Queue: the page counts the wait and shows the server's queue_status.
    b.click("mode-sprint").await?;
    b.until_screen("queue", Duration::from_secs(5)).await?;
    b.until(
        "queue_status",
        Duration::from_secs(5),
        "document.querySelector('[data-testid=queue-status]').textContent.includes('1 player queued for sprint')",
    )
    .await?;
    b.until(
        "the wait counter",
        Duration::from_secs(5),
        "document.querySelector('[data-testid=wait]').textContent >= '0:02'",
    )
    .await?;
    let alice = PlayerId::new("web-alice")?;
    let Some(Binding::Queued { ticket, pool }) = store.binding(&alice).await? else {
        bail!(
            "web-alice is not queued: {:?}",
            store.binding(&alice).await?
        );
    };
    assert_eq!(
        (pool.mode.as_str(), pool.region.as_str()),
        ("sprint", "local")
    );
    b.shot("play-queue").await?;

    // The server goes away and comes back on the same address and store: the page reconnects,
    // says hello, and is told it is still queued, its wait still counting.
    let before = waited_s(&b).await?;
    server.shutdown().await;
    b.until(
        "the reconnecting banner",
        Duration::from_secs(5),
        "!document.querySelector('[data-testid=net-status]').hidden",
    )
    .await?;
    b.shot("play-reconnecting").await?;
    let mut cfg = web_config();
    cfg.listen = addr;
    let server = Server::start_with(cfg, store.clone()).await?;
    b.until(
        "the reconnect",
        Duration::from_secs(15),
        "document.querySelector('[data-testid=net-status]').hidden",
    )
    .await?;
    b.until_screen("queue", Duration::from_secs(1)).await?;
    b.until(
        "queue_status after the resume",
        Duration::from_secs(8),
        "document.querySelector('[data-testid=queue-status]').textContent.includes('queued for sprint')",
    )
    .await?;
    let after = waited_s(&b).await?;
    assert!(
        after >= before,
        "the wait went on: {before} s, then {after} s"
    );
    assert!(
        matches!(store.binding(&alice).await?, Some(Binding::Queued { ticket: t, .. }) if t == ticket),
        "the same queue ticket was resumed"
    );

    // Cancel: back to the modes, out of the queue.
    b.click("cancel").await?;
    b.until_screen("modes", Duration::from_secs(5)).await?;
    let t0 = Instant::now();
    while store.binding(&alice).await?.is_some() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("still bound: {:?}", store.binding(&alice).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    b.finish().await?;
    server.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------------- the whole stack

/// Starts hostd's player gateway for `sandbox`'s pool on a free loopback port; returns it and
/// the URL players reach it at (`ws://ADDR/v1/game`, what the link advertises).
async fn start_gateway(sandbox: &Sandbox) -> Result<(String, Gateway)> {
    let gw = berth_hostd::gateway::start(sandbox.pool.clone(), ([127, 0, 0, 1], 0).into()).await?;
    Ok((
        format!("ws://{}{}", gw.addr, berth_hostd::gateway::PATH),
        gw,
    ))
}

/// A hostd link to `server` for `sandbox`'s pool advertising `gateway`; stopped by dropping
/// the returned sender.
fn link(
    sandbox: &Sandbox,
    server: &Server,
    gateway: &str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let token = client::auth()
        .mint("web-host", Role::Host, 3600)
        .expect("mint");
    berth_testkit::start_link(&sandbox.pool, &[server.addr], "web-host", token, gateway)
}

/// A game answer heard on the opponent's gateway socket, or why none came.
async fn recv_game(game: &mut GameClient, within: Duration) -> Result<GameAnswer> {
    loop {
        match game.next(within).await? {
            Heard::Answer(a) => return Ok(a),
            Heard::Binary(_) => continue,
            other => bail!("opponent: expected a game answer, got {other:?}"),
        }
    }
}

/// How the match ended for the opponent: the game's `ended`, then the server's `session_ended`.
#[derive(Debug)]
struct OpponentEnd {
    game_reason: String,
    results: GameResults,
    session_reason: String,
    session_results: Value,
}

/// An opponent signed in with a dev token, queued for `mode` and matched: its `/v1/play`
/// socket, the gateway's address and its ticket.
async fn matched_opponent(
    server: SocketAddr,
    name: &str,
    mode: &str,
) -> Result<(PlayClient, String, String)> {
    let token: Value = reqwest::Client::new()
        .post(format!("http://{server}/v1/dev/token"))
        .json(&json!({ "player": name }))
        .send()
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().context("a dev token")?.to_owned();
    let mut play =
        PlayClient::connect(PlayConfig::new(format!("ws://{server}/v1/play"), token)).await?;
    play.send(&client::queue(mode, "local")).await?;
    loop {
        match play.recv_within(Duration::from_secs(90)).await? {
            ServerMessage::QueueStatus { .. } => continue,
            ServerMessage::Matched {
                endpoint, ticket, ..
            } => return Ok((play, endpoint, ticket)),
            other => bail!("{name}: expected matched, got {other:?}"),
        }
    }
}

/// The page's opponent, as a real client: a dev token, `/v1/play`, queue `sprint`; on
/// `matched` joins through the gateway, moves around until told to surrender, then hears the
/// end on both sockets.
async fn opponent(
    server: SocketAddr,
    name: &str,
    surrender: oneshot::Receiver<()>,
) -> Result<OpponentEnd> {
    let (mut play, endpoint, ticket) = matched_opponent(server, name, "sprint").await?;

    let mut game = GameClient::connect_url(&endpoint, Default::default())
        .await
        .with_context(|| format!("opponent: connecting to the gateway at {endpoint}"))?;
    game.send(&GameRequest::Join { ticket }).await?;
    loop {
        match recv_game(&mut game, Duration::from_secs(10)).await? {
            GameAnswer::Hello { .. } => continue,
            GameAnswer::Welcome(_) => break,
            other => bail!("opponent: expected welcome, got {other:?}"),
        }
    }
    let mut surrender = Some(surrender);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut seq = 0u32;
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    let (game_reason, results) = loop {
        tokio::select! {
            m = recv_game(&mut game, Duration::from_secs(10)) => match m? {
                GameAnswer::Ended { reason, results } => break (reason, results),
                GameAnswer::Error { code, message } => bail!("opponent: game error {code}: {message}"),
                _ => continue,
            },
            _ = tick.tick() => {
                // Walk in a slow circle, never firing: the page's player stays alive.
                seq += 1;
                let a = f32::from(u16::try_from(seq % 32).unwrap_or(0)) / 32.0 * std::f32::consts::TAU;
                game.send(&GameRequest::Input { seq, dx: a.cos(), dy: a.sin(), fire: false, aim: a }).await?;
            }
            r = async { surrender.as_mut().expect("guarded").await }, if surrender.is_some() => {
                surrender = None;
                if r.is_ok() {
                    game.send(&GameRequest::Surrender).await?;
                }
            }
            () = &mut deadline => bail!("opponent: the game did not end within 60 s"),
        }
    };
    let (session_reason, session_results) = loop {
        match play.recv_within(Duration::from_secs(30)).await? {
            ServerMessage::SessionEnded {
                reason, results, ..
            } => break (reason, results),
            _ => continue,
        }
    };
    Ok(OpponentEnd {
        game_reason,
        results,
        session_reason: session_reason.to_string(),
        session_results,
    })
}

/// The page's own player's position (`data-me` on the canvas, in tiles).
async fn me(b: &Browser) -> Result<(f64, f64)> {
    let v = b
        .js("return document.querySelector('[data-testid=canvas]').dataset.me || ''")
        .await?;
    let s = v.as_str().unwrap_or_default();
    let (x, y) = s.split_once(',').with_context(|| format!("me {s:?}"))?;
    Ok((x.parse()?, y.parse()?))
}

/// Performs `actions` and tells whether the page's own player moved by half a tile or more.
async fn moves(b: &Browser, actions: Actions) -> Result<bool> {
    let start = me(b).await?;
    b.c().perform_actions(actions).await?;
    b.c().release_actions().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = me(b).await?;
    Ok((end.0 - start.0).abs() + (end.1 - start.1).abs() > 0.5)
}

/// Drags the virtual joystick (left half of the canvas) with one finger until the page's own
/// player has moved; tries the four directions (a wall may block one).
async fn touch_move(b: &Browser) -> Result<()> {
    let (cx, cy, cw, ch) = b.el("canvas").await?.rectangle().await?;
    let (x0, y0) = (cx + cw * 0.2, cy + ch * 0.6);
    for (dx, dy) in [(40.0, 0.0), (-40.0, 0.0), (0.0, 40.0), (0.0, -40.0)] {
        let finger = TouchActions::new("left-thumb".into())
            .then(PointerAction::MoveTo {
                duration: None,
                x: x0,
                y: y0,
            })
            .then(PointerAction::Down {
                button: MOUSE_BUTTON_LEFT,
            })
            .then(PointerAction::MoveBy {
                duration: Some(Duration::from_millis(150)),
                x: dx,
                y: dy,
            })
            .pause(Duration::from_millis(700))
            .then(PointerAction::Up {
                button: MOUSE_BUTTON_LEFT,
            });
        if moves(b, finger.into()).await? {
            return Ok(());
        }
    }
    bail!(
        "the joystick did not move the player ({})",
        b.context().await
    )
}

/// Holds a movement key (WASD) until the page's own player has moved.
async fn key_move(b: &Browser) -> Result<()> {
    for key in ['d', 'a', 's', 'w'] {
        let hold = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key })
            .pause(Duration::from_millis(600))
            .then(KeyAction::Up { value: key });
        if moves(b, hold.into()).await? {
            return Ok(());
        }
    }
    bail!("the keys did not move the player ({})", b.context().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_plays_a_match_against_a_websocket_opponent() -> Result<()> {
    play_a_match(Device::Phone {
        width: 390,
        height: 844,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_plays_with_keyboard_and_mouse_and_surrenders() -> Result<()> {
    play_a_match(Device::Desktop {
        width: 1280,
        height: 800,
    })
    .await
}

/// Holds the mouse button on the canvas (fire toward the pointer) until the page's team has
/// shots in flight; aims at the four sides of the field in turn (a wall may be in the way).
async fn mouse_fire(b: &Browser) -> Result<()> {
    let canvas = b.el("canvas").await?;
    let (_, _, w, h) = canvas.rectangle().await?;
    for (x, y) in [
        (w * 0.45, 0.0),
        (-w * 0.45, 0.0),
        (0.0, h * 0.45),
        (0.0, -h * 0.45),
    ] {
        let mouse = MouseActions::new("mouse".into())
            .then(PointerAction::MoveToElement {
                element: canvas.clone(),
                duration: None,
                x,
                y,
            })
            .then(PointerAction::Down {
                button: MOUSE_BUTTON_LEFT,
            })
            .pause(Duration::from_millis(600))
            .then(PointerAction::Up {
                button: MOUSE_BUTTON_LEFT,
            });
        b.c().perform_actions(mouse).await?;
        b.c().release_actions().await?;
        let shots = b
            .js("return Number(document.querySelector('[data-testid=canvas]').dataset.shots || 0)")
            .await?;
        if shots.as_u64().unwrap_or(0) > 0 {
            return Ok(());
        }
    }
    bail!("clicking did not fire ({})", b.context().await)
}

/// The whole stack: the page (as web-alice) queues for sprint, this test's opponent (web-bob)
/// joins it; the page plays — by touch on a phone, by keys and mouse on a desktop — survives a
/// dropped game socket, and the match ends by surrender: bob's on a phone (the page wins),
/// the page's own on a desktop (the page loses). Then "Play again".
async fn play_a_match(device: Device) -> Result<()> {
    let phone = matches!(device, Device::Phone { .. });
    let (tag, shot) = if phone {
        ("web-phone", "play")
    } else {
        ("web-desktop", "play-desktop")
    };
    let sandbox = Sandbox::start(tag, 1).await?;
    let (gateway_url, gateway) = start_gateway(&sandbox).await?;
    let server = Server::start(web_config()).await?;
    let store = server.ctx.store.clone();
    let (stop, task) = link(&sandbox, &server, &gateway_url);
    let host = HostId::new("web-host")?;
    let t0 = Instant::now();
    while !store.host(&host).await?.is_some_and(|h| {
        h.state == HostState::Up && h.images.iter().any(|i| i.docked && i.warm >= 1)
    }) {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the host never came up with a warm VM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = Browser::start(tag, device).await?;
    b.goto(&format!("http://{}/play", server.addr)).await?;
    sign_in(&b, "web-alice").await?;
    b.click("mode-sprint").await?;
    b.until_screen("queue", Duration::from_secs(5)).await?;
    b.until(
        "queue_status",
        Duration::from_secs(5),
        "document.querySelector('[data-testid=queue-status]').textContent.includes('queued for sprint')",
    )
    .await?;
    b.shot(&format!("{shot}-match-queue")).await?;

    // The opponent queues: a match, a VM, and both play through the gateway.
    let (surrender, surrendered) = oneshot::channel();
    let bob = tokio::spawn(opponent(server.addr, "web-bob", surrendered));
    b.until_screen("playing", Duration::from_secs(60)).await?;
    b.until(
        "snapshots of both players",
        Duration::from_secs(10),
        "(() => { const c = document.querySelector('[data-testid=canvas]'); \
         return Number(c.dataset.tick) > 0 && c.dataset.players === '2' && !!c.dataset.me; })()",
    )
    .await?;
    let score = b.text("score").await?;
    assert!(score.contains("You 0"), "{score}");
    assert_ne!(b.text("time-left").await?, "–:––");
    if phone {
        touch_move(&b).await?;
    } else {
        key_move(&b).await?;
        mouse_fire(&b).await?;
    }
    b.shot(&format!("{shot}-game")).await?;
    // The game socket drops: the page joins again with the same ticket and plays on.
    let tick = b
        .js("return Number(document.querySelector('[data-testid=canvas]').dataset.tick)")
        .await?;
    b.js("berthDebug.dropGame()").await?;
    b.until(
        "the rejoin",
        Duration::from_secs(10),
        &format!(
            "(() => {{ const c = document.querySelector('[data-testid=canvas]'); \
             return c.dataset.joins === '2' && Number(c.dataset.tick) > {tick}; }})()"
        ),
    )
    .await?;
    // Surrender asks first: "Keep playing" keeps playing.
    b.click("surrender").await?;
    b.until(
        "the surrender dialog",
        Duration::from_secs(2),
        "document.querySelector('[data-testid=surrender-dialog]').open",
    )
    .await?;
    if phone {
        b.click("surrender-no").await?;
        b.until(
            "the dialog closed",
            Duration::from_secs(2),
            "!document.querySelector('[data-testid=surrender-dialog]').open",
        )
        .await?;
        assert_eq!(b.screen().await?, "playing");
        // The opponent gives up.
        let _ = surrender.send(());
    } else {
        // The page gives up (the opponent plays on until the end).
        drop(surrender);
        b.click("surrender-yes").await?;
    }

    // The page shows who won, the teams and the reason.
    b.until_screen("results", Duration::from_secs(20)).await?;
    let (outcome, winner, reason) = if phone {
        ("You win!", "web-alice", "The other side surrendered")
    } else {
        ("You lose", "web-bob", "Your team surrendered")
    };
    assert_eq!(b.text("outcome").await?, outcome);
    let text = b.text("winner").await?;
    assert!(text.contains(winner), "{text}");
    assert!(b.text("your-team").await?.contains("web-alice"));
    let text = b.text("reason").await?;
    assert!(
        text.contains(reason) && text.contains("(surrender)"),
        "{text}"
    );
    let table = b.text("results-table").await?;
    assert!(
        table.contains("web-alice") && table.contains("web-bob"),
        "{table}"
    );
    b.shot(&format!("{shot}-results")).await?;
    let end = bob.await??;
    assert_eq!(end.game_reason, "surrender", "{end:?}");
    let team_of = |name: &str| {
        end.results
            .players
            .iter()
            .find(|p| p.id.as_str() == name)
            .map(|p| p.team)
    };
    assert_eq!(end.results.winner, team_of(winner), "{end:?}");
    assert!(!end.session_reason.is_empty(), "{end:?}");
    assert_eq!(
        end.session_results["winner"],
        json!(team_of(winner)),
        "the server hands the game's results on: {end:?}"
    );

    // Play again: back in the queue (after the server has wound the session down).
    b.click("play-again").await?;
    b.until(
        "the queue or the modes",
        Duration::from_secs(5),
        "['queue', 'modes'].includes(document.body.dataset.screen)",
    )
    .await?;
    if b.screen().await? == "queue" {
        b.until(
            "queued again",
            Duration::from_secs(20),
            "document.querySelector('[data-testid=queue-status]').textContent.includes('queued for sprint')",
        )
        .await?;
        b.shot(&format!("{shot}-again")).await?;
        b.click("cancel").await?;
        b.until_screen("modes", Duration::from_secs(5)).await?;
    }

    b.finish().await?;
    drop(stop);
    task.await?;
    server.shutdown().await;
    gateway.shutdown().await;
    sandbox.finish().await
}

/// Reflex's opponent: queues `reflex`, joins through the gateway and taps the right arrow
/// 900 ms after each GO (the page, tapping at once, wins every round); returns how the
/// server said the session ended.
async fn reflex_opponent(server: SocketAddr, name: &str) -> Result<(String, Value)> {
    let (mut play, endpoint, ticket) = matched_opponent(server, name, "reflex").await?;
    let mut game = GameClient::connect_url(&endpoint, Default::default()).await?;
    game.send(&GameRequest::Join { ticket }).await?;
    loop {
        let m: Value = match game.next_item().await {
            berth_client::socket::Incoming::Text(t) => serde_json::from_str(&t)?,
            other => bail!("reflex opponent: expected a line, got {other:?}"),
        };
        match m["type"].as_str() {
            Some("go") => {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let tap = json!({"type": "tap", "n": m["n"], "dir": m["dir"]});
                game.send_text(&tap.to_string()).await?;
            }
            Some("over") => break,
            _ => {}
        }
    }
    loop {
        if let ServerMessage::SessionEnded {
            reason, results, ..
        } = play.recv_within(Duration::from_secs(30)).await?
        {
            return Ok((reason.to_string(), results));
        }
    }
}

/// The page plays Reflex, the Python game, on a phone against a websocket opponent: it shows
/// GO with the arrow, a thumb taps that arrow, the page wins every round and shows the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_plays_reflex_the_python_game() -> Result<()> {
    let tag = "web-reflex";
    let images = vec![berth_testkit::test_game_config("reflex", 1)];
    let sandbox = Sandbox::start_custom(tag, images, &["reflex".to_owned()], |_| {}).await?;
    let (gateway_url, gateway) = start_gateway(&sandbox).await?;
    let server = Server::start(web_config()).await?;
    let (stop, task) = link(&sandbox, &server, &gateway_url);
    let store = server.ctx.store.clone();
    let t0 = Instant::now();
    while !store
        .host(&HostId::new("web-host")?)
        .await?
        .is_some_and(|h| {
            h.state == HostState::Up && h.images.iter().any(|i| i.docked && i.warm >= 1)
        })
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the host never came up with a warm Reflex VM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = Browser::start(
        tag,
        Device::Phone {
            width: 390,
            height: 844,
        },
    )
    .await?;
    b.goto(&format!("http://{}/play", server.addr)).await?;
    sign_in(&b, "web-alice").await?;
    b.click("mode-reflex").await?;
    b.until_screen("queue", Duration::from_secs(5)).await?;
    let bob = tokio::spawn(reflex_opponent(server.addr, "web-bob"));
    b.until_screen("reflex", Duration::from_secs(60)).await?;
    b.shot("reflex-game").await?;
    let mut taps = 0;
    while b.screen().await? == "reflex" && taps < 20 {
        let dir = b
            .js("return document.querySelector('[data-testid=reflex-call]').dataset.dir || ''")
            .await?;
        match dir.as_str() {
            Some(d) if !d.is_empty() => {
                b.click(&format!("tap-{d}")).await?;
                taps += 1;
                b.until(
                    "the round's end",
                    Duration::from_secs(5),
                    "!document.querySelector('[data-testid=reflex-call]').dataset.dir",
                )
                .await?;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    b.until_screen("results", Duration::from_secs(30)).await?;
    b.shot("reflex-results").await?;
    assert_eq!(b.text("outcome").await?, "You win!");
    assert_eq!(
        b.js("return document.querySelector('[data-testid=error]').hidden")
            .await?,
        json!(true),
        "the match's end is no error"
    );
    assert!(b.text("final-score").await?.contains("web-alice 3"));
    let (reason, results) = bob.await??;
    assert_eq!(reason, "first_to");
    assert_eq!(results["winner"], "web-alice");
    assert_eq!(taps, 3, "one tap a round, three rounds");
    b.finish().await?;
    drop(stop);
    task.await?;
    gateway.shutdown().await;
    server.shutdown().await;
    sandbox.finish().await
}
