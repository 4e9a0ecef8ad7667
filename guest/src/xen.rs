//! The agent's link to hostd over XenStore, for the Xen driver (the `xen` cargo feature).
//!
//! Runs for real in the nested-Xen tier of `cargo xtask test` (a PV guest under Xen 4.17 in
//! QEMU TCG, hostd's xen driver in dom0); the unit tests below cover the routing of agent
//! messages to keys, the encoding of values and the two bridge loops against an in-memory
//! XenStore.
//!
//! Under Xen there is no virtio-serial port. hostd and the agent meet in keys under the
//! domain's own XenStore directory, which the agent names by *relative* paths: xenbus resolves
//! them against `/local/domain/<domid>/`, so they follow the domain across `xl save`/`xl
//! restore`, which gives it a new domid.
//!
//! The keys, their limits and the encoding of a value are [`berth_protocol::xenstore`]'s,
//! shared with hostd's Xen driver.
//!
//! The agent itself ([`crate::agent::Agent`]) is unchanged: [`open_port`] hands it one end of
//! a socket pair as its "port", and two threads bridge the other end to XenStore — one polls
//! the identity key and writes it to the agent as a line ([`deliver_identity`]), one turns each
//! line the agent writes into a key ([`publish`]). Each thread has its own xenbus connection
//! (`xenstore_rs::unix::XsUnix` is blocking and not `Sync`). The blocking client has no
//! watches, so the identity key is polled every [`IDENTITY_POLL`]; after the identity has been
//! delivered that thread ends, so an activated VM polls nothing.
//!
//! [`run`] is the Xen counterpart of [`crate::run`]; `main.rs` takes it when [`selected`]
//! (hostd's Xen driver puts `BERTH_TRANSPORT=xen` on the kernel command line, which the kernel
//! hands to `/init` as an environment variable). The guest kernel needs `/dev/xen/xenbus`
//! (devtmpfs creates it when the kernel has Xen guest support built in, as Debian's do).

use crate::{Config, GuestError};
use berth_protocol::guest::{decode_line, GuestToHost, Line, LineBuffer};
use berth_protocol::xenstore::{value_line, value_of};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use xenstore_rs::Xs;

pub use berth_protocol::xenstore::{
    key_for, max_value_len, EVENT_KEY, IDENTITY_KEY, INITIALISED_KEY, PAYLOAD_MAX, READY_KEY,
};

/// How often the identity key is read while waiting for activation.
pub const IDENTITY_POLL: Duration = Duration::from_millis(10);

/// How often a failed XenStore write is tried (xenbus may refuse briefly around a restore).
const WRITE_ATTEMPTS: u32 = 20;
const WRITE_RETRY: Duration = Duration::from_millis(50);

/// True when the kernel command line asked for the XenStore transport.
pub fn selected() -> bool {
    std::env::var("BERTH_TRANSPORT").is_ok_and(|v| v == "xen")
}

/// Encodes `msg` as the value of `key` (its JSON line without the newline), within XenStore's
/// limit: an `ended` whose results do not fit keeps its reason and says how many bytes of
/// results were dropped; an `error` whose message does not fit is cut short. Other messages
/// are small by construction.
pub fn fit_value(msg: &GuestToHost, key: &str) -> String {
    let max = max_value_len(key);
    let value = value_of(msg);
    if value.len() <= max {
        return value;
    }
    match msg {
        GuestToHost::Ended {
            session_id,
            reason,
            results,
        } => value_of(&GuestToHost::Ended {
            session_id: session_id.clone(),
            reason: reason.chars().take(256).collect(),
            results: serde_json::json!({ "truncated_bytes": results.to_string().len() }),
        }),
        GuestToHost::Error { code, message } => {
            let mut message = message.clone();
            while !message.is_empty()
                && value_of(&GuestToHost::Error {
                    code: code.clone(),
                    message: message.clone(),
                })
                .len()
                    > max
            {
                let cut = message.len().saturating_sub(64);
                let mut at = cut;
                while !message.is_char_boundary(at) {
                    at -= 1;
                }
                message.truncate(at);
            }
            value_of(&GuestToHost::Error {
                code: code.clone(),
                message,
            })
        }
        _ => value,
    }
}

