//! Keeps `docs/openapi.json` honest: the admin routes it documents are exactly the ones
//! `berth_server::admin::routes()` serves, and what a real server answers on them has every
//! property the documented schemas require (and no undocumented one).

use anyhow::{bail, ensure, Context, Result};
use berth_server::app::Server;
use berth_server::auth::{Auth, Role};
use berth_server::config::{AuthConfig, ServerConfig, Timeouts};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SECRET: &str = "openapi-test-secret-0123456789";
const HOST: &str = "h-openapi";
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

fn spec() -> Result<Value> {
    let path = spec_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn config() -> ServerConfig {
    let defaults = ServerConfig::default();
    ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        modes_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/modes"),
        auth: AuthConfig {
            secret: SECRET.into(),
            ..defaults.auth
        },
        // The hostd test double below does not heartbeat on a timer: keep it from being marked lost.
        timeouts: Timeouts {
            host_lost_ms: 60_000,
            host_grace_ms: 60_000,
            ..defaults.timeouts
        },
        ..ServerConfig::default()
    }
}

/// (METHOD, path) of every operation under `/v1/admin` in the spec.
fn documented_admin_routes(spec: &Value) -> Result<BTreeSet<(String, String)>> {
    let paths = spec["paths"].as_object().context("spec has no paths")?;
    let mut out = BTreeSet::new();
    for (path, item) in paths.iter().filter(|(p, _)| p.starts_with("/v1/admin")) {
        let item = item.as_object().context("a path item is not an object")?;
        for method in item.keys().filter(|k| METHODS.contains(&k.as_str())) {
            out.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    Ok(out)
}

/// Follows `$ref`s (`#/…` JSON pointers into the spec).
fn resolve<'a>(spec: &'a Value, mut v: &'a Value) -> Result<&'a Value> {
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return Ok(v);
        };
        let pointer = r
            .strip_prefix('#')
            .with_context(|| format!("non-local $ref {r}"))?;
        v = spec
            .pointer(pointer)
            .with_context(|| format!("dangling $ref {r}"))?;
    }
    bail!("$ref chain too long")
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        _ => false,
    }
}

