//! The admin dashboard: its page and files are served from the binary with the right types,
//! and its live feed (`GET /v1/admin/events`, server-sent events) refuses what is not an admin
//! token with clear codes, starts with a snapshot, follows session, queue and host changes —
//! on one replica and across two on Redis — and says `bye` when the server stops. Development
//! servers mint admin tokens for the page's sign-in; others do not.

mod common;

use anyhow::{bail, ensure, Context, Result};
use berth_protocol::play::ServerMessage;
use berth_server::app::Server;
use berth_server::auth::{Auth, Role};
use berth_server::config::ServerConfig;
use berth_testkit::pages;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// An open feed: the response being read and what arrived but is not yet parsed.
struct Feed {
    resp: reqwest::Response,
    buf: String,
}

impl Feed {
    async fn open(server: &Server, token: &str) -> Result<Feed> {
        let resp = reqwest::Client::new()
            .get(format!("http://{}/v1/admin/events", server.addr))
            .bearer_auth(token)
            .send()
            .await?;
        ensure!(resp.status() == 200, "the feed answered {}", resp.status());
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        ensure!(ct == "text/event-stream", "content-type {ct}");
        Ok(Feed {
            resp,
            buf: String::new(),
        })
    }

    /// Opens the feed with `token` and reads its first event, which must be the snapshot.
    async fn snapshot(server: &Server, token: &str) -> Result<(Feed, Value)> {
        let mut feed = Feed::open(server, token).await?;
        let (event, snap) = feed
            .next(Duration::from_secs(5))
            .await?
            .context("no snapshot")?;
        ensure!(event == "snapshot", "the first event is {event}");
        Ok((feed, snap))
    }

    /// The next event (`event:` name and parsed `data:`), skipping keep-alive comments; `None`
    /// when the stream ended.
    async fn next(&mut self, within: Duration) -> Result<Option<(String, Value)>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&data)
                    .with_context(|| format!("event {event}: {data}"))?;
                ensure!(
                    v["type"] == event.as_str(),
                    "event {event} carries {}",
                    v["type"]
                );
                return Ok(Some((event, v)));
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .context("the feed said nothing in time")??;
            match chunk {
                Some(bytes) => self.buf.push_str(std::str::from_utf8(&bytes)?),
                None => return Ok(None),
            }
        }
    }

    /// Skips events until one of type `kind` for which `f` holds.
    async fn until(
        &mut self,
        kind: &str,
        within: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let left = within.saturating_sub(t0.elapsed());
            match self.next(left).await? {
                Some((event, v)) if event == kind && f(&v) => return Ok(v),
                Some(_) => continue,
                None => bail!("the feed ended while waiting for {kind}"),
            }
        }
    }

    /// Skips events until a `sessions` change upserts a row for which `f` holds; that row.
    async fn row(&mut self, within: Duration, f: impl Fn(&Value) -> bool) -> Result<Value> {
        let m = self
            .until("sessions", within, |m| session_upsert(m, &f).is_some())
            .await?;
        session_upsert(&m, &f).cloned().context("the row")
    }
}