/// Decides what each agent line becomes in XenStore.
///
/// There is one `event` key for heartbeats and `ended`, and hostd polls it, so an `ended`
/// must not be overwritten by the next heartbeat: once one is written, heartbeats are dropped.
#[derive(Debug, Default)]
pub struct Router {
    ended: bool,
}

impl Router {
    /// The key and value for one line the agent wrote; `None` to drop it.
    pub fn route(&mut self, line: &[u8]) -> Option<(&'static str, String)> {
        let msg = match decode_line::<GuestToHost>(line) {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("berth-guest: xen: dropping a bad agent line: {e}");
                return None;
            }
        };
        match msg {
            GuestToHost::Heartbeat { .. } if self.ended => return None,
            GuestToHost::Ended { .. } => self.ended = true,
            _ => {}
        }
        let key = key_for(&msg);
        Some((key, fit_value(&msg, key)))
    }
}

/// Reads the identity key once: `Ok(None)` while it is absent or empty.
pub fn read_identity<X: Xs>(xs: &X) -> io::Result<Option<Vec<u8>>> {
    match xs.read(IDENTITY_KEY) {
        Ok(value) => Ok(value_line(&value)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Polls the identity key every `poll` until it holds a value, writes it to the agent as one
/// line and returns. Read errors (xenbus around a restore) are retried, at most once a second.
pub fn deliver_identity<X: Xs>(
    xs: &X,
    to_agent: &mut impl Write,
    poll: Duration,
) -> io::Result<()> {
    let mut last_error: Option<Instant> = None;
    loop {
        match read_identity(xs) {
            Ok(Some(line)) => return to_agent.write_all(&line),
            Ok(None) => std::thread::sleep(poll),
            Err(e) => {
                if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    eprintln!("berth-guest: xen: reading {IDENTITY_KEY}: {e}");
                    last_error = Some(Instant::now());
                }
                std::thread::sleep(poll.max(Duration::from_secs(1)));
            }
        }
    }
}

fn write_retrying<X: Xs>(xs: &X, key: &str, value: &str) -> io::Result<()> {
    let mut attempt = 1;
    loop {
        match xs.write(key, value) {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= WRITE_ATTEMPTS => return Err(e),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(WRITE_RETRY);
            }
        }
    }
}

/// Turns every line the agent writes into its key, until the agent's end closes.
pub fn publish<X: Xs>(xs: &X, mut from_agent: impl Read) -> io::Result<()> {
    let mut lines = LineBuffer::default();
    let mut router = Router::default();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match from_agent.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        lines.push(&chunk[..n], &mut out);
        for line in out {
            let Line::Complete(line) = line else {
                eprintln!("berth-guest: xen: dropping an oversize agent line");
                continue;
            };
            if let Some((key, value)) = router.route(&line) {
                if let Err(e) = write_retrying(xs, key, &value) {
                    eprintln!("berth-guest: xen: writing {key}: {e}");
                }
            }
        }
    }
}

/// Connects the agent to XenStore: returns the agent's end of a socket pair and starts the two
/// bridge threads on the other end.
pub fn open_port() -> Result<File, GuestError> {
    use xenstore_rs::unix::XsUnix;
    let (agent_end, bridge_end) = UnixStream::pair().map_err(GuestError::Port)?;
    let identity_xs = XsUnix::new().map_err(GuestError::Port)?;
    let publish_xs = XsUnix::new().map_err(GuestError::Port)?;
    let mut to_agent = bridge_end.try_clone().map_err(GuestError::Port)?;
    std::thread::Builder::new()
        .name("xs-identity".into())
        .spawn(move || {
            if let Err(e) = deliver_identity(&identity_xs, &mut to_agent, IDENTITY_POLL) {
                eprintln!("berth-guest: xen: handing the identity to the agent: {e}");
            }
        })
        .map_err(GuestError::Port)?;
    std::thread::Builder::new()
        .name("xs-publish".into())
        .spawn(move || {
            if let Err(e) = publish(&publish_xs, bridge_end) {
                eprintln!("berth-guest: xen: agent link closed: {e}");
            }
        })
        .map_err(GuestError::Port)?;
    Ok(File::from(OwnedFd::from(agent_end)))
}

