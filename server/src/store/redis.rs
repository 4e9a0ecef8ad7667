//! The Redis backend: many server replicas share one Redis.
//!
//! [`RedisStore`] owns two kinds of connection: a [`ConnectionManager`] (multiplexed, cheap to
//! clone, reconnects by itself) for every command, and one pub/sub connection held by a
//! background task that forwards [`Event`]s into a tokio broadcast channel. That task
//! reconnects with backoff when Redis goes away (events published meanwhile are lost, as with any
//! pub/sub: consumers re-read state rather than rely on every event) and stops when the last
//! clone of the store is dropped.
//!
//! # Layout
//!
//! Every key starts with `{prefix}` (the prefix inside braces), `B` below. The braces are a
//! Redis Cluster hash tag: all keys of one deployment hash to one slot, which is what makes the
//! multi-key Lua scripts legal on a cluster (scripts also build some keys themselves, which a
//! cluster allows only within the slot of their declared keys).
//!
//! | key                     | type   | holds                                                  |
//! |-------------------------|--------|--------------------------------------------------------|
//! | `B ticket:{id}`         | string | ticket JSON                                            |
//! | `B away`                | hash   | ticket id → `away_since_ms` (authoritative over JSON)  |
//! | `B queue:{pool}`        | zset   | ticket ids scored by `enqueued_ms` (ties: by id)       |
//! | `B pools`               | hash   | `{pool}` → pool JSON, for pools holding a ticket       |
//! | `B player:{id}`         | string | binding JSON                                           |
//! | `B last:{id}`           | string | the player's last ended session id, with a PX expiry   |
//! | `B session:{id}`        | hash   | `json`, `version`, `state` (CAS reads the last two)    |
//! | `B sessions:{state}`    | set    | ids of live sessions in `state`                        |
//! | `B ended`               | zset   | ended session ids scored by when they expire (ms)      |
//! | `B host:{id}`           | hash   | `json`, `state`, `seen` (last_seen_ms), `draining`     |
//! | `B hosts`               | set    | host ids                                               |
//! | `B lease:{name}`        | string | the owner, with a PX expiry                            |
//! | `B events`              | channel| event JSON                                             |
//!
//! `{pool}` is `len(mode):mode/region`, unambiguous for any strings. Sorted-set ties are ordered
//! by member bytes, so a queue reads in (`enqueued_ms`, id) order as long as `enqueued_ms` is
//! below 2^53 (scores are doubles).
//!
//! # Atomicity
//!
//! Every step that touches more than one key is one Lua script (sent by hash, reloaded if Redis
//! forgot it). Scripts never re-encode a record: Lua's cjson would round `f64`s, turn `[]` into
//! `{}` and reorder fields, and the records must round-trip exactly. The fields scripts compare
//! (session version and state, host `last_seen_ms`, away marks, draining) are kept beside the
//! JSON as plain strings instead; the JSON's copy of them is overwritten on read. Scripts do
//! every read and check before their first write, since Redis does not roll a failed script
//! back.

use super::{Store, StoreError, ENDED_RETENTION_MS, EVENT_BUFFER, LAST_SESSION_KEPT_MS};
use crate::model::{Binding, Event, HostRecord, HostState, PoolKey, Session, SessionState, Ticket};
use crate::util::now_ms;
use async_trait::async_trait;
use berth_protocol::{HostId, PlayerId, SessionId};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, ErrorKind, RedisError, Script};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

/// A command waits this long for its answer before it fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting (and each reconnect attempt) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The event task's first and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The event task pings this often so a silently dead connection is noticed.
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(5);

/// The shared state behind every [`RedisStore`] clone.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Arc<Keys>,
    events: broadcast::Sender<Event>,
    /// How long an ended session stays readable.
    retention_ms: u64,
    /// Stops the event task once the last clone is gone.
    _pump: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("base", &self.keys.base)
            .finish_non_exhaustive()
    }
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Key names; `base` is `{prefix}`.
struct Keys {
    base: String,
}