/// The status and JSON body of `GET /v1/admin/events` with `token`.
async fn refused(server: &Server, token: Option<&str>) -> Result<(u16, Value)> {
    let mut req = reqwest::Client::new().get(format!("http://{}/v1/admin/events", server.addr));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

fn session_upsert(m: &Value, pred: impl Fn(&Value) -> bool) -> Option<&Value> {
    m["upsert"].as_array()?.iter().find(|r| pred(r))
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_the_right_types() -> Result<()> {
    let s = Server::start(config()).await?;
    let base = format!("http://{}", s.addr);
    pages::check_files(
        &base,
        &[
            (
                "/admin",
                "text/html; charset=utf-8",
                "data-testid=\"screen-signin\"",
            ),
            (
                "/admin/",
                "text/html; charset=utf-8",
                "<meta name=\"viewport\"",
            ),
            (
                "/admin/app.js",
                "text/javascript; charset=utf-8",
                "/v1/admin/events",
            ),
            ("/admin/style.css", "text/css; charset=utf-8", "--row"),
            ("/assets/base.css", "text/css; charset=utf-8", ":root"),
            (
                "/admin/vendor/uPlot.iife.min.js",
                "text/javascript; charset=utf-8",
                "uPlot",
            ),
            (
                "/admin/vendor/uPlot.min.css",
                "text/css; charset=utf-8",
                ".uplot",
            ),
            (
                "/admin/vendor/uPlot.LICENSE",
                "text/plain; charset=utf-8",
                "The MIT License",
            ),
        ],
        &[
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ],
    )
    .await?;
    // Everything from this origin, by absolute path.
    let links = [
        "src=\"/admin/app.js\"",
        "src=\"/admin/vendor/uPlot.iife.min.js\"",
        "href=\"/admin/style.css\"",
        "href=\"/admin/vendor/uPlot.min.css\"",
        "href=\"/assets/base.css\"",
    ];
    pages::check_page_links(&base, "/admin", &links).await?;
    s.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_feed_refuses_missing_wrong_and_non_admin_tokens() -> Result<()> {
    let s = Server::start(config()).await?;
    let (status, body) = refused(&s, None).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("missing_token")),
        "{body}"
    );
    assert!(body["message"].is_string(), "{body}");

    let mut other = config();
    other.auth.secret = "another-secret-0123456789".into();
    let forged = Auth::new(&other.auth)?.mint("ops", Role::Admin, 60)?;
    let (status, body) = refused(&s, Some(&forged)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("bad_signature")),
        "{body}"
    );

    let (status, body) = refused(&s, Some("not.a.jwt")).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("bad_token")),
        "{body}"
    );

    // Expired a minute ago (past the 5 s leeway), otherwise good.
    let cfg = config();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = berth_server::auth::Claims {
        sub: "ops".into(),
        iss: cfg.auth.issuer.clone(),
        aud: cfg.auth.audience.clone(),
        exp: now - 60,
        iat: now - 120,
        role: Role::Admin,
    };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let (status, body) = refused(&s, Some(&expired)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("expired_token")),
        "{body}"
    );

    for role in [Role::Player, Role::Host] {
        let t = auth().mint("ana", role, 60)?;
        let (status, body) = refused(&s, Some(&t)).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("wrong_role")),
            "{body}"
        );
    }
    s.shutdown().await;
    Ok(())
}