/// Checks `value` against `schema`: types, enums, consts, `anyOf`/`oneOf`, every `required`
/// property present, no property the schema does not list, array items.
fn check(spec: &Value, schema: &Value, value: &Value, at: &str) -> Result<()> {
    let schema = resolve(spec, schema)?;
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            ensure!(
                branches.iter().any(|b| check(spec, b, value, at).is_ok()),
                "{at}: {value} matches none of the {key} branches"
            );
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            other => bail!("{at}: bad type in the schema: {other}"),
        };
        ensure!(
            types.iter().any(|t| is_type(value, t)),
            "{at}: expected {types:?}, got {value}"
        );
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        ensure!(
            allowed.contains(value),
            "{at}: {value} is not one of {allowed:?}"
        );
    }
    if let Some(c) = schema.get("const") {
        ensure!(c == value, "{at}: expected {c}, got {value}");
    }
    if let Value::Object(obj) = value {
        let required = schema.get("required").and_then(Value::as_array);
        for name in required.into_iter().flatten() {
            let name = name.as_str().context("a required entry is not a string")?;
            ensure!(
                obj.contains_key(name),
                "{at}: required property `{name}` is missing from {value}"
            );
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, v) in obj {
                let sub = props
                    .get(name)
                    .with_context(|| format!("{at}: property `{name}` is not documented"))?;
                check(spec, sub, v, &format!("{at}.{name}"))?;
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            check(spec, item, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The documented JSON schema of `method path`'s answer with `status`.
fn response_schema<'a>(
    spec: &'a Value,
    method: &str,
    path: &str,
    status: u16,
) -> Result<&'a Value> {
    let op = spec["paths"]
        .get(path)
        .and_then(|p| p.get(method.to_ascii_lowercase()))
        .with_context(|| format!("{method} {path} is not documented"))?;
    let response = op["responses"]
        .get(status.to_string())
        .with_context(|| format!("{method} {path}: no {status} response documented"))?;
    resolve(spec, response)?
        .pointer("/content/application~1json/schema")
        .with_context(|| format!("{method} {path} {status}: no application/json schema"))
}

#[test]
fn documented_admin_routes_are_exactly_the_served_ones() -> Result<()> {
    let spec = spec()?;
    assert_eq!(spec["openapi"], "3.1.0");
    let documented = documented_admin_routes(&spec)?;
    let served: BTreeSet<(String, String)> = berth_server::admin::routes()
        .into_iter()
        .map(|(m, p, _)| (m.as_str().to_owned(), p.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "served but not in docs/openapi.json: {undocumented:?}; documented but not served: {missing:?}"
    );
    // Every `{param}` in a documented path is a documented path parameter.
    for (method, path) in &documented {
        let item = &spec["paths"][path];
        let op = &item[method.to_ascii_lowercase()];
        let params: Vec<&Value> = [&item["parameters"], &op["parameters"]]
            .into_iter()
            .filter_map(Value::as_array)
            .flatten()
            .collect();
        for name in path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        {
            let found = params
                .iter()
                .any(|p| resolve(&spec, p).is_ok_and(|p| p["in"] == "path" && p["name"] == name));
            assert!(
                found,
                "{method} {path}: path parameter {name} is not documented"
            );
        }
    }
    Ok(())
}

/// A raw socket (berth-client's): this test compares what the server says, as JSON, with
/// what the documents promise, so it reads and writes JSON values rather than typed messages.
type Ws = berth_client::Socket;

async fn connect(url: &str, bearer: Option<&str>) -> Result<Ws> {
    let options = berth_client::ConnectOptions::with_bearer(bearer);
    berth_client::Socket::connect(url, options)
        .await
        .with_context(|| format!("connecting to {url}"))
}

async fn send(ws: &mut Ws, v: Value) -> Result<()> {
    ensure!(ws.send_text(v.to_string()).await, "the socket is gone");
    Ok(())
}

/// Reads messages until one has `type` == `kind` (5 s at most); fails on an `error`.
async fn until(ws: &mut Ws, kind: &str) -> Result<Value> {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let item = tokio::time::timeout_at(end, ws.recv())
            .await
            .with_context(|| format!("no {kind} in time"))?;
        let t = match item {
            berth_client::Incoming::Text(t) => t,
            berth_client::Incoming::Binary(_) => continue,
            berth_client::Incoming::Closed(c) => bail!("closed while waiting for {kind}: {c:?}"),
        };
        let m: Value = serde_json::from_str(&t)?;
        if m["type"] == kind {
            return Ok(m);
        }
        ensure!(m["type"] != "error", "waiting for {kind}, got {m}");
    }
}

/// A player connection after `welcome`.
async fn player(server: &Server, auth: &Auth, name: &str) -> Result<Ws> {
    let mut ws = connect(&format!("ws://{}/v1/play", server.addr), None).await?;
    let token = auth.mint(name, Role::Player, 3600)?;
    send(&mut ws, json!({"type": "hello", "v": 1, "token": token})).await?;
    let welcome = until(&mut ws, "welcome").await?;
    ensure!(welcome["player"] == name, "{welcome}");
    Ok(ws)
}

async fn queue(ws: &mut Ws, mode: &str) -> Result<Value> {
    send(ws, json!({"type": "queue", "mode": mode, "region": "eu"})).await?;
    until(ws, "queue_status").await
}

/// A test double of hostd (a scripted client of `/v1/hosts`) offering the `arena` image: the
/// admin schemas need a host and an active session, and this test is about the HTTP shapes,
/// not VMs (the real hostd with real VMs is driven in `tests/tests/stack.rs`).
async fn host(server: &Server, auth: &Auth) -> Result<Ws> {
    let token = auth.mint(HOST, Role::Host, 3600)?;
    let mut ws = connect(&format!("ws://{}/v1/hosts", server.addr), Some(&token)).await?;
    send(
        &mut ws,
        json!({
            "type": "register", "v": 1, "host": HOST, "accel": "tcg", "driver": "qemu",
            "gateway": "ws://127.0.0.1:7071", "max_vms": 4,
            "images": [{"name": "arena", "docked": true, "warm": 1, "running": 0,
                        "memory_mib": 128, "vcpus": 1}],
            "vms": []
        }),
    )
    .await?;
    until(&mut ws, "welcome").await?;
    Ok(ws)
}

struct Http {
    client: reqwest::Client,
    base: String,
    admin: String,
}

impl Http {
    /// `method path` with the admin token; the status and the JSON body.
    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.client.get(&url),
            "POST" => self.client.post(&url),
            other => bail!("no client for {other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("{method} {path} answered {status} with non-JSON {text:?}"))?;
        Ok((status, body))
    }

    async fn admin(&self, method: &str, path: &str) -> Result<(u16, Value)> {
        self.call(method, path, Some(&self.admin)).await
    }
}

/// The concrete path for a documented template.
/// Every documented route of `method` answers 200 with the documented shape (a list: not
/// empty, so that something was checked).
async fn every_route_answers(
    http: &Http,
    spec: &Value,
    routes: &BTreeSet<(String, String)>,
    method: &str,
    session: &str,
) -> Result<()> {
    // A move needs two real hosts that answer `receive` and `send`: its 200 is checked by
    // `tests/fleet.rs`, its refusals below.
    let moves = |t: &str| t.ends_with("/migrate");
    for (_, template) in routes.iter().filter(|(m, t)| m == method && !moves(t)) {
        let path = concrete(template, session)?;
        let (status, body) = http.admin(method, &path).await?;
        assert_eq!(status, 200, "{method} {path}: {body}");
        if let Some(list) = body.as_array() {
            assert!(!list.is_empty(), "{method} {path}: empty, nothing checked");
        }
        check(
            spec,
            response_schema(spec, method, template, 200)?,
            &body,
            &path,
        )?;
    }
    Ok(())
}

fn concrete(template: &str, session: &str) -> Result<String> {
    if template.contains("/hosts/{id}") {
        Ok(template.replace("{id}", HOST))
    } else if template.contains("/sessions/{id}") {
        Ok(template.replace("{id}", session))
    } else if template.contains('{') {
        bail!("no value for the parameters of {template}")
    } else {
        Ok(template.to_owned())
    }
}

#[tokio::test]
async fn admin_answers_match_the_documented_schemas() -> Result<()> {
    let spec = spec()?;
    let cfg = config();
    let auth = Auth::new(&cfg.auth)?;
    let server = Server::start(cfg).await?;

    // Data for every list: a host, an active session on it, a queued player.
    let mut hostd = host(&server, &auth).await?;
    let mut a = player(&server, &auth, "ana").await?;
    let mut b = player(&server, &auth, "ben").await?;
    queue(&mut a, "duel").await?;
    send(
        &mut b,
        json!({"type": "queue", "mode": "duel", "region": "eu", "skill": 1000.0}),
    )
    .await?;
    let activate = until(&mut hostd, "activate").await?;
    let session = activate["session"]
        .as_str()
        .context("activate without a session")?
        .to_owned();
    send(
        &mut hostd,
        json!({"type": "activated", "session": session, "vm": "vm-1", "path": "warm",
               "activate_us": 900}),
    )
    .await?;
    for p in [&mut a, &mut b] {
        let m = until(p, "matched").await?;
        ensure!(m["session"] == session.as_str(), "{m}");
    }
    let mut c = player(&server, &auth, "cid").await?;
    queue(&mut c, "arena").await?;
    send(
        &mut hostd,
        json!({"type": "heartbeat", "images": heartbeat_images()}),
    )
    .await?;

    let http = Http {
        client: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
        admin: auth.mint("ops", Role::Admin, 3600)?,
    };
    let routes = documented_admin_routes(&spec)?;

    // Every documented GET: 200 and the documented shape, on non-empty data.
    every_route_answers(&http, &spec, &routes, "GET", &session).await?;
    let (status, active) = http.admin("GET", "/v1/admin/sessions?state=active").await?;
    assert_eq!(status, 200);
    let states: Vec<&Value> = active
        .as_array()
        .context("not a list")?
        .iter()
        .map(|s| &s["state"])
        .collect();
    assert_eq!(states, [&json!("active")], "{active}");
    let (status, body) = http.admin("GET", "/v1/admin/sessions?state=nope").await?;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("bad_state")),
        "{body}"
    );
    let error_schema = response_schema(&spec, "GET", "/v1/admin/sessions", 400)?;
    check(&spec, error_schema, &body, "bad_state")?;

    // Every documented POST (drain, undrain, end) on real targets.
    every_route_answers(&http, &spec, &routes, "POST", &session).await?;
    let end = format!("/v1/admin/sessions/{session}/end");
    let (status, body) = http.admin("POST", &end).await?;
    assert_eq!((status, &body["code"]), (409, &json!("not_live")), "{body}");
    let schema = response_schema(&spec, "POST", "/v1/admin/sessions/{id}/end", 409)?;
    check(&spec, schema, &body, "not_live")?;
    let migrate = format!("/v1/admin/sessions/{session}/migrate");
    let (status, body) = http.admin("POST", &migrate).await?;
    assert_eq!(
        (status, &body["code"]),
        (409, &json!("not_active")),
        "{body}"
    );
    let schema = response_schema(&spec, "POST", "/v1/admin/sessions/{id}/migrate", 409)?;
    check(&spec, schema, &body, "not_active")?;
    let (status, body) = http.admin("GET", "/v1/admin/sessions/s-none").await?;
    assert_eq!((status, &body["code"]), (404, &json!("unknown_session")));
    check(
        &spec,
        response_schema(&spec, "GET", "/v1/admin/sessions/{id}", 404)?,
        &body,
        "unknown_session",
    )?;

    // No token: 401 missing_token; a player's token: 403 wrong_role.
    let (status, body) = http.call("GET", "/v1/admin/hosts", None).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "missing_token", "{body}");
    assert!(body["message"].is_string(), "{body}");
    check(
        &spec,
        response_schema(&spec, "GET", "/v1/admin/hosts", 401)?,
        &body,
        "401",
    )?;
    let player_token = auth.mint("ana", Role::Player, 60)?;
    let (status, body) = http
        .call("GET", "/v1/admin/queues", Some(&player_token))
        .await?;
    assert_eq!(
        (status, &body["code"]),
        (403, &json!("wrong_role")),
        "{body}"
    );

    // The server serves this very document.
    let (status, served) = http.call("GET", "/v1/openapi.json", None).await?;
    assert_eq!(status, 200);
    assert!(
        served == spec,
        "GET /v1/openapi.json differs from {}",
        spec_path().display()
    );

    drop((a, b, c, hostd));
    server.shutdown().await;
    Ok(())
}