impl Keys {
    fn queue(&self, pool: &PoolKey) -> String {
        format!("{}queue:{}", self.base, pool_id(pool))
    }
    fn pools(&self) -> String {
        format!("{}pools", self.base)
    }
    fn player(&self, id: &PlayerId) -> String {
        format!("{}player:{id}", self.base)
    }
    fn last(&self, id: &PlayerId) -> String {
        format!("{}last:{id}", self.base)
    }
    fn session(&self, id: &SessionId) -> String {
        format!("{}session:{id}", self.base)
    }
    fn ended(&self) -> String {
        format!("{}ended", self.base)
    }
    fn host(&self, id: &HostId) -> String {
        format!("{}host:{id}", self.base)
    }
    fn hosts(&self) -> String {
        format!("{}hosts", self.base)
    }
    fn lease(&self, name: &str) -> String {
        format!("{}lease:{name}", self.base)
    }
    fn events(&self) -> String {
        format!("{}events", self.base)
    }
}

/// A pool's name inside keys; the scripts' `pool_id` builds the same string.
fn pool_id(pool: &PoolKey) -> String {
    format!("{}:{}/{}", pool.mode.len(), pool.mode, pool.region)
}

/// Helpers every script starts with. `ARGV[1]` is always the key base.
const PRELUDE: &str = r#"
local B = ARGV[1]

local function pool_id(mode, region)
  return #mode .. ':' .. mode .. '/' .. region
end

