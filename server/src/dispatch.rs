//! The replica's event loop: turns events from every replica (through the store) into
//! messages on the sockets this replica holds.

use crate::model::{Event, SessionState};
use crate::standing::session_message;
use crate::state::{lock, Ctx};
use crate::wire::close;
use berth_protocol::host::ServerToHost;
use berth_protocol::play::ServerMessage;
use tokio::sync::broadcast::error::RecvError;

pub async fn run(ctx: Ctx) {
    let mut events = ctx.store.subscribe();
    loop {
        match events.recv().await {
            Ok(e) => {
                if let Err(err) = handle(&ctx, e).await {
                    tracing::warn!(error = %err, "handling event");
                }
            }
            Err(RecvError::Lagged(n)) => {
                // State lives in the store and the sweeper re-drives placement: what was
                // missed here is notification, which every player socket re-reads.
                tracing::warn!(missed = n, "event receiver lagged");
                resync(&ctx);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Every socket here compares what it told its peer with the store: players where they
/// stand, hosts what their sessions still need.
fn resync(ctx: &Ctx) {
    let players: Vec<_> = lock(&ctx.registry.players).values().cloned().collect();
    let hosts: Vec<_> = lock(&ctx.registry.hosts).values().cloned().collect();
    tracing::info!(
        players = players.len(),
        hosts = hosts.len(),
        "events may be missed: re-reading the store"
    );
    for p in players {
        p.recheck();
    }
    for h in hosts {
        h.recheck();
    }
}

async fn handle(ctx: &Ctx, e: Event) -> Result<(), crate::store::StoreError> {
    match e {
        Event::QueueChanged { pool } => {
            let _ = ctx.matcher.send(pool);
        }
        Event::Dequeued {
            player,
            ticket,
            reason,
        } => {
            if let Some(c) = ctx.registry.player(&player) {
                c.send(ServerMessage::Dequeued {
                    ticket,
                    reason: reason.into(),
                });
            }
        }
        Event::Session { session, state } => {
            if !matches!(
                state,
                SessionState::Active | SessionState::Ending | SessionState::Ended
            ) {
                return Ok(());
            }
            let Some(s) = ctx.store.session(&session).await? else {
                return Ok(());
            };
            let local: Vec<_> = {
                let players = lock(&ctx.registry.players);
                s.players
                    .iter()
                    .filter_map(|p| players.get(p).map(|c| (p.clone(), c.clone())))
                    .collect()
            };
            for (p, c) in local {
                if let Some(m) = session_message(ctx, &s, &p, Some(state)) {
                    c.send(m);
                }
            }
        }
        Event::Place { host, session } => {
            let Some(c) = ctx.registry.host_conn(&host) else {
                return Ok(());
            };
            let Some(s) = ctx.store.session(&session).await? else {
                return Ok(());
            };
            if s.state != SessionState::Activating || s.host.as_ref() != Some(&host) {
                return Ok(());
            }
            c.send(s.activate_message());
        }
        Event::Receive { host, session } => {
            let Some(c) = ctx.registry.host_conn(&host) else {
                return Ok(());
            };
            let Some(s) = ctx.store.session(&session).await? else {
                return Ok(());
            };
            if s.migration.as_ref().is_some_and(|m| m.to == host) {
                c.send(crate::migration::receive_message(&s));
            }
        }
        Event::Send { host, session, to } => {
            if let Some(c) = ctx.registry.host_conn(&host) {
                c.send(ServerToHost::Send { session, to });
            }
        }
        Event::Destroy { host, session } => {
            if let Some(c) = ctx.registry.host_conn(&host) {
                c.send(ServerToHost::Destroy { session });
            }
        }
        Event::Share {
            host,
            image,
            grant,
            ttl_ms,
        } => {
            if let Some(c) = ctx.registry.host_conn(&host) {
                c.send(ServerToHost::ShareSubstrate {
                    image,
                    grant,
                    ttl_ms,
                });
            }
        }
        Event::Resync => resync(ctx),
        Event::PlayerConnected { player, conn } => {
            let old = {
                let players = lock(&ctx.registry.players);
                players.get(&player).filter(|c| c.id != conn).cloned()
            };
            if let Some(c) = old {
                c.close(close::CONFLICT, "replaced");
            }
        }
    }
    Ok(())
}
