//! Adoption after a restart: the VMs an earlier hostd left running are taken over (QMP and
//! agent sockets re-connected, the session's players and ticket key read back from the VM's
//! record); anything else in the VM folder is killed and removed.

use super::{ActivationPath, Pool, SessionCell, SessionKeys, VmInfo};
use crate::driver::VmRecord;
use std::sync::Arc;
use tokio::sync::OnceCell;

impl Pool {
    /// Adopts or cleans every `vms/*` folder an earlier hostd left.
    pub(super) async fn adopt_leftovers(&self) {
        let vms = self.inner.config.state_dir.join("vms");
        let Ok(entries) = std::fs::read_dir(&vms) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let dir = entry.path();
            let Some(record) = VmRecord::load(&dir) else {
                // A clone hostd was making when it died: its QEMU may run without a record.
                tracing::warn!(dir = %dir.display(), "removing a VM folder without a record");
                crate::util::kill_processes_naming(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            match self.inner.driver.adopt(&record, &dir).await {
                Ok(vm) => match (
                    &record.session_id,
                    self.inner.specs.contains_key(&record.image),
                ) {
                    (Some(session_id), true) => {
                        tracing::info!(vm_id = %record.vm_id, %session_id, "adopted a running VM");
                        let info = VmInfo {
                            vm_id: record.vm_id.clone(),
                            image: record.image.clone(),
                            session_id: session_id.clone(),
                            game_addr: vm.game_addr(),
                            pid: vm.pid(),
                            path: ActivationPath::Adopted,
                            activated_ms: record.created_ms,
                            activate_us: 0,
                            clock_skew_ms: 0,
                        };
                        let cell: SessionCell =
                            Arc::new(OnceCell::new_with(Some(Ok(info.clone()))));
                        self.state().sessions.insert(session_id.clone(), cell);
                        let key = hex::decode(&record.ticket_key).unwrap_or_default();
                        if key.is_empty() {
                            tracing::warn!(vm_id = %record.vm_id, %session_id,
                                "adopted VM has no ticket key on record; the gateway refuses its players");
                        }
                        let keys = SessionKeys {
                            key,
                            players: record.players.clone(),
                        };
                        self.register(vm, info, keys);
                    }
                    _ => {
                        tracing::info!(vm_id = %record.vm_id, "destroying a leftover VM with no session");
                        vm.destroy().await;
                    }
                },
                Err(e) => {
                    tracing::warn!(vm_id = %record.vm_id, error = %e, "leftover VM is gone; cleaning up");
                    crate::util::kill_processes_naming(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }
}
