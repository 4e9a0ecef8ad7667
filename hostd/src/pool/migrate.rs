//! Live migration of an active session between hosts. The target prepares a clone of its
//! docked substrate that listens for the migration stream ([`Pool::receive`]); the source
//! sends the running VM there ([`Pool::send`], done by the VM's owner task); the target then
//! runs it as its own ([`Incoming::finish`]). A migration that fails leaves the VM running on
//! the source; a receiving VM that is never finished is destroyed with its [`Incoming`].

use super::{
    ActivateRequest, ActivationPath, Pool, PoolError, PoolEvent, SessionKeys, VmCommand, VmInfo,
};
use crate::driver::{Migrated, Vm};
use berth_protocol::SessionId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OnceCell};

/// A VM waiting here for a session migrated from a peer; destroyed on drop unless finished.
pub struct Incoming {
    pool: Pool,
    vm: Option<Box<dyn Vm>>,
    req: ActivateRequest,
    t0: Instant,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("session_id", &self.req.session_id)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Prepares to take `req`'s session, migrated live from a peer: a clone of this host's
    /// docked substrate of `req.image`, listening on `listen` for the migration stream.
    pub async fn receive(
        &self,
        req: ActivateRequest,
        listen: SocketAddr,
    ) -> Result<Incoming, PoolError> {
        if *self.inner.shutdown.borrow() {
            return Err(PoolError::ShuttingDown);
        }
        if self.is_draining() {
            return Err(PoolError::Draining);
        }
        if req.key().is_none() {
            return Err(PoolError::BadRequest {
                message: "a migrated session needs its ticket key".into(),
            });
        }
        let spec = self.spec(&req.image)?;
        {
            let st = self.state();
            if st.active.len() as u32 + st.activating >= self.inner.config.max_vms {
                return Err(PoolError::AtCapacity {
                    max: self.inner.config.max_vms,
                });
            }
            if st.sessions.contains_key(&req.session_id) {
                return Err(PoolError::BadRequest {
                    message: format!("session {} already runs here", req.session_id),
                });
            }
        }
        let substrate = self.substrate_of(&req.image)?;
        let t0 = Instant::now();
        let vm_id = super::new_vm_id();
        let vm = self
            .inner
            .driver
            .receive(
                spec,
                &substrate,
                vm_id.clone(),
                &self.vm_dir(&vm_id),
                listen,
            )
            .await?;
        Ok(Incoming {
            pool: self.clone(),
            vm: Some(vm),
            req,
            t0,
        })
    }

    /// Live-migrates `session`'s VM to a peer's [`Incoming`] listening at `to`. `Ok`: the VM
    /// left this host (its players are told `session_moved`); `Err`: it plays on here.
    pub async fn send(&self, session: &SessionId, to: SocketAddr) -> Result<Migrated, PoolError> {
        let cmd = {
            let st = self.state();
            st.active
                .values()
                .find(|a| &a.info.session_id == session)
                .map(|a| a.cmd.clone())
        };
        let unknown = || PoolError::Unknown {
            id: session.to_string(),
        };
        let cmd = cmd.ok_or_else(unknown)?;
        let (reply, answer) = oneshot::channel();
        cmd.send(VmCommand::Migrate { to, reply })
            .await
            .map_err(|_| unknown())?;
        Ok(answer.await.map_err(|_| unknown())??)
    }
}

impl Pool {
    /// [`Pool::receive`] on this host's peer address (`[peer]`): a free port on its `listen`
    /// address; the address peers reach it at (`advertise`'s name, or the bound IP, with
    /// that port) is returned with it.
    pub async fn receive_on_peer(
        &self,
        req: ActivateRequest,
    ) -> Result<(Incoming, String), PoolError> {
        let peer = self
            .inner
            .config
            .peer
            .as_ref()
            .ok_or_else(|| PoolError::BadRequest {
                message: "this host has no [peer] address: it cannot take migrated sessions".into(),
            })?;
        let port = std::net::TcpListener::bind((peer.listen.ip(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| PoolError::Driver {
                code: "migration_failed".into(),
                message: format!("finding a port on {}: {e}", peer.listen.ip()),
            })?
            .port();
        let listen = SocketAddr::new(peer.listen.ip(), port);
        let host = match &peer.advertise {
            Some(a) => a
                .rsplit_once(':')
                .map_or(a.as_str(), |(h, p)| {
                    if p.parse::<u16>().is_ok() {
                        h
                    } else {
                        a.as_str()
                    }
                })
                .to_owned(),
            None => peer.listen.ip().to_string(),
        };
        let incoming = self.receive(req, listen).await?;
        Ok((incoming, format!("{host}:{port}")))
    }
}

impl Incoming {
    /// Waits (within `timeout`) for the migrated VM to be in, then runs it here as the
    /// session's VM. `Err`: nothing of it is left.
    pub async fn finish(mut self, timeout: Duration) -> Result<VmInfo, PoolError> {
        let mut vm = self.vm.take().expect("an unfinished Incoming holds its VM");
        let req = &self.req;
        let serving = (
            req.session_id.clone(),
            req.players.clone(),
            req.ticket_key.clone(),
        );
        if let Err(e) = vm.finish_receive(serving, timeout).await {
            vm.destroy().await;
            return Err(e.into());
        }
        let info = VmInfo::of(vm.as_ref(), req, ActivationPath::Migrated, self.t0, 0);
        let keys = SessionKeys {
            key: req.key().unwrap_or_default(),
            players: req.players.clone(),
        };
        // An `activate` for this session (the server's, again) finds this VM.
        let cell = Arc::new(OnceCell::new_with(Some(Ok(info.clone()))));
        self.pool
            .state()
            .sessions
            .insert(req.session_id.clone(), cell);
        self.pool.register(vm, info.clone(), keys);
        tracing::info!(vm_id = %info.vm_id, session_id = %info.session_id, "moved here from a peer");
        self.pool.emit(PoolEvent::MigratedIn { vm: info.clone() });
        Ok(info)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            tokio::spawn(vm.destroy());
        }
    }
}