/// Boots the game and serves hostd over XenStore until the domain is destroyed.
pub fn run(config: Config) -> Result<(), GuestError> {
    let port = open_port()?;
    crate::serve(&config, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::guest::{
        encode_line, HostToGuest, Identity, AGENT_PROTOCOL_VERSION, GAME_PORT,
    };
    use berth_protocol::{SessionId, VmId};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// A test double: XenStore as a map, with relative paths as keys.
    #[derive(Default)]
    struct MemStore(Mutex<BTreeMap<String, String>>);

    impl MemStore {
        fn get(&self, path: &str) -> Option<String> {
            self.0.lock().expect("not poisoned").get(path).cloned()
        }
    }

    impl Xs for MemStore {
        fn directory(&self, path: &str) -> io::Result<Vec<Box<str>>> {
            let prefix = format!("{path}/");
            Ok(self
                .0
                .lock()
                .expect("not poisoned")
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .map(Box::from)
                .collect())
        }
        fn read(&self, path: &str) -> io::Result<Box<str>> {
            self.get(path)
                .map(Box::from)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "XS interface error ENOENT"))
        }
        fn write(&self, path: &str, data: &str) -> io::Result<()> {
            if path.len() + 1 + data.len() > PAYLOAD_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "payload too large",
                ));
            }
            self.0
                .lock()
                .expect("not poisoned")
                .insert(path.into(), data.into());
            Ok(())
        }
        fn rm(&self, path: &str) -> io::Result<()> {
            self.0.lock().expect("not poisoned").remove(path);
            Ok(())
        }
    }

    fn sid() -> SessionId {
        SessionId::new("s1").expect("valid")
    }

    fn line(msg: &GuestToHost) -> Vec<u8> {
        encode_line(msg)
    }

    fn decode(value: &str) -> GuestToHost {
        decode_line(value.as_bytes()).expect("decodes")
    }

    #[test]
    fn messages_go_to_their_keys() {
        let init = GuestToHost::Initialised {
            version: AGENT_PROTOCOL_VERSION,
            init_ms: 5,
            game_port: GAME_PORT,
        };
        assert_eq!(key_for(&init), INITIALISED_KEY);
        let ready = GuestToHost::Ready {
            session_id: sid(),
            vm_id: VmId::new("vm1").expect("valid"),
            clock_ms: 1,
            apply_us: 2,
        };
        assert_eq!(key_for(&ready), READY_KEY);
        let refused = GuestToHost::Error {
            code: "bad_identity".into(),
            message: "no".into(),
        };
        assert_eq!(
            key_for(&refused),
            READY_KEY,
            "hostd waits for the answer on ready"
        );
        assert_eq!(key_for(&GuestToHost::Prewarmed), READY_KEY);
        assert_eq!(key_for(&GuestToHost::Heartbeat { uptime_ms: 1 }), EVENT_KEY);
        // Relative paths: xenbus resolves them against the domain's own directory.
        for key in [IDENTITY_KEY, INITIALISED_KEY, READY_KEY, EVENT_KEY] {
            assert!(key.starts_with("data/berth/"), "{key}");
        }
    }

    #[test]
    fn ended_is_not_overwritten_by_heartbeats() {
        let mut router = Router::default();
        let hb = router.route(&line(&GuestToHost::Heartbeat { uptime_ms: 1 }));
        assert_eq!(hb.map(|(k, _)| k), Some(EVENT_KEY));
        let ended = GuestToHost::Ended {
            session_id: sid(),
            reason: "game_over".into(),
            results: serde_json::json!({"winner": "alice"}),
        };
        let (key, value) = router.route(&line(&ended)).expect("routed");
        assert_eq!(key, EVENT_KEY);
        assert_eq!(decode(&value), ended);
        assert!(router
            .route(&line(&GuestToHost::Heartbeat { uptime_ms: 2 }))
            .is_none());
        assert!(router.route(b"{not json").is_none());
    }

    #[test]
    fn values_are_lines_without_newline_and_fit() {
        let ended = GuestToHost::Ended {
            session_id: sid(),
            reason: "game_over".into(),
            results: serde_json::json!({"log": "x".repeat(10_000)}),
        };
        let value = fit_value(&ended, EVENT_KEY);
        assert!(!value.contains('\n'));
        assert!(value.len() <= max_value_len(EVENT_KEY));
        match decode(&value) {
            GuestToHost::Ended {
                reason, results, ..
            } => {
                assert_eq!(reason, "game_over");
                assert!(results["truncated_bytes"]
                    .as_u64()
                    .is_some_and(|n| n > 10_000));
            }
            other => panic!("{other:?}"),
        }
        let refused = GuestToHost::Error {
            code: "bad_identity".into(),
            message: "é".repeat(5_000),
        };
        let value = fit_value(&refused, READY_KEY);
        assert!(value.len() <= max_value_len(READY_KEY));
        assert!(
            matches!(decode(&value), GuestToHost::Error { code, .. } if code == "bad_identity")
        );
        let small = GuestToHost::Heartbeat { uptime_ms: 7 };
        assert_eq!(decode(&fit_value(&small, EVENT_KEY)), small);
    }

    #[test]
    fn identity_values_become_one_line() {
        assert_eq!(value_line(""), None);
        assert_eq!(value_line("  \n"), None);
        assert_eq!(
            value_line("{\"a\":1}").as_deref(),
            Some(&b"{\"a\":1}\n"[..])
        );
        assert_eq!(
            value_line("{\"a\":1}\n").as_deref(),
            Some(&b"{\"a\":1}\n"[..])
        );
    }

    fn identity() -> Identity {
        Identity {
            teams: vec![],
            session_id: sid(),
            vm_id: VmId::new("vm1").expect("valid"),
            hostname: "berth-vm1".into(),
            players: vec![],
            ticket_key: "00ff".into(),
            params: serde_json::json!({"text": "two\nlines"}),
            wall_clock_ms: 1_700_000_000_000,
            rng_seed: 42,
            deadline_ms: 0,
        }
    }

    #[test]
    fn identity_is_handed_to_the_agent_once_present() {
        let xs = MemStore::default();
        assert_eq!(read_identity(&xs).expect("absent is fine"), None);
        xs.write(IDENTITY_KEY, "").expect("write");
        assert_eq!(read_identity(&xs).expect("empty is fine"), None);
        // What hostd writes: the JSON line without its newline.
        let mut value = encode_line(&HostToGuest::Identity(identity()));
        value.pop();
        xs.write(IDENTITY_KEY, std::str::from_utf8(&value).expect("utf8"))
            .expect("write");
        let mut to_agent = Vec::new();
        deliver_identity(&xs, &mut to_agent, Duration::from_millis(1)).expect("delivered");
        assert_eq!(to_agent.iter().filter(|b| **b == b'\n').count(), 1);
        let back: HostToGuest = decode_line(&to_agent).expect("the agent can decode it");
        assert_eq!(back, HostToGuest::Identity(identity()));
    }

    #[test]
    fn agent_lines_are_published_to_keys() {
        let xs = MemStore::default();
        let (mut agent, bridge) = UnixStream::pair().expect("socketpair");
        let init = GuestToHost::Initialised {
            version: AGENT_PROTOCOL_VERSION,
            init_ms: 5,
            game_port: GAME_PORT,
        };
        let ready = GuestToHost::Ready {
            session_id: sid(),
            vm_id: VmId::new("vm1").expect("valid"),
            clock_ms: 1,
            apply_us: 2,
        };
        let ended = GuestToHost::Ended {
            session_id: sid(),
            reason: "game_over".into(),
            results: serde_json::Value::Null,
        };
        let mut all = Vec::new();
        for msg in [
            &init,
            &ready,
            &GuestToHost::Heartbeat { uptime_ms: 1 },
            &ended,
            &GuestToHost::Heartbeat { uptime_ms: 2 },
        ] {
            all.extend(line(msg));
        }
        // Split mid-line: the bridge reassembles lines across reads.
        let (a, b) = all.split_at(all.len() / 2);
        agent.write_all(a).expect("write");
        agent.write_all(b).expect("write");
        drop(agent);
        publish(&xs, bridge).expect("runs to EOF");
        assert_eq!(decode(&xs.get(INITIALISED_KEY).expect("initialised")), init);
        assert_eq!(decode(&xs.get(READY_KEY).expect("ready")), ready);
        assert_eq!(decode(&xs.get(EVENT_KEY).expect("event")), ended);
        assert_eq!(
            xs.get(IDENTITY_KEY),
            None,
            "the agent never writes its identity"
        );
    }
}
