//! The one owner of each active VM: a task that waits on the VM's events (game over, the
//! process gone, agent silence) or a destroy command, and is the only place the VM is
//! destroyed; it tells the gateway first, then forgets the VM, then announces what happened.

use super::{Active, Failure, Pool, PoolEvent, SessionKeys, VmCommand, VmInfo};
use crate::driver::{Vm, VmEvent};
use crate::util::now_ms;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

impl Pool {
    /// Books `vm` as active (serving `info.session_id`, gated by `keys`) and hands it to its
    /// owner task.
    pub(super) fn register(&self, vm: Box<dyn Vm>, info: VmInfo, keys: SessionKeys) {
        let (tx, rx) = mpsc::channel(4);
        let (ending_tx, ending) = watch::channel(false);
        self.state().active.insert(
            info.vm_id.clone(),
            Active {
                info: info.clone(),
                cmd: tx,
                keys,
                ending,
            },
        );
        tokio::spawn(vm_task(self.clone(), vm, info, rx, ending_tx));
    }
}

/// How long a VM whose game ended keeps running before it is destroyed.
const END_GRACE: Duration = Duration::from_millis(500);

/// The one owner of an active VM.
async fn vm_task(
    pool: Pool,
    mut vm: Box<dyn Vm>,
    info: VmInfo,
    mut cmd: mpsc::Receiver<VmCommand>,
    ending: watch::Sender<bool>,
) {
    let silence = pool.inner.config.agent_silence();
    let mut reply = None;
    let event = tokio::select! {
        c = cmd.recv() => {
            if let Some(VmCommand::Destroy(tx)) = c { reply = Some(tx); }
            None
        }
        e = vm.event(silence) => Some(e),
    };
    // Before anything goes: the gateway closes the session's players with `game_over`, not
    // as if the game had just dropped them.
    ending.send_replace(true);
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