-- The player's binding if it is a ticket: (binding), (nil) if none or a session, or
-- (nil, raw) if the stored binding cannot be read.
local function queued_binding(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local ok, b = pcall(cjson.decode, raw)
  if not ok or type(b) ~= 'table' then return nil, raw end
  if b.kind == 'session' then return nil end
  if b.kind ~= 'queued' or type(b.ticket) ~= 'string' or type(b.pool) ~= 'table'
      or type(b.pool.mode) ~= 'string' or type(b.pool.region) ~= 'string' then
    return nil, raw
  end
  return b
end

-- Removes ticket `id` if it waits in pool `qid`; returns its JSON and away mark (or false).
local function remove_ticket(id, qid)
  local q = B .. 'queue:' .. qid
  if not redis.call('ZSCORE', q, id) then return false, false end
  local tkey = B .. 'ticket:' .. id
  local json = redis.call('GET', tkey)
  local away = redis.call('HGET', B .. 'away', id)
  redis.call('DEL', tkey)
  redis.call('HDEL', B .. 'away', id)
  redis.call('ZREM', q, id)
  if redis.call('ZCARD', q) == 0 then redis.call('HDEL', B .. 'pools', qid) end
  return json, away
end

local function index_add(id, state, ttl_ms, expire_at_ms)
  if state == 'ended' then
    redis.call('ZADD', B .. 'ended', expire_at_ms, id)
    redis.call('PEXPIRE', B .. 'session:' .. id, ttl_ms)
  else
    redis.call('SADD', B .. 'sessions:' .. state, id)
  end
end

local function index_remove(id, state)
  if state == 'ended' then
    redis.call('ZREM', B .. 'ended', id)
    redis.call('PERSIST', B .. 'session:' .. id)
  else
    redis.call('SREM', B .. 'sessions:' .. state, id)
  end
end
"#;

/// KEYS: player, player's last session. ARGV: base, ticket id, ticket JSON, binding JSON, pool
/// id, pool JSON, score, away ('' for none), events channel, queue_changed event JSON. Returns
/// {1, false} or {0, the binding in the way}. Announces the new ticket in the same step (one
/// round trip per ticket).
const ENQUEUE: &str = r#"
local b = redis.call('GET', KEYS[1])
if b then return {0, b} end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('SET', B .. 'ticket:' .. ARGV[2], ARGV[3])
redis.call('ZADD', B .. 'queue:' .. ARGV[5], ARGV[7], ARGV[2])
redis.call('HSET', B .. 'pools', ARGV[5], ARGV[6])
if ARGV[8] ~= '' then redis.call('HSET', B .. 'away', ARGV[2], ARGV[8]) end
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {1, false}
"#;

/// KEYS: player. ARGV: base. Returns {0, false, false} (not queued), {1, ticket JSON or false,
/// away or false}, or {-1, unreadable binding, false}.
const DEQUEUE: &str = r#"
local b, bad = queued_binding(KEYS[1])
if bad then return {-1, bad, false} end
if not b then return {0, false, false} end
redis.call('DEL', KEYS[1])
local json, away = remove_ticket(b.ticket, pool_id(b.pool.mode, b.pool.region))
return {1, json, away}
"#;

/// KEYS: player. ARGV: base, away ('' to clear). Returns {1|0, false} or {-1, unreadable binding}.
const SET_AWAY: &str = r#"
local b, bad = queued_binding(KEYS[1])
if bad then return {-1, bad} end
if not b then return {0, false} end
local q = B .. 'queue:' .. pool_id(b.pool.mode, b.pool.region)
if not redis.call('ZSCORE', q, b.ticket) then return {0, false} end
if ARGV[2] == '' then
  redis.call('HDEL', B .. 'away', b.ticket)
else
  redis.call('HSET', B .. 'away', b.ticket, ARGV[2])
end
return {1, false}
"#;

/// KEYS: queue. ARGV: base. Returns ticket JSON, away, ticket JSON, away, ... oldest first.
const TICKETS: &str = r#"
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
local step = 512
for i = 1, #ids, step do
  local last = math.min(i + step - 1, #ids)
  local keys = {}
  for j = i, last do keys[#keys + 1] = B .. 'ticket:' .. ids[j] end
  local json = redis.call('MGET', unpack(keys))
  local away = redis.call('HMGET', B .. 'away', unpack(ids, i, last))
  for j = 1, #json do
    out[#out + 1] = json[j]
    out[#out + 1] = away[j]
  end
end
return out
"#;

/// KEYS: queue. ARGV: base, pool id, session id, session JSON, state, binding JSON, ttl ms,
/// expire-at ms, ticket ids... Returns {1, false}, {0, false} (a ticket is gone) or {-1,
/// unreadable ticket}.
const CLAIM: &str = r#"
local first = 9
for i = first, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then return {0, false} end
end
local players = {}
for i = first, #ARGV do
  local raw = redis.call('GET', B .. 'ticket:' .. ARGV[i])
  if not raw then return {-1, false} end
  local ok, t = pcall(cjson.decode, raw)
  if not ok or type(t) ~= 'table' or type(t.player) ~= 'string' then return {-1, raw} end
  players[i] = t.player
end
for i = first, #ARGV do
  remove_ticket(ARGV[i], ARGV[2])
  redis.call('SET', B .. 'player:' .. players[i], ARGV[6])
end
local skey = B .. 'session:' .. ARGV[3]
local old = redis.call('HGET', skey, 'state')
if old then index_remove(ARGV[3], old) end
redis.call('HSET', skey, 'json', ARGV[4], 'version', '1', 'state', ARGV[5])
index_add(ARGV[3], ARGV[5], ARGV[7], ARGV[8])
return {1, false}
"#;

/// KEYS: session. ARGV: base, id, expected version, JSON, new version, state, ttl ms,
/// expire-at ms, binding JSON, ttl of the players' `last` ms, players... Returns 1 if stored,
/// 0 if the version moved on.
const UPDATE_SESSION: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'version', 'state')
if not cur[1] or cur[1] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'json', ARGV[4], 'version', ARGV[5], 'state', ARGV[6])
if cur[2] and cur[2] ~= ARGV[6] then index_remove(ARGV[2], cur[2]) end
if cur[2] ~= ARGV[6] or ARGV[6] == 'ended' then index_add(ARGV[2], ARGV[6], ARGV[7], ARGV[8]) end
if ARGV[6] == 'ended' then
  for i = 11, #ARGV do
    local k = B .. 'player:' .. ARGV[i]
    if redis.call('GET', k) == ARGV[9] then
      redis.call('DEL', k)
      redis.call('SET', B .. 'last:' .. ARGV[i], ARGV[2], 'PX', ARGV[10])
    end
  end
end
return 1
"#;

/// KEYS: ended. ARGV: base, now ms, states... Returns session JSONs (unordered); forgets index
/// entries whose session expired.
const SESSIONS: &str = r#"
local out = {}
for i = 3, #ARGV do
  local state = ARGV[i]
  local ids
  if state == 'ended' then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
    ids = redis.call('ZRANGE', KEYS[1], 0, -1)
  else
    ids = redis.call('SMEMBERS', B .. 'sessions:' .. state)
  end
  for _, id in ipairs(ids) do
    local json = redis.call('HGET', B .. 'session:' .. id, 'json')
    if json then
      out[#out + 1] = json
    elseif state == 'ended' then
      redis.call('ZREM', KEYS[1], id)
    else
      redis.call('SREM', B .. 'sessions:' .. state, id)
    end
  end
end
return out
"#;

/// KEYS: host. ARGV: base, id, JSON, state, last seen. Keeps the `draining` field.
const PUT_HOST: &str = r#"
redis.call('HSET', KEYS[1], 'json', ARGV[3], 'state', ARGV[4], 'seen', ARGV[5])
redis.call('SADD', B .. 'hosts', ARGV[2])
return 1
"#;

/// KEYS: hosts. ARGV: base. Returns JSON, state, draining, ... per host.
const HOSTS: &str = r#"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', B .. 'host:' .. id, 'json', 'state', 'draining')
  out[#out + 1] = h[1]
  out[#out + 1] = h[2]
  out[#out + 1] = h[3]
end
return out
"#;

/// KEYS: host. ARGV: base, expected last seen, state.
const MARK_HOST: &str = r#"
if redis.call('HGET', KEYS[1], 'seen') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
return 1
"#;

/// KEYS: host. ARGV: base, '1' or '0'.
const SET_DRAINING: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'draining', ARGV[2])
return 1
"#;

/// KEYS: host, hosts. ARGV: base, id.
const REMOVE_HOST: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"#;

/// KEYS: lease. ARGV: base, owner, ttl ms.
const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"#;

struct Scripts {
    enqueue: Script,
    dequeue: Script,
    set_away: Script,
    tickets: Script,
    claim: Script,
    update_session: Script,
    sessions: Script,
    put_host: Script,
    hosts: Script,
    mark_host: Script,
    set_draining: Script,
    remove_host: Script,
    lease: Script,
}

impl Scripts {
    fn all(&self) -> [&Script; 13] {
        [
            &self.enqueue,
            &self.dequeue,
            &self.set_away,
            &self.tickets,
            &self.claim,
            &self.update_session,
            &self.sessions,
            &self.put_host,
            &self.hosts,
            &self.mark_host,
            &self.set_draining,
            &self.remove_host,
            &self.lease,
        ]
    }
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
    Scripts {
        enqueue: s(ENQUEUE),
        dequeue: s(DEQUEUE),
        set_away: s(SET_AWAY),
        tickets: s(TICKETS),
        claim: s(CLAIM),
        update_session: s(UPDATE_SESSION),
        sessions: s(SESSIONS),
        put_host: s(PUT_HOST),
        hosts: s(HOSTS),
        mark_host: s(MARK_HOST),
        set_draining: s(SET_DRAINING),
        remove_host: s(REMOVE_HOST),
        lease: s(LEASE),
    }
});

/// A stored value that is not what this module writes.
fn corrupt(what: &'static str) -> StoreError {
    use serde::de::Error as _;
    StoreError::Corrupt(serde_json::Error::custom(what))
}

/// The error for a record a script could not read: serde's own complaint about it if it has one.
fn unreadable<T: serde::de::DeserializeOwned>(
    raw: Option<String>,
    what: &'static str,
) -> StoreError {
    match raw.as_deref().map(serde_json::from_str::<T>) {
        Some(Err(e)) => StoreError::Corrupt(e),
        _ => corrupt(what),
    }
}

fn parse_ms(raw: Option<String>) -> Result<Option<u64>, StoreError> {
    raw.map(|s| {
        s.parse::<u64>()
            .map_err(|_| corrupt("away mark is not a number"))
    })
    .transpose()
}

fn ticket_from(json: &str, away: Option<String>) -> Result<Ticket, StoreError> {
    let mut t: Ticket = serde_json::from_str(json)?;
    t.away_since_ms = parse_ms(away)?;
    Ok(t)
}

fn host_from(
    json: Option<String>,
    state: Option<String>,
    draining: Option<String>,
) -> Result<Option<HostRecord>, StoreError> {
    let Some(json) = json else {
        return Ok(None);
    };
    let mut h: HostRecord = serde_json::from_str(&json)?;
    if let Some(state) = state {
        h.state = serde_json::from_str(&state)?;
    }
    h.draining = draining.as_deref() == Some("1");
    Ok(Some(h))
}

/// Time to live and expiry time (ms) of a session that ended: `retention_ms` after its last
/// transition, as the memory store counts it.
fn ended_expiry(session: &Session, retention_ms: u64) -> (u64, u64) {
    let expire_at = session.since_ms().saturating_add(retention_ms);
    let ttl = expire_at.saturating_sub(now_ms()).max(1);
    (ttl, expire_at)
}

fn session_binding(id: &SessionId) -> Result<String, StoreError> {
    Ok(serde_json::to_string(&Binding::Session {
        session: id.clone(),
    })?)
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`) and subscribes to the event channel;
    /// every key lives under `prefix` (e.g. `berth:`), which must be non-empty and free of
    /// braces. Must run inside a tokio runtime: it spawns the event task.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(StoreError::Redis(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "store prefix must be non-empty and contain no braces",
            ))));
        }
        let keys = Arc::new(Keys {
            base: format!("{{{prefix}}}"),
        });
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_max_delay(BACKOFF_MAX);
        let mut conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        for script in SCRIPTS.all() {
            script.load_async(&mut conn).await?;
        }
        // Subscribed before returning, so an event published right after `connect` arrives.
        let channel = keys.events();
        let pubsub = subscribe(&client, &channel).await?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let task = tokio::spawn(pump(client, channel, pubsub, events.clone()));
        Ok(RedisStore {
            conn,
            keys,
            events,
            retention_ms: ENDED_RETENTION_MS,
            _pump: Arc::new(AbortOnDrop(task.abort_handle())),
        })
    }

    /// Keeps ended sessions (and their results) this long instead of [`ENDED_RETENTION_MS`].
    pub fn with_ended_retention(mut self, ms: u64) -> Self {
        self.retention_ms = ms.max(1);
        self
    }

    fn base(&self) -> &str {
        &self.keys.base
    }
}

async fn subscribe(client: &Client, channel: &str) -> Result<PubSub, RedisError> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                ErrorKind::Io,
                "timed out subscribing to events",
            )))
        })
}

/// The event task: forwards the channel's events into `events`, resubscribing with backoff
/// whenever the connection is lost. Runs until aborted (the store's last clone is dropped).
async fn pump(client: Client, channel: String, first: PubSub, events: broadcast::Sender<Event>) {
    let mut next = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        let pubsub = match next.take() {
            Some(p) => p,
            None => match subscribe(&client, &channel).await {
                Ok(p) => {
                    tracing::info!(%channel, "redis event subscription restored");
                    backoff = BACKOFF_MIN;
                    // Whatever was published meanwhile is lost: sockets re-read the store.
                    let _ = events.send(Event::Resync);
                    p
                }
                Err(error) => {
                    tracing::warn!(%channel, %error, "redis event subscription failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        forward(pubsub, &events).await;
        tracing::warn!(%channel, "redis event subscription lost; reconnecting");
        tokio::time::sleep(backoff).await;
    }
}

/// Forwards events until the connection closes or stops answering pings.
async fn forward(pubsub: PubSub, events: &broadcast::Sender<Event>) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return };
                match serde_json::from_slice::<Event>(msg.get_payload_bytes()) {
                    // No receiver is not an error: nobody is listening yet.
                    Ok(event) => { let _ = events.send(event); }
                    Err(error) => tracing::warn!(%error, "unreadable event on the redis channel"),
                }
            }
            _ = ping.tick() => {
                let alive = tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(alive, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn enqueue(&self, ticket: &Ticket) -> Result<(), StoreError> {
        let binding = serde_json::to_string(&Binding::Queued {
            ticket: ticket.id.clone(),
            pool: ticket.pool.clone(),
        })?;
        let away = ticket
            .away_since_ms
            .map(|ms| ms.to_string())
            .unwrap_or_default();
        let mut conn = self.conn.clone();
        let (done, busy): (i64, Option<String>) = SCRIPTS
            .enqueue
            .key(self.keys.player(&ticket.player))
            .key(self.keys.last(&ticket.player))
            .arg(self.base())
            .arg(&ticket.id)
            .arg(serde_json::to_string(ticket)?)
            .arg(binding)
            .arg(pool_id(&ticket.pool))
            .arg(serde_json::to_string(&ticket.pool)?)
            .arg(ticket.enqueued_ms)
            .arg(away)
            .arg(self.keys.events())
            .arg(serde_json::to_string(&Event::QueueChanged {
                pool: ticket.pool.clone(),
            })?)
            .invoke_async(&mut conn)
            .await?;
        match (done, busy) {
            (1, _) => Ok(()),
            (_, Some(raw)) => Err(StoreError::PlayerBusy(serde_json::from_str(&raw)?)),
            (_, None) => Err(corrupt("enqueue script gave no answer")),
        }
    }

    async fn dequeue(&self, player: &PlayerId) -> Result<Option<Ticket>, StoreError> {
        let mut conn = self.conn.clone();
        let (code, json, away): (i64, Option<String>, Option<String>) = SCRIPTS
            .dequeue
            .key(self.keys.player(player))
            .arg(self.base())
            .invoke_async(&mut conn)
            .await?;
        match (code, json) {
            (-1, raw) => Err(unreadable::<Binding>(raw, "binding is not readable")),
            (1, Some(json)) => ticket_from(&json, away).map(Some),
            _ => Ok(None),
        }
    }

    async fn set_away(&self, player: &PlayerId, since_ms: Option<u64>) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let (code, raw): (i64, Option<String>) = SCRIPTS
            .set_away
            .key(self.keys.player(player))
            .arg(self.base())
            .arg(since_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        match code {
            -1 => Err(unreadable::<Binding>(raw, "binding is not readable")),
            _ => Ok(()),
        }
    }

    async fn tickets(&self, pool: &PoolKey) -> Result<Vec<Ticket>, StoreError> {
        let mut conn = self.conn.clone();
        let flat: Vec<Option<String>> = SCRIPTS
            .tickets
            .key(self.keys.queue(pool))
            .arg(self.base())
            .invoke_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(json), Some(away)) = (it.next(), it.next()) {
            // A queue entry without its ticket cannot be matched; skip it rather than fail.
            if let Some(json) = json {
                out.push(ticket_from(&json, away)?);
            }
        }
        Ok(out)
    }

    async fn pools(&self) -> Result<Vec<PoolKey>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = redis::cmd("HVALS")
            .arg(self.keys.pools())
            .query_async(&mut conn)
            .await?;
        let mut pools = raw
            .iter()
            .map(|p| serde_json::from_str(p))
            .collect::<Result<Vec<PoolKey>, _>>()?;
        pools.sort();
        Ok(pools)
    }

    async fn claim(&self, tickets: &[String], session: &Session) -> Result<bool, StoreError> {
        let mut stored = session.clone();
        stored.version = 1;
        let (ttl, expire_at) = ended_expiry(&stored, self.retention_ms);
        let mut invocation = SCRIPTS.claim.prepare_invoke();
        invocation
            .key(self.keys.queue(&session.pool))
            .arg(self.base())
            .arg(pool_id(&session.pool))
            .arg(session.id.as_str())
            .arg(serde_json::to_string(&stored)?)
            .arg(stored.state.as_str())
            .arg(session_binding(&session.id)?)
            .arg(ttl)
            .arg(expire_at);
        for id in tickets {
            invocation.arg(id);
        }
        let mut conn = self.conn.clone();
        let (code, raw): (i64, Option<String>) = invocation.invoke_async(&mut conn).await?;
        match code {
            1 => Ok(true),
            -1 => Err(unreadable::<Ticket>(
                raw,
                "queued ticket is missing or unreadable",
            )),
            _ => Ok(false),
        }
    }

    async fn binding(&self, player: &PlayerId) -> Result<Option<Binding>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.keys.player(player))
            .query_async(&mut conn)
            .await?;
        Ok(raw.map(|r| serde_json::from_str(&r)).transpose()?)
    }

    async fn last_session(&self, player: &PlayerId) -> Result<Option<SessionId>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.keys.last(player))
            .query_async(&mut conn)
            .await?;
        raw.map(|r| SessionId::new(r).map_err(|_| corrupt("a player's last session is not an id")))
            .transpose()
    }

    async fn session(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.keys.session(id))
            .arg("json")
            .query_async(&mut conn)
            .await?;
        Ok(raw.map(|r| serde_json::from_str(&r)).transpose()?)
    }

    async fn sessions(&self, state: Option<SessionState>) -> Result<Vec<Session>, StoreError> {
        let mut invocation = SCRIPTS.sessions.prepare_invoke();
        invocation
            .key(self.keys.ended())
            .arg(self.base())
            .arg(now_ms());
        match state {
            Some(st) => {
                invocation.arg(st.as_str());
            }
            None => {
                for st in SessionState::ALL {
                    invocation.arg(st.as_str());
                }
            }
        }
        let mut conn = self.conn.clone();
        let raw: Vec<String> = invocation.invoke_async(&mut conn).await?;
        let mut out = raw
            .iter()
            .map(|r| serde_json::from_str(r))
            .collect::<Result<Vec<Session>, _>>()?;
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(out)
    }

    async fn update_session(&self, session: &Session) -> Result<Option<Session>, StoreError> {
        let mut stored = session.clone();
        stored.version = session.version.saturating_add(1);
        let (ttl, expire_at) = ended_expiry(&stored, self.retention_ms);
        let mut invocation = SCRIPTS.update_session.prepare_invoke();
        invocation
            .key(self.keys.session(&session.id))
            .arg(self.base())
            .arg(session.id.as_str())
            .arg(session.version)
            .arg(serde_json::to_string(&stored)?)
            .arg(stored.version)
            .arg(stored.state.as_str())
            .arg(ttl)
            .arg(expire_at)
            .arg(session_binding(&session.id)?)
            .arg(ttl.min(LAST_SESSION_KEPT_MS));
        for p in &stored.players {
            invocation.arg(p.as_str());
        }
        let mut conn = self.conn.clone();
        let done: i64 = invocation.invoke_async(&mut conn).await?;
        Ok((done == 1).then_some(stored))
    }

    async fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = SCRIPTS
            .put_host
            .key(self.keys.host(&host.id))
            .arg(self.base())
            .arg(host.id.as_str())
            .arg(serde_json::to_string(host)?)
            .arg(serde_json::to_string(&host.state)?)
            .arg(host.last_seen_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn host(&self, id: &HostId) -> Result<Option<HostRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let (json, state, draining): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.keys.host(id))
                .arg("json")
                .arg("state")
                .arg("draining")
                .query_async(&mut conn)
                .await?;
        host_from(json, state, draining)
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let flat: Vec<Option<String>> = SCRIPTS
            .hosts
            .key(self.keys.hosts())
            .arg(self.base())
            .invoke_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(json), Some(state), Some(draining)) = (it.next(), it.next(), it.next()) {
            out.extend(host_from(json, state, draining)?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn mark_host(
        &self,
        id: &HostId,
        seen_ms: u64,
        state: HostState,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let done: i64 = SCRIPTS
            .mark_host
            .key(self.keys.host(id))
            .arg(self.base())
            .arg(seen_ms)
            .arg(serde_json::to_string(&state)?)
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    async fn set_draining(&self, id: &HostId, draining: bool) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let done: i64 = SCRIPTS
            .set_draining
            .key(self.keys.host(id))
            .arg(self.base())
            .arg(if draining { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    async fn remove_host(&self, id: &HostId) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = SCRIPTS
            .remove_host
            .key(self.keys.host(id))
            .key(self.keys.hosts())
            .arg(self.base())
            .arg(id.as_str())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn lease(&self, name: &str, owner: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let done: i64 = SCRIPTS
            .lease
            .key(self.keys.lease(name))
            .arg(self.base())
            .arg(owner)
            // Redis refuses PX 0; one millisecond is as good as gone.
            .arg(ttl_ms.max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(done == 1)
    }

    async fn publish(&self, event: &Event) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.events())
            .arg(serde_json::to_string(event)?)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}
