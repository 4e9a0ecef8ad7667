//! hostd's outbox: the `ended` and `failed` reports of VMs that are gone, kept on disk in
//! `<state_dir>/outbox/<session>.json` from the moment the pool announces them until the server
//! answers `recorded`.
//!
//! The link sends each report live, again in the `outbox` of every `register`, and again every
//! few heartbeats while no `recorded` came; the server records each once. So a game's results
//! survive an outage of the link, a server replica, the store, or hostd itself (the folder
//! outlives the process, and is left in place by a clean stop while it holds anything).

use berth_protocol::host::HostMessage;
use berth_protocol::SessionId;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The reports not yet acknowledged; cheap to clone (a folder path).
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
    /// Only a host linked to a server keeps reports: without a link nobody would take them.
    enabled: Arc<AtomicBool>,
}

impl Outbox {
    pub fn new(state_dir: &Path) -> Self {
        Outbox {
            dir: state_dir.join("outbox"),
            enabled: Arc::default(),
        }
    }

    /// Keep reports from now on (the link calls this when it starts).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    // Session ids hold no path separators (see `berth_protocol::ids`): a safe file name.
    fn path(&self, session: &SessionId) -> PathBuf {
        self.dir.join(format!("{session}.json"))
    }

    /// Keeps `report` (an `ended` or `failed`) until [`Outbox::remove`]; other messages are
    /// not reports and are not kept.
    pub fn put(&self, report: &HostMessage) {
        let Some(session) = session_of(report) else {
            return;
        };
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let path = self.path(session);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(report).expect("host messages always serialize");
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::error!(session_id = %session, error = %e, "keeping a report in the outbox");
        }
    }

    /// The server recorded `session`'s report (or never will).
    pub fn remove(&self, session: &SessionId) {
        let _ = std::fs::remove_file(self.path(session));
    }

    /// Every report kept, oldest session id first; a file that is not one is removed.
    pub fn pending(&self) -> Vec<HostMessage> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut out = Vec::new();
        for path in paths {
            let report = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<HostMessage>(&b).ok())
                .filter(|m| session_of(m).is_some());
            match report {
                Some(m) => out.push(m),
                None => {
                    tracing::warn!(file = %path.display(), "removing an unreadable outbox file");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// Removes the folder if it is empty (a clean stop); a folder with reports stays.
    pub fn tidy(&self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn session_of(m: &HostMessage) -> Option<&SessionId> {
    match m {
        HostMessage::Ended { session, .. } | HostMessage::Failed { session, .. } => Some(session),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::VmId;

    fn ended(session: &str) -> HostMessage {
        HostMessage::Ended {
            session: SessionId::new(session).expect("id"),
            vm: VmId::new("vm-1").expect("id"),
            reason: "score".into(),
            results: serde_json::json!({"winner": "a"}),
        }
    }

    #[test]
    fn reports_are_kept_until_removed_and_survive_a_new_outbox_on_the_same_folder() {
        let dir = std::env::temp_dir().join(format!("berth-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let outbox = Outbox::new(&dir);
        outbox.put(&ended("s-off"));
        assert!(!dir.exists(), "a host without a link keeps nothing");
        outbox.enable();
        assert!(outbox.pending().is_empty(), "no folder: nothing pending");
        outbox.put(&ended("s-b"));
        outbox.put(&ended("s-a"));
        outbox.put(&HostMessage::Heartbeat {
            images: vec![],
            draining: false,
        });
        std::fs::write(dir.join("outbox/junk.json"), "{not json").expect("write");
        // A restarted hostd reads the same folder.
        let again = Outbox::new(&dir);
        assert_eq!(again.pending(), vec![ended("s-a"), ended("s-b")]);
        assert!(!dir.join("outbox/junk.json").exists(), "junk removed");
        again.remove(&SessionId::new("s-a").expect("id"));
        assert_eq!(again.pending(), vec![ended("s-b")]);
        again.tidy();
        assert!(
            dir.join("outbox").exists(),
            "a folder holding reports stays"
        );
        again.remove(&SessionId::new("s-b").expect("id"));
        again.tidy();
        assert!(!dir.join("outbox").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