fn heartbeat_images() -> Value {
    json!([{"name": "arena", "docked": true, "warm": 0, "running": 1,
            "memory_mib": 128, "vcpus": 1}])
}

/// Every error the admin API answers has a code the `Error` schema lists (an enum, so that a
/// code added to the server and not to the document fails here), and the right status.
#[tokio::test]
async fn every_admin_error_code_is_documented() -> Result<()> {
    let spec = spec()?;
    let documented: BTreeSet<String> = spec
        .pointer("/components/schemas/Error/properties/code/enum")
        .and_then(Value::as_array)
        .context("the Error schema lists no codes (an enum)")?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    for c in &documented {
        let known = berth_protocol::ErrorCode::from(c.as_str());
        ensure!(
            !matches!(known, berth_protocol::ErrorCode::Other(_)),
            "{c} is not a known error code"
        );
    }
    let cfg = config();
    let auth = Auth::new(&cfg.auth)?;
    let server = Server::start(cfg).await?;
    let http = Http {
        client: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
        admin: auth.mint("ops", Role::Admin, 3600)?,
    };
    let player = auth.mint("ana", Role::Player, 60)?;
    // "METHOD path token status code", the token one of: admin, player, none, junk.
    let cases = [
        "GET /v1/admin/sessions?limit=0 admin 400 bad_limit",
        "GET /v1/admin/sessions?limit=lots admin 400 bad_query",
        "GET /v1/admin/sessions?state=nope admin 400 bad_state",
        "POST /v1/admin/hosts/.x/drain admin 400 bad_id",
        "POST /v1/admin/hosts/h-none/drain admin 404 unknown_host",
        "GET /v1/admin/sessions/s-none admin 404 unknown_session",
        "POST /v1/admin/sessions/s-none/migrate admin 404 unknown_session",
        "POST /v1/admin/sessions/.x/migrate admin 400 bad_id",
        "GET /v1/admin/hosts none 401 missing_token",
        "GET /v1/admin/hosts junk 401 bad_token",
        "GET /v1/admin/pools player 403 wrong_role",
    ];
    let error = json!({"$ref": "#/components/schemas/Error"});
    for case in cases {
        let [method, path, who, status, code] = case.split(' ').collect::<Vec<_>>()[..] else {
            bail!("bad case {case}");
        };
        let token = match who {
            "admin" => Some(http.admin.as_str()),
            "player" => Some(player.as_str()),
            "junk" => Some("x.y.z"),
            _ => None,
        };
        let (got, body) = http.call(method, path, token).await?;
        assert_eq!(got.to_string(), status, "{case}: {body}");
        assert_eq!(body["code"], code, "{case}: {body}");
        check(&spec, &error, &body, path)?;
    }
    server.shutdown().await;
    Ok(())
}