fn short_placing() -> ServerConfig {
    let mut cfg = config();
    // No host exists: a match stays placing this long, then ends as placement_failed.
    cfg.timeouts.placing_ms = 1500;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_sends_a_snapshot_then_what_changes() -> Result<()> {
    let s = Server::start(short_placing()).await?;
    let (mut feed, snap) = Feed::snapshot(&s, &admin_token()).await?;
    assert_eq!(snap["replica"], s.ctx.replica.as_str());
    assert_eq!(snap["store"], "memory");
    for list in [
        "sessions",
        "hosts",
        "pools",
        "queues",
        "activation",
        "time_to_match",
    ] {
        assert_eq!(snap[list], json!([]), "{list}: {snap}");
    }
    assert!(snap["now_ms"].as_u64().is_some_and(|n| n > 0), "{snap}");
    assert!(snap["window_ms"].as_u64().is_some_and(|n| n > 0), "{snap}");

    // A player queues: the queue shows up within a tick.
    let mut ana = common::player(&s, "ana").await?;
    ana.send(&queue("duel", "eu")).await?;
    let q = feed
        .until("queues", Duration::from_secs(5), |m| {
            m["queues"][0]["depth"] == 1
        })
        .await?;
    assert_eq!(q["queues"][0]["mode"], "duel", "{q}");
    assert_eq!(q["queues"][0]["region"], "eu", "{q}");
    assert!(
        q["queues"][0]["oldest_enqueued_ms"].as_u64().is_some(),
        "{q}"
    );

    // A second one: a match, a session placing (no host), then ended.
    let mut ben = common::player(&s, "ben").await?;
    ben.send(&queue("duel", "eu")).await?;
    let row = feed
        .row(Duration::from_secs(5), |r| r["state"] == "placing")
        .await?;
    let id = row["id"].as_str().context("an id")?.to_owned();
    assert_eq!(row["mode"], "duel", "{row}");
    let mut players: Vec<&str> = row["players"]
        .as_array()
        .context("players")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    players.sort_unstable();
    assert_eq!(players, ["ana", "ben"], "{row}");
    for key in ["created_ms", "since_ms"] {
        assert!(row[key].as_u64().is_some(), "{key}: {row}");
    }
    let row = feed
        .row(Duration::from_secs(10), |r| {
            r["id"] == id.as_str() && r["state"] == "ended"
        })
        .await?;
    assert_eq!(row["end_reason"], "placement_failed", "{row}");
    for c in [&mut ana, &mut ben] {
        c.until(Duration::from_secs(5), |m| {
            matches!(m, ServerMessage::SessionEnded { .. })
        })
        .await?;
    }

    // A later watcher's snapshot lists the ended session.
    let (mut late, snap) = Feed::snapshot(&s, &admin_token()).await?;
    let listed = snap["sessions"].as_array().context("sessions")?;
    assert!(
        listed
            .iter()
            .any(|r| r["id"] == id.as_str() && r["state"] == "ended"),
        "{snap}"
    );
    // The sessions-over-time series has at least its first point.
    assert!(
        snap["series"].as_array().is_some_and(|s| !s.is_empty()),
        "{snap}"
    );

    // The server stops: both feeds hear why, and end.
    s.shutdown().await;
    for f in [&mut feed, &mut late] {
        let bye = f.until("bye", Duration::from_secs(5), |_| true).await?;
        assert_eq!(bye["reason"], "shutting_down");
        assert!(
            f.next(Duration::from_secs(5)).await?.is_none(),
            "ends after bye"
        );
    }
    Ok(())
}

#[tokio::test]
async fn dev_admin_tokens_only_in_dev_mode() -> Result<()> {
    let body = json!({"player": "ops", "role": "admin"});
    let http = reqwest::Client::new();
    let s = Server::start(config()).await?;
    let r = http
        .post(format!("http://{}/v1/dev/token", s.addr))
        .json(&body)
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await?["code"], "dev_tokens_disabled");
    s.shutdown().await;

    let mut cfg = config();
    cfg.auth.dev_tokens = true;
    let s = Server::start(cfg).await?;
    let url = format!("http://{}/v1/dev/token", s.addr);
    let ok: Value = http.post(&url).json(&body).send().await?.json().await?;
    assert_eq!(
        (&ok["player"], &ok["role"]),
        (&json!("ops"), &json!("admin")),
        "{ok}"
    );
    let token = ok["token"].as_str().context("a token")?;
    let claims = auth().verify(token, Role::Admin)?;
    assert_eq!(claims.sub, "ops");
    let (feed, _) = Feed::snapshot(&s, token).await?;
    // Player tokens as before; no other role.
    let ok: Value = http
        .post(&url)
        .json(&json!({"player": "nina"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(ok["role"], "player");
    let player = ok["token"].as_str().context("a token")?;
    assert_eq!(auth().verify_player(player)?.as_str(), "nina");
    let (status, body) = refused(&s, Some(player)).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("wrong_role")));
    let r = http
        .post(&url)
        .json(&json!({"player": "h1", "role": "host"}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await?["code"], "bad_role");
    drop(feed);
    s.shutdown().await;
    Ok(())
}

/// Two replicas on one Redis: a match formed through one shows up on the other's feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_follows_sessions_made_on_another_replica() -> Result<()> {
    use berth_server::store::redis::RedisStore;
    use berth_server::store::Store;
    use std::sync::Arc;
    let url = berth_testkit::fixtures::redis_url()?;
    let prefix = format!("dashboard-{}", uuid::Uuid::new_v4().simple());
    let one: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &prefix).await?);
    let two: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &prefix).await?);
    let r1 = Server::start_with(short_placing(), one).await?;
    let r2 = Server::start_with(short_placing(), two).await?;
    let (mut feed, snap) = Feed::snapshot(&r1, &admin_token()).await?;
    assert_eq!(snap["store"], "redis");
    let mut a = common::player(&r2, "rana").await?;
    let mut b = common::player(&r2, "rben").await?;
    a.send(&queue("duel", "eu")).await?;
    b.send(&queue("duel", "eu")).await?;
    let row = feed
        .row(Duration::from_secs(10), |r| r["state"] == "ended")
        .await?;
    assert_eq!(row["end_reason"], "placement_failed", "{row}");
    drop(feed);
    r1.shutdown().await;
    r2.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_opened_after_unwatched_changes_sees_them() -> Result<()> {
    // Nobody watches while a session forms and fails: the dashboard skips its store reads
    // then, and reads the store again when a feed opens.
    let s = Server::start(short_placing()).await?;
    let mut ana = common::player(&s, "ana").await?;
    let mut ben = common::player(&s, "ben").await?;
    ana.send(&queue("duel", "eu")).await?;
    ben.send(&queue("duel", "eu")).await?;
    ana.until(Duration::from_secs(10), |m| {
        matches!(m, ServerMessage::SessionEnded { .. })
    })
    .await?;
    // Give the dashboard a flush or two to notice nobody is watching.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_feed, snap) = Feed::snapshot(&s, &admin_token()).await?;
    let rows = snap["sessions"].as_array().context("sessions")?;
    assert_eq!(rows.len(), 1, "{snap}");
    assert_eq!(rows[0]["state"], "ended", "{snap}");
    assert_eq!(rows[0]["end_reason"], "placement_failed", "{snap}");
    drop(ben);
    s.shutdown().await;
    Ok(())
}
