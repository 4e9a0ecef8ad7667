//! Activation by session id: idempotent (the same session, even concurrently, yields the
//! same VM), a warm clone first, else a clone restored from the docked substrate. Every clone
//! that fails or works is told to `health`, which discards a substrate a clone cannot restore
//! and checks the content of one whose clones keep failing.

use super::{
    new_vm_id, ActivateRequest, ActivationPath, Pool, PoolError, PoolEvent, SessionKeys, VmInfo,
    MAX_TICKET_KEY,
};
use crate::driver::{Ready, Vm, VmSpec};
use crate::util::random_u64;
use berth_protocol::guest::Identity;
use berth_protocol::VmId;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OnceCell;

impl Pool {
    /// Activates a VM for `req.session_id`. The same session id twice returns the same VM
    /// (concurrent callers share one activation).
    pub async fn activate(&self, mut req: ActivateRequest) -> Result<VmInfo, PoolError> {
        if *self.inner.shutdown.borrow() {
            return Err(PoolError::ShuttingDown);
        }
        if req.ticket_key.is_empty() {
            req.ticket_key = (0..4).map(|_| format!("{:016x}", random_u64())).collect();
        } else if req.key().is_none() {
            return Err(PoolError::BadRequest {
                message: format!("ticket_key must be 1 to {MAX_TICKET_KEY} bytes of hex"),
            });
        }
        let cell = {
            let mut st = self.state();
            if self.is_draining() && !st.sessions.contains_key(&req.session_id) {
                return Err(PoolError::Draining);
            }
            st.sessions
                .entry(req.session_id.clone())
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let result = cell
            .get_or_init(|| self.do_activate(req.clone()))
            .await
            .clone();
        if result.is_err() {
            let mut st = self.state();
            if st
                .sessions
                .get(&req.session_id)
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                st.sessions.remove(&req.session_id);
            }
        }
        result
    }

    async fn do_activate(&self, req: ActivateRequest) -> Result<VmInfo, PoolError> {
        let t0 = Instant::now();
        let spec = self.spec(&req.image)?;
        {
            let mut st = self.state();
            let running = st.active.len() as u32 + st.activating;
            if running >= self.inner.config.max_vms {
                return Err(PoolError::AtCapacity {
                    max: self.inner.config.max_vms,
                });
            }
            st.activating += 1;
        }
        let result = self.activate_inner(spec, &req, t0).await;
        self.state().activating -= 1;
        self.inner.wake.notify_one();
        result
    }

    async fn activate_inner(
        &self,
        spec: &VmSpec,
        req: &ActivateRequest,
        t0: Instant,
    ) -> Result<VmInfo, PoolError> {
        let identity = |vm_id: &VmId| Identity {
            session_id: req.session_id.clone(),
            vm_id: vm_id.clone(),
            hostname: format!("berth-{}", vm_id.as_str().trim_start_matches("vm-")),
            players: req.players.clone(),
            teams: req.teams.clone(),
            ticket_key: req.ticket_key.clone(),
            params: req.params.clone(),
            wall_clock_ms: 0,
            rng_seed: random_u64(),
            deadline_ms: req.deadline_ms,
        };
        let ready_timeout = self.inner.config.ready_timeout();
        // Warm first: a paused clone needs only resume + identity.
        let warm = self
            .state()
            .images
            .get_mut(&req.image)
            .and_then(|s| s.warm.pop());
        if let Some(mut vm) = warm {
            let vm_id = vm.id().clone();
            match vm.activate(identity(&vm_id), ready_timeout).await {
                Ok(ready) => return Ok(self.activated(vm, req, ActivationPath::Warm, t0, &ready)),
                Err(e) => {
                    tracing::warn!(%vm_id, error = %e, "warm clone failed to activate; restoring instead");
                    self.clone_failed(&req.image, &e);
                    vm.destroy().await;
                }
            }
        }
        let substrate = self.substrate_of(&req.image)?;
        let vm_id = new_vm_id();
        let mut vm = match self
            .inner
            .driver
            .restore(spec, &substrate, vm_id.clone(), &self.vm_dir(&vm_id))
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                self.clone_failed(&req.image, &e);
                return Err(e.into());
            }
        };
        match vm.activate(identity(&vm_id), ready_timeout).await {
            Ok(ready) => Ok(self.activated(vm, req, ActivationPath::Substrate, t0, &ready)),
            Err(e) => {
                self.clone_failed(&req.image, &e);
                vm.destroy().await;
                Err(e.into())
            }
        }
    }

    fn activated(
        &self,
        vm: Box<dyn Vm>,
        req: &ActivateRequest,
        path: ActivationPath,
        t0: Instant,
        ready: &Ready,
    ) -> VmInfo {
        let skew_ms = ready.guest_clock_ms as i64 - ready.host_clock_ms as i64;
        let info = VmInfo::of(vm.as_ref(), req, path, t0, skew_ms);
        tracing::info!(vm_id = %info.vm_id, session_id = %info.session_id, ?path, activate_us = info.activate_us, "activated");
        self.clone_worked(&req.image);
        self.state().activations += 1;
        let keys = SessionKeys {
            // Checked in `activate`.
            key: req.key().unwrap_or_default(),
            players: req.players.clone(),
        };
        self.register(vm, info.clone(), keys);
        self.emit(PoolEvent::Activated { vm: info.clone() });
        info
    }
}
