//! The one owner of each active VM: a task that waits on the VM's events (game over, the
//! process gone, agent silence) or a destroy command, and is the only place the VM is
//! destroyed; it tells the gateway first, then forgets the VM, then announces what happened.
//! It is also where the VM is migrated to a peer host (a command): the VM runs on if that
//! fails, and goes (moved, its players told `session_moved`) if it worked.

use super::{Active, Failure, Pool, PoolEvent, SessionKeys, VmCommand, VmInfo};
use crate::driver::{DriverError, Migrated, Vm, VmEvent};
use crate::util::now_ms;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

impl Pool {
    /// Books `vm` as active (serving `info.session_id`, gated by `keys`) and hands it to its
    /// owner task.
    pub(super) fn register(&self, vm: Box<dyn Vm>, info: VmInfo, keys: SessionKeys) {
        let (tx, rx) = mpsc::channel(4);
        let (ending_tx, ending) = watch::channel(false);
        let moved = Arc::new(AtomicBool::new(false));
        self.state().active.insert(
            info.vm_id.clone(),
            Active {
                info: info.clone(),
                cmd: tx,
                keys,
                ending,
                moved: moved.clone(),
            },
        );
        let ending = Ending {
            tx: ending_tx,
            moved,
        };
        tokio::spawn(vm_task(self.clone(), vm, info, rx, ending));
    }
}

/// How long a VM whose game ended keeps running before it is destroyed.
const END_GRACE: Duration = Duration::from_millis(500);

/// What the gateway watches of a VM's going: that it goes, and whether it moved.
struct Ending {
    tx: watch::Sender<bool>,
    moved: Arc<AtomicBool>,
}

/// Why a VM's owner lets it go.
enum Going {
    /// Its event: game over, or a failure.
    Event(VmEvent),
    /// `destroy` asked, with who waits for it.
    Destroy(Option<oneshot::Sender<()>>),
    /// It moved to a peer host running, and who asked.
    Moved(Migrated, oneshot::Sender<Result<Migrated, DriverError>>),
}

/// Waits for the VM's next event or a command; a migration that fails leaves it running here
/// and waiting again.
async fn next_going(
    pool: &Pool,
    vm: &mut Box<dyn Vm>,
    cmd: &mut mpsc::Receiver<VmCommand>,
) -> Going {
    let silence = pool.inner.config.agent_silence();
    loop {
        let command = tokio::select! {
            c = cmd.recv() => c,
            e = vm.event(silence) => return Going::Event(e),
        };
        match command {
            None => return Going::Destroy(None),
            Some(VmCommand::Destroy(tx)) => return Going::Destroy(Some(tx)),
            Some(VmCommand::Migrate { to, reply }) => {
                let limits = &pool.inner.config;
                match vm
                    .send_to(to, MIGRATION_DOWNTIME, limits.ready_timeout())
                    .await
                {
                    Ok(m) => return Going::Moved(m, reply),
                    Err(e) => {
                        tracing::warn!(vm_id = %vm.id(), error = %e, "migration failed; the VM plays on here");
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }
}

/// The pause a live migration aims at (QEMU's `downtime-limit`).
const MIGRATION_DOWNTIME: Duration = Duration::from_millis(30);

/// The one owner of an active VM.
async fn vm_task(
    pool: Pool,
    mut vm: Box<dyn Vm>,
    info: VmInfo,
    mut cmd: mpsc::Receiver<VmCommand>,
    ending: Ending,
) {
    let (event, reply, moved) = match next_going(&pool, &mut vm, &mut cmd).await {
        Going::Event(e) => (Some(e), None, None),
        Going::Destroy(tx) => (None, tx, None),
        Going::Moved(m, tx) => (None, None, Some((m, tx))),
    };
    // Before anything goes: the gateway closes the session's players with `game_over` (or
    // `session_moved`), not as if the game had just dropped them.
    ending.moved.store(moved.is_some(), Ordering::Release);
    ending.tx.send_replace(true);
    if matches!(event, Some(VmEvent::Ended { .. })) {
        // Let the last answers to players leave the VM before it goes.
        tokio::time::sleep(END_GRACE).await;
    }
    // Destroy and forget the VM first, so that whoever sees the event sees a consistent pool.
    vm.destroy().await;
    let announce = match event {
        Some(VmEvent::Ended { reason, results }) => {
            tracing::info!(vm_id = %info.vm_id, %reason, "game ended");
            Some(PoolEvent::Ended {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                reason,
                results,
            })
        }
        Some(failure) => {
            let (code, reason) = match failure {
                VmEvent::Exited { status } => {
                    ("vm_exited", format!("the VM process exited: {status}"))
                }
                VmEvent::Silent { for_ms } => (
                    "agent_silent",
                    format!("no heartbeat from the agent for {for_ms} ms"),
                ),
                VmEvent::Ended { .. } => unreachable!("matched above"),
            };
            tracing::warn!(vm_id = %info.vm_id, code, %reason, "VM failed");
            let mut st = pool.state();
            st.failures.push_back(Failure {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                code: code.into(),
                reason: reason.clone(),
                at_ms: now_ms(),
            });
            while st.failures.len() > 100 {
                st.failures.pop_front();
            }
            Some(PoolEvent::Failed {
                vm_id: info.vm_id.clone(),
                session_id: info.session_id.clone(),
                code: code.into(),
                reason,
            })
        }
        None => None,
    };
    {
        let mut st = pool.state();
        st.active.remove(&info.vm_id);
        st.sessions.remove(&info.session_id);
    }
    if let Some((migrated, tx)) = moved {
        tracing::info!(vm_id = %info.vm_id, session_id = %info.session_id, ?migrated, "moved to a peer");
        pool.emit(PoolEvent::MigratedOut {
            vm_id: info.vm_id.clone(),
            session_id: info.session_id.clone(),
            migrated,
        });
        let _ = tx.send(Ok(migrated));
        // The session lives on at the peer: no `destroyed` for it.
        pool.inner.wake.notify_one();
        return;
    }
    if let Some(e) = announce {
        // On disk before anyone hears of it: the results outlive any outage until recorded.
        if let Some(report) = e.report() {
            pool.inner.outbox.put(&report);
        }
        pool.emit(e);
    }
    pool.emit(PoolEvent::Destroyed {
        vm_id: info.vm_id.clone(),
        session_id: info.session_id.clone(),
    });
    pool.inner.wake.notify_one();
    if let Some(tx) = reply {
        let _ = tx.send(());
    }
}
