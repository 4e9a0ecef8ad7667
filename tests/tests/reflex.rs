//! The second game, Reflex (`games/reflex`: Python 3 from Debian's packages, standard library
//! only, on the documented HTTP SDK), on the whole stack with real VMs: its substrate is
//! primed (the interpreter's imports and its loading work paid once), two players queue for
//! `reflex`, are matched onto an activated VM, play a whole match through the host's gateway,
//! and both hear the game's results; the VM is gone after and nothing is left behind.

use anyhow::{bail, ensure, Context, Result};
use berth_client::socket::{ConnectOptions, Incoming};
use berth_client::{PlayClient, PlayConfig};
use berth_protocol::game::GameRequest;
use berth_protocol::play::ServerMessage;
use berth_testkit::{GameWs, Stack, StackOptions};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

async fn player(stack: &Stack, name: &str) -> Result<PlayClient> {
    let url = format!("ws://{}/v1/play", stack.server.addr);
    Ok(PlayClient::connect(PlayConfig::new(url, stack.token(name)?)).await?)
}

/// `matched`: the gateway's address and this player's ticket.
async fn matched(c: &mut PlayClient) -> Result<(String, String)> {
    match c
        .until(WAIT, |m| !matches!(m, ServerMessage::QueueStatus { .. }))
        .await?
    {
        ServerMessage::Matched {
            endpoint, ticket, ..
        } => Ok((endpoint, ticket)),
        other => bail!("expected matched, got {other:?}"),
    }
}

/// The next JSON line the game sent (binary frames and garbage are failures).
async fn line(ws: &mut GameWs) -> Result<Value> {
    match tokio::time::timeout(WAIT, ws.next_item()).await? {
        Incoming::Text(t) => Ok(serde_json::from_str(&t).with_context(|| t.clone())?),
        other => bail!("expected a line from the game, got {other:?}"),
    }
}

/// Plays a whole match as `me`: taps the right direction `delay` after each `go`. Returns
/// the game's `over` message and every `point`.
async fn play(mut ws: GameWs, me: &str, delay: Duration) -> Result<(Value, Vec<Value>)> {
    let welcome = line(&mut ws).await?;
    ensure!(
        welcome["type"] == "welcome" && welcome["game"] == "reflex" && welcome["player"] == me,
        "{me}: {welcome}"
    );
    let mut points = Vec::new();
    loop {
        let m = line(&mut ws).await?;
        match m["type"].as_str() {
            Some("go") => {
                tokio::time::sleep(delay).await;
                let tap = json!({"type": "tap", "n": m["n"], "dir": m["dir"]});
                ws.send_text(&tap.to_string()).await?;
            }
            Some("point") => points.push(m),
            Some("over") => return Ok((m, points)),
            Some("round" | "waiting") => {}
            _ => bail!("{me}: unexpected {m}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_players_play_a_whole_reflex_match_on_the_python_game() -> Result<()> {
    let mut o = StackOptions::ephemeral(1, "reflex");
    o.game = "reflex".into();
    o.image_dir = berth_testkit::fixtures::workspace().join("target/images/reflex");
    let stack = Stack::start(o).await?;
    let result = a_match(&stack).await;
    let state_dir = stack.state_dir.clone();
    stack.shutdown().await;
    berth_testkit::assert_nothing_left(&state_dir)?;
    result
}

async fn a_match(stack: &Stack) -> Result<()> {
    let img = &stack.pool.status().images[0];
    ensure!(
        img.substrate == berth_protocol::codes::SubstrateState::Docked,
        "the Python game's substrate is docked: {img:?}"
    );
    let mut alice = player(stack, "alice").await?;
    let mut bob = player(stack, "bob").await?;
    alice
        .send(&berth_testkit::player::queue("reflex", "eu"))
        .await?;
    bob.send(&berth_testkit::player::queue("reflex", "eu"))
        .await?;
    let (endpoint, alice_ticket) = matched(&mut alice).await?;
    let (_, bob_ticket) = matched(&mut bob).await?;

    let mut games = Vec::new();
    for ticket in [&alice_ticket, &bob_ticket] {
        let mut ws = GameWs::connect_url(&endpoint, ConnectOptions::default()).await?;
        ws.send(&GameRequest::Join {
            ticket: ticket.clone(),
        })
        .await?;
        games.push(ws);
    }
    let bob_ws = games.pop().context("bob")?;
    let alice_ws = games.pop().context("alice")?;
    // Alice is quick, Bob slow: Alice wins every round on speed.
    let (a, b) = tokio::join!(
        play(alice_ws, "alice", Duration::ZERO),
        play(bob_ws, "bob", Duration::from_millis(600))
    );
    let ((over_a, points), (over_b, _)) = (a?, b?);
    assert_eq!(over_a, over_b, "both hear the same end");
    assert_eq!(over_a["winner"], "alice");
    assert_eq!(over_a["why"], "first_to");
    assert_eq!(over_a["score"], json!({"alice": 3, "bob": 0}));
    assert_eq!(points.len(), 3, "{points:?}");
    for p in &points {
        assert_eq!(
            (&p["winner"], &p["why"]),
            (&json!("alice"), &json!("fastest"))
        );
    }

    for c in [&mut alice, &mut bob] {
        match c
            .until(WAIT, |m| matches!(m, ServerMessage::SessionEnded { .. }))
            .await?
        {
            ServerMessage::SessionEnded {
                reason, results, ..
            } => {
                assert_eq!(reason.to_string(), "first_to");
                assert_eq!(results["winner"], "alice");
                assert_eq!(results["score"], json!({"alice": 3, "bob": 0}));
                assert_eq!(results["rounds"], 3);
                assert!(results["best_ms"]["alice"].as_u64().is_some(), "{results}");
            }
            other => bail!("expected session_ended, got {other:?}"),
        }
    }
    for _ in 0..100 {
        if stack.pool.status().vms.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the match's VM is still there: {:?}",
        stack.pool.status().vms
    )
}
