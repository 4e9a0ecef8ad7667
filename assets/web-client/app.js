// Berth's reference web client: sign in (dev token), pick a mode, queue on /v1/play, play the
// match through the host's gateway (matched.endpoint), see the results. Plain JS, no build step.
// The protocols are in docs/protocol.md (player ↔ server) and protocol/src/game.rs (player ↔ game).
'use strict';

(() => {
  const PROTOCOL_VERSION = 1;
  // `?region=eu` queues in that region; `?region=*` times each region's gateways and queues
  // with the latencies (docs/protocol.md, Queueing by latency).
  const REGION = new URLSearchParams(location.search).get('region') || 'local';
  const BY_LATENCY = '*';
  const PROBE_TRIES = 3;
  const PROBE_TIMEOUT_MS = 2000;
  const NAME_KEY = 'berth.player';
  const ID_RE = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/;
  const MODES = [
    { name: 'sprint', title: 'Sprint', desc: '1 vs 1 · first to 5 points or 20 seconds' },
    { name: 'duel', title: 'Duel', desc: '1 vs 1 · first to 10 points or 3 minutes' },
    { name: 'arena', title: 'Arena', desc: '2–8 players in two teams · first to 20' },
    { name: 'reflex', title: 'Reflex', desc: '1 vs 1 · tap the arrow first after GO' },
  ];
  const TEAMS = [
    { name: 'Blue', color: '#3b82f6' },
    { name: 'Orange', color: '#f97316' },
    { name: 'Green', color: '#22c55e' },
    { name: 'Purple', color: '#c084fc' },
  ];
  // From protocol/src/game.rs.
  const PLAYER_RADIUS = 0.35;
  const MAX_HP = 100;
  // Game socket: tries with the same ticket before asking the server for a fresh one.
  const GAME_RETRIES = 4;
  const GAME_RENEWALS = 3;
  const REASONS = {
    score_limit: 'Score limit reached',
    time_limit: 'Time is up',
    surrender: 'A team surrendered',
    forfeit: 'A team left the match',
    abandoned: 'Everybody left',
    game_over: 'Game over',
    admin: 'Ended by an operator',
    deadline: 'The match reached its time limit',
    vm_failed: 'The game server failed',
    vm_lost: 'The game server was lost',
    host_lost: 'The game host stopped answering',
    placement_failed: 'No game server was free',
    first_to: 'First to the winning score',
    max_rounds: 'All rounds played',
    game_crashed: 'The game server crashed',
    game_unhealthy: 'The game server stopped responding',
  };
  const ARROWS = { up: '↑', down: '↓', left: '←', right: '→' };

  const $ = (id) => document.getElementById(id);
  const team = (i) => TEAMS[i % TEAMS.length] || { name: `Team ${i + 1}`, color: '#94a3b8' };
  const now = () => Date.now();
  const jitter = (ms) => ms * (0.8 + Math.random() * 0.4);
  const clock = (ms) => {
    const s = Math.max(0, Math.floor(ms / 1000));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
  };

  // The client's whole state. The server is the source of truth: on every reconnect it tells
  // us again whether we are queued, matched or in a session that is ending.
  const st = {
    screen: null,
    player: null,
    token: null,
    mode: null, // the mode we queue (or queued) for
    ticket: null, // our queue ticket id, while queued
    queueSince: 0, // local time the wait started (from queue_status.waited_ms)
    queueRetries: 0,
    queueTimer: null,
    measuring: false, // timing the regions' probes before a latency queue
    session: null, // {id, mode, endpoint, ticket, ticketExpires, team, teams}
    ended: new Set(), // sessions whose end we have shown
    results: null, // {session, reason, results, fromGame}
  };

  // ---------------------------------------------------------------- screens and messages

  const SCREENS = ['signin', 'modes', 'queue', 'connecting', 'playing', 'reflex', 'results'];
  const TITLES = {
    signin: 'Sign in', modes: 'Pick a mode', queue: 'Finding a match',
    connecting: 'Match found', playing: 'Playing', reflex: 'Playing Reflex', results: 'Results',
  };

  function show(screen) {
    if (st.screen === screen) return;
    st.screen = screen;
    for (const s of SCREENS) $(`screen-${s}`).hidden = s !== screen;
    document.body.dataset.screen = screen;
    document.title = `${TITLES[screen]} — Berth`;
    const focus = {
      signin: 'name', modes: null, queue: 'queue-title', connecting: 'connecting-title',
      playing: 'canvas', results: 'outcome',
    }[screen];
    if (screen === 'modes') document.querySelector('#modes button')?.focus();
    else if (focus) $(focus).focus({ preventScroll: true });
    if (screen === 'playing') game.startDrawing();
    if (screen !== 'playing' && $('surrender-dialog').open) $('surrender-dialog').close();
  }

  let errorCode = null;
  function showError(code, message) {
    errorCode = code;
    $('error-text').textContent = message ? `${message} (${code})` : code;
    $('error').hidden = false;
  }
  // Errors that came with a close are over once the connection is back.
  function clearConnectionError() {
    if (['shutting_down', 'idle_timeout', 'hello_timeout', 'slow_consumer', 'rate_limited'].includes(errorCode)) clearError();
  }
  function clearError() {
    $('error').hidden = true;
  }
  function netStatus(text, retryButton = false) {
    $('net').hidden = !text;
    $('net-text').textContent = text || '';
    $('net-retry').hidden = !retryButton;
  }

  function renderTeams(el, teams, myTeam) {
    el.replaceChildren();
    (teams || []).forEach((members, i) => {
      const box = document.createElement('div');
      box.className = 'team';
      box.style.setProperty('--team', team(i).color);
      const h = document.createElement('h2');
      h.textContent = `${team(i).name}${i === myTeam ? ' (you)' : ''}`;
      const ul = document.createElement('ul');
      for (const p of members) {
        const li = document.createElement('li');
        li.textContent = p;
        ul.append(li);
      }
      box.append(h, ul);
      el.append(box);
    });
  }

  // ---------------------------------------------------------------- sign in

  async function signIn(name) {
    clearError();
    if (!ID_RE.test(name)) {
      showError('bad_player', 'Use 1–64 letters, digits, "-", "_" or "." (not starting with ".")');
      show('signin');
      return;
    }
    $('signin').disabled = true;
    try {
      const r = await fetch('/v1/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ player: name }),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok || !body.token) {
        showError(body.code || `http_${r.status}`, body.message || 'the server did not give a token');
        show('signin');
        return;
      }
      st.player = body.player;
      st.token = body.token;
      try { localStorage.setItem(NAME_KEY, st.player); } catch (_) { /* private mode */ }
      $('who').textContent = `Signed in as ${st.player}`;
      show('modes');
      play.connect();
    } catch (e) {
      showError('network', `Could not reach the server: ${e.message}`);
      show('signin');
    } finally {
      $('signin').disabled = false;
    }
  }

  function signOut() {
    if (st.ticket) play.send({ type: 'cancel' });
    play.stop();
    game.stop();
    st.player = st.token = st.ticket = st.session = null;
    try { localStorage.removeItem(NAME_KEY); } catch (_) { /* private mode */ }
    $('who').textContent = '';
    netStatus(null);
    show('signin');
  }

  // ---------------------------------------------------------------- queueing

  function queueFor(mode) {
    clearError();
    st.mode = mode;
    st.queueRetries = 0;
    st.queueSince = now();
    st.ticket = null;
    const m = MODES.find((x) => x.name === mode);
    $('queue-mode').textContent = m ? `${m.title} · ${m.desc}` : mode;
    $('queue-status').textContent = 'Joining the queue…';
    $('wait').textContent = '0:00';
    show('queue');
    sendQueue();
  }

  function sendQueue() {
    clearTimeout(st.queueTimer);
    st.queueTimer = null;
    if (st.screen !== 'queue' || st.ticket) return;
    // Not connected: `welcome` sends it (see play.onWelcome).
    if (REGION !== BY_LATENCY) {
      play.send({ type: 'queue', mode: st.mode, region: REGION });
      return;
    }
    if (st.measuring) return;
    st.measuring = true;
    $('queue-status').textContent = 'Measuring the way to each region…';
    measureLatencies().then((latencies) => {
      st.measuring = false;
      if (st.screen !== 'queue' || st.ticket) return;
      if (!Object.keys(latencies).length) {
        showError('no_regions', 'no region answered its latency probe');
        show('modes');
        return;
      }
      play.send({ type: 'queue', mode: st.mode, latencies });
    }, (e) => {
      st.measuring = false;
      showError(e.message, 'could not read the regions');
      show('modes');
    });
  }

  // Each region's best round trip (ms) to its gateways' probes: GET /v1/regions lists them; a
  // few GETs each, the fastest counts (the first pays for the connection).
  async function measureLatencies() {
    const r = await fetch('/v1/regions', {
      headers: { Authorization: `Bearer ${st.token}` }, cache: 'no-store',
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.code || `http_${r.status}`);
    const out = {};
    for (const { region, probes } of body.regions || []) {
      let best = Infinity;
      for (const url of probes || []) {
        for (let i = 0; i < PROBE_TRIES; i++) {
          const t = performance.now();
          try {
            const p = await fetch(url, { cache: 'no-store', signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
            if (p.ok) best = Math.min(best, performance.now() - t);
          } catch (_) { /* not through this probe */ }
        }
      }
      if (best < Infinity) out[region] = Math.max(1, Math.round(best));
    }
    return out;
  }

  function cancelQueue() {
    clearTimeout(st.queueTimer);
    st.queueTimer = null;
    if (st.ticket && play.send({ type: 'cancel' })) {
      $('queue-status').textContent = 'Leaving the queue…';
      return; // `dequeued` takes us back
    }
    st.ticket = null;
    show('modes');
  }

  setInterval(() => {
    if (st.screen === 'queue') $('wait').textContent = clock(now() - st.queueSince);
  }, 250);

  // ---------------------------------------------------------------- the play socket

  // Both sockets (play and game) the same way: `first` sent on open, JSON messages to
  // `owner.onMessage` (anything else ignored), and on close — unless `owner` has moved on to
  // another socket — its ping timer stopped and `closed(event)` called.
  function wire(owner, ws, first, closed) {
    ws.onopen = () => ws.send(JSON.stringify(first));
    ws.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch (_) { return; }
      owner.onMessage(m);
    };
    ws.onclose = (e) => {
      if (owner.ws !== ws) return;
      owner.ws = null;
      clearInterval(owner.pingTimer);
      closed(e);
    };
  }

  const play = {
    ws: null,
    welcomed: false,
    attempt: 0,
    timer: null,
    pingTimer: null,
    resumeTimer: null,
    stopped: true,
    reminted: false,
    nonce: 0,

    url() {
      return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/play`;
    },

    connect() {
      this.stopped = false;
      clearTimeout(this.timer);
      if (this.ws) return;
      const ws = new WebSocket(this.url());
      this.ws = ws;
      this.welcomed = false;
      wire(this, ws, { type: 'hello', v: PROTOCOL_VERSION, token: st.token }, (e) => {
        this.welcomed = false;
        clearTimeout(this.resumeTimer);
        this.onClose(e.code, e.reason);
      });
    },

    // Closes for good (sign out).
    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000, 'bye');
    },

    // Reconnects at once: the server answers `hello` with our state again, and a session's
    // `matched` with a fresh ticket.
    restart() {
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000, 'renew');
      this.attempt = 0;
      this.connect();
    },

    send(m) {
      if (!this.ws || !this.welcomed || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(m));
      return true;
    },

    retryLater(minMs = 0) {
      if (this.stopped) return;
      const ms = Math.max(minMs, jitter(Math.min(10000, 250 * 2 ** this.attempt)));
      this.attempt += 1;
      netStatus(`Connection to the server lost — reconnecting in ${Math.ceil(ms / 1000)} s (try ${this.attempt})…`);
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.connect(), ms);
    },

    async onClose(code, reason) {
      if (this.stopped) return;
      if (code === 4409) {
        // Another tab or device took over: reconnecting on our own would fight it.
        netStatus('You are playing in another tab or on another device.', true);
        return;
      }
      if (code === 4401) {
        // The token was refused: a development token is re-minted once, then we give up.
        if (!this.reminted) {
          this.reminted = true;
          const ok = await remint();
          if (ok) { this.connect(); return; }
        }
        this.stopped = true;
        netStatus(null);
        show('signin');
        return;
      }
      if (code === 4400) {
        // A protocol problem: retrying in a loop would not help.
        this.stopped = true;
        netStatus(`The server refused this client (${reason || code}).`, true);
        return;
      }
      this.retryLater(code === 4429 ? 5000 : 0);
    },

    onWelcome(m) {
      this.welcomed = true;
      this.attempt = 0;
      this.reminted = false;
      netStatus(null);
      clearConnectionError();
      $('who').textContent = `Signed in as ${m.player}`;
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.send({ type: 'ping', nonce: ++this.nonce }),
        Math.max(1000, m.ping_interval_ms || 20000));
      // The server now tells us where we stand (queue_status, matched, session_ended) or
      // says nothing: then a queue we wanted is gone (or never made it) and we ask again.
      clearTimeout(this.resumeTimer);
      this.resumeTimer = setTimeout(() => {
        if (st.screen === 'queue') { st.ticket = null; sendQueue(); }
      }, 500);
    },

    onMessage(m) {
      if (m.type !== 'welcome' && m.type !== 'pong') clearTimeout(this.resumeTimer);
      switch (m.type) {
        case 'welcome': return this.onWelcome(m);
        case 'queue_status': return onQueueStatus(m);
        case 'dequeued': return onDequeued(m);
        case 'matched': return onMatched(m);
        case 'session_ended': return onSessionEnded(m);
        case 'error': return onPlayError(m);
        default: return undefined; // pong, and types added later
      }
    },
  };

  async function remint() {
    try {
      const r = await fetch('/v1/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ player: st.player }),
      });
      const body = await r.json().catch(() => ({}));
      if (r.ok && body.token) { st.token = body.token; return true; }
      showError(body.code || `http_${r.status}`, body.message || 'could not renew the token');
    } catch (e) {
      showError('network', `Could not reach the server: ${e.message}`);
    }
    return false;
  }

  function onQueueStatus(m) {
    st.ticket = m.ticket;
    st.mode = m.mode;
    st.queueSince = now() - (m.waited_ms || 0);
    if (st.screen !== 'queue') {
      const mode = MODES.find((x) => x.name === m.mode);
      $('queue-mode').textContent = mode ? `${mode.title} · ${mode.desc}` : m.mode;
      show('queue');
    }
    $('wait').textContent = clock(now() - st.queueSince);
    const window = Math.round(m.skill_window || 0);
    const latency = m.latency_allowed_ms ? ` · regions within ${m.latency_allowed_ms} ms` : '';
    $('queue-status').textContent =
      `${m.queued} ${m.queued === 1 ? 'player' : 'players'} queued for ${m.mode} · skill window ±${window}${latency}`;
  }

  function onDequeued(m) {
    st.ticket = null;
    if (m.reason !== 'cancelled') {
      const why = {
        max_wait: 'No match was found in time',
        away: 'You were away too long and left the queue',
        mode_removed: 'This mode is no longer offered',
        ticket_lost: 'The server lost your place in the queue; please queue again',
      }[m.reason] || 'You left the queue';
      showError(m.reason, why);
    }
    if (st.screen === 'queue') show('modes');
  }

  function onMatched(m) {
    if (st.ended.has(m.session)) return;
    st.ticket = null;
    clearTimeout(st.queueTimer);
    const same = st.session && st.session.id === m.session;
    st.session = {
      id: m.session,
      mode: m.mode,
      endpoint: m.endpoint,
      ticket: m.ticket,
      ticketExpires: m.ticket_expires_ms,
      team: m.team,
      teams: m.teams,
    };
    st.mode = m.mode;
    if (!same) {
      st.results = null;
      const why = m.region_reason || {};
      $('match-region').textContent = !m.region ? ''
        : why.rule === 'latency'
          ? `Playing in ${m.region}: the nearest region for everyone in the match (slowest ${why.worst_ms} ms)`
          : `Playing in ${m.region}`;
      renderTeams($('connect-teams'), m.teams, m.team);
      $('connect-status').textContent = 'Connecting to the game…';
      show('connecting');
      game.start();
    } else {
      game.ticketRenewed();
    }
  }

  function onSessionEnded(m) {
    if (st.ended.has(m.session)) return;
    if (st.session && st.session.id !== m.session) return; // an older session
    st.ended.add(m.session);
    game.stop();
    finish(m.session, m.reason, m.results, false);
  }

  function onPlayError(m) {
    if (m.code === 'in_session' && st.screen === 'queue' && !st.ticket) {
      // Right after a match the server needs a few seconds to wind the session down.
      st.queueRetries += 1;
      if (st.queueRetries <= 20) {
        $('queue-status').textContent = `Your last match is still winding down (${m.code}); trying again…`;
        clearTimeout(st.queueTimer);
        st.queueTimer = setTimeout(sendQueue, 1000);
        return;
      }
    }
    if (m.code === 'already_queued' && st.screen === 'queue') return; // a resume raced our queue
    if (m.code === 'not_queued' && st.screen === 'queue') { show('modes'); return; }
    if (m.code === 'replaced') return; // the close (4409) says it
    showError(m.code, m.message);
    if (st.screen === 'queue' && !st.ticket && ['unknown_mode', 'unknown_region', 'bad_latencies', 'bad_skill', 'party_too_big'].includes(m.code)) {
      show('modes');
    }
  }

  // ---------------------------------------------------------------- the game socket

  const input = {
    keys: new Set(),
    mouseFire: false,
    keyFire: false,
    mouse: null, // {x, y} in CSS px over the canvas
    stick: null, // {id, x0, y0, x, y}
    aimTouch: null, // {id, x0, y0, x, y}
    aim: 0,
    sent: null,
    lastSend: 0,
    timer: null,
  };

  const game = {
    ws: null,
    welcome: null,
    prev: null,
    snap: null,
    ended: false,
    tries: 0,
    renewals: 0,
    retryTimer: null,
    pingTimer: null,
    seq: 0,
    rtt: null,
    waitingTicket: false,
    noRetry: false,
    drawing: false,
    me: null, // own player's screen position in CSS px
    view: null, // the field's layout on the canvas (see `layout`)
    mapCache: null,

    start() {
      this.stop();
      const c = $('canvas');
      for (const k of ['joins', 'tick', 'players', 'me', 'shots']) delete c.dataset[k];
      this.welcome = null;
      this.prev = this.snap = null;
      this.ended = false;
      this.tries = 0;
      this.renewals = 0;
      this.noRetry = false;
      this.open();
    },

    stop() {
      clearTimeout(this.retryTimer);
      clearInterval(this.pingTimer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000, 'bye');
    },

    open() {
      clearTimeout(this.retryTimer);
      const s = st.session;
      if (!s || this.ended || this.ws) return;
      this.waitingTicket = false;
      let ws;
      try {
        ws = new WebSocket(s.endpoint);
      } catch (e) {
        showError('bad_endpoint', `Cannot open ${s.endpoint}: ${e.message}`);
        return;
      }
      this.ws = ws;
      this.seq = 0;
      input.sent = null;
      wire(this, ws, { type: 'join', ticket: s.ticket }, (e) => this.onClose(e.code));
    },

    // Drops the socket without treating it as a drop (a fresh ticket is on its way).
    detach() {
      clearInterval(this.pingTimer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000, 'renew');
    },

    // A drop: the same ticket again a few times with backoff, then a fresh ticket. An
    // expired or refused ticket is renewed at once (`onError`).
    onClose(code) {
      if (this.ended || !st.session || st.ended.has(st.session.id)) return;
      if (this.noRetry) {
        note('Disconnected from the game; waiting for the result…');
        return;
      }
      if (this.waitingTicket) return;
      if (code === 1009 || code === 4400) {
        // The gateway refused what this page sent: retrying would do the same.
        if (code === 1009) showError('message_too_big', 'The game refused a message from this page.');
        note('Disconnected from the game; waiting for the result…');
        return;
      }
      if (this.tries >= GAME_RETRIES) { this.renew(); return; }
      const ms = Math.max(code === 4429 ? 5000 : 0, jitter(500 * 2 ** this.tries));
      this.tries += 1;
      const text = `Connection to the game lost — reconnecting (try ${this.tries} of ${GAME_RETRIES})…`;
      if (st.screen === 'connecting') $('connect-status').textContent = text;
      note(text);
      this.retryTimer = setTimeout(() => this.open(), ms);
    },

    // Gets a fresh ticket: the server re-sends `matched` when the play socket says hello again.
    renew() {
      if (this.renewals >= GAME_RENEWALS) {
        showError('game_unreachable', 'Could not reach the game server; waiting for the server to end the match.');
        note('Cannot reach the game.');
        return;
      }
      this.renewals += 1;
      this.tries = 0;
      this.waitingTicket = true;
      note('Getting a fresh ticket…');
      play.restart();
    },

    ticketRenewed() {
      if (!this.ws && !this.ended) { this.waitingTicket = false; this.open(); }
    },

    send(m) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN && this.welcome) {
        this.ws.send(JSON.stringify(m));
        return true;
      }
      return false;
    },

    onMessage(m) {
      switch (m.type) {
        case 'hello': return undefined;
        case 'welcome': return this.onWelcome(m);
        case 'state': return this.onState(m);
        case 'pong': if (m.nonce) this.rtt = now() - m.nonce; return undefined;
        case 'ended': return this.onEnded(m);
        case 'error': return this.onError(m);
        case 'waiting': case 'round': case 'go': case 'point': case 'over': return reflex.on(m);
        default: return undefined;
      }
    },

    onWelcome(m) {
      this.welcome = m;
      this.tries = 0;
      this.renewals = 0;
      if (m.game === 'reflex') {
        clearInterval(this.pingTimer);
        this.pingTimer = setInterval(() => this.send({ type: 'ping', t: now() }), 2000);
        reflex.welcome(m);
        return;
      }
      this.mapCache = null;
      hudKey = '';
      const c = $('canvas');
      c.dataset.joins = String(Number(c.dataset.joins || 0) + 1);
      if (st.session) st.session.team = m.team;
      note(m.rejoined ? 'Rejoined' : null, m.rejoined ? 1500 : 0);
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.send({ type: 'ping', nonce: now() }), 2000);
      show('playing');
      updateHud();
      sendInput(true);
    },

    onState(m) {
      this.prev = this.snap;
      m.at = performance.now();
      this.snap = m;
      const c = $('canvas');
      c.dataset.tick = String(m.tick);
      c.dataset.players = String((m.players || []).length);
      const me = (m.players || []).find((p) => p.id === st.player);
      if (me) c.dataset.me = `${me.x.toFixed(2)},${me.y.toFixed(2)}`;
      const ours = (m.shots || []).filter((x) => game.welcome && x.team === game.welcome.team).length;
      if (ours) c.dataset.shots = String(Number(c.dataset.shots || 0) + ours);
      updateHud();
    },

    onEnded(m) {
      this.ended = true;
      clearTimeout(this.retryTimer);
      clearInterval(this.pingTimer);
      if (st.session) finish(st.session.id, m.reason, m.results, true);
    },

    onError(m) {
      if (this.ended) return; // the match is over; the socket is closing
      const code = m.code;
      if (code === 'session_moved') {
        // The match moves to another host, running: the `matched` that names it is on its way
        // (ask /v1/play if it is slow to come).
        this.detach();
        this.tries = 0;
        this.waitingTicket = true;
        note('The match moved to another server — rejoining…');
        setTimeout(() => { if (this.waitingTicket && !this.ws) this.renew(); }, 5000);
        return;
      }
      showError(code, m.message);
      if (['ticket_expired', 'bad_ticket', 'unknown_session'].includes(code)) {
        // Ask /v1/play: a fresh `matched` (and ticket) if the session lives, else its end.
        this.detach();
        this.renew();
        return;
      }
      if (['replaced', 'left', 'game_over', 'not_a_player', 'wrong_session', 'shutting_down'].includes(code)) {
        // Not worth retrying: someone else plays for us, or the match is (being) over.
        this.noRetry = true;
      }
    },

    startDrawing() {
      if (this.drawing) return;
      this.drawing = true;
      const frame = (t) => {
        if (st.screen !== 'playing') { this.drawing = false; return; }
        draw(t);
        requestAnimationFrame(frame);
      };
      requestAnimationFrame(frame);
    },
  };

  // Reflex (games/reflex/README.md): `round` (wait), `go` with an arrow, `tap` it first.
  const reflex = {
    round: 0,
    welcome(m) {
      this.round = 0;
      this.call('Waiting for your opponent…', null);
      $('reflex-note').textContent = `First to ${m.first_to} · ${m.players.join(' vs ')}`;
      this.score(Object.fromEntries(m.players.map((p) => [p, 0])));
      show('reflex');
    },
    call(text, dir) {
      const el = $('reflex-call');
      el.textContent = text;
      el.classList.toggle('go', !!dir);
      if (dir) el.dataset.dir = dir; else delete el.dataset.dir;
    },
    score(score) {
      $('reflex-score').textContent = Object.entries(score || {})
        .map(([p, n]) => `${p === st.player ? 'You' : p} ${n}`).join(' – ');
    },
    on(m) {
      if (m.type === 'waiting') this.call(`Waiting for ${m.for.join(', ')}…`, null);
      if (m.type === 'round') {
        this.round = m.n;
        this.call('Wait…', null);
        this.score(m.score);
      }
      if (m.type === 'go') this.call(`GO ${ARROWS[m.dir] || m.dir}`, m.dir);
      if (m.type === 'point') {
        const who = m.winner === st.player ? 'You' : m.winner;
        const why = { fastest: m.winner === st.player ? `were fastest (${m.ms} ms)` : `was faster (${m.ms} ms)`, foul: 'score: a tap came too early', timeout: '' }[m.why];
        this.call(m.winner ? `${who} ${why}` : 'Nobody scored', null);
        this.score(m.score);
      }
      if (m.type === 'over') {
        // The match is over: the gateway's `game_over` and the close that follow are expected.
        game.ended = true;
        clearInterval(game.pingTimer);
        this.call(m.winner === st.player ? 'You win!' : m.winner ? `${m.winner} wins` : 'Draw', null);
        this.score(m.score);
      }
    },
    tap(dir) {
      if (this.round) game.send({ type: 'tap', n: this.round, dir });
    },
  };

  let noteTimer = null;
  function note(text, hideAfterMs = 0) {
    clearTimeout(noteTimer);
    $('game-note').textContent = text || '';
    $('game-note').hidden = !text;
    if (text && hideAfterMs) noteTimer = setTimeout(() => note(null), hideAfterMs);
  }

  let hudKey = '';
  function updateHud() {
    const w = game.welcome;
    if (!w) return;
    if (game.snap) $('time-left').textContent = clock(game.snap.time_left_ms);
    const scores = (game.snap && game.snap.scores) || w.teams.map(() => 0);
    const key = `${w.team}:${scores.join(',')}`;
    if (key === hudKey) return;
    hudKey = key;
    const el = $('score');
    el.replaceChildren();
    scores.forEach((s, i) => {
      if (i > 0) el.append(' – ');
      const span = document.createElement('span');
      span.className = 't';
      span.style.setProperty('--team', team(i).color);
      span.textContent = `${i === w.team ? 'You' : team(i).name} ${s}`;
      el.append(span);
    });
    el.setAttribute('aria-label', `Score: ${scores.map((s, i) => `${team(i).name}${i === w.team ? ' (your team)' : ''} ${s}`).join(', ')}; first to ${w.score_limit}`);
    el.title = `First to ${w.score_limit}`;
  }

  // ---------------------------------------------------------------- results

  function finish(sessionId, reason, results, fromGame) {
    // The game's own `ended` is the most precise; the server's `session_ended` confirms it or
    // is all there is (the VM failed, no host had room, ...).
    if (st.results && st.results.session === sessionId && st.results.fromGame && !fromGame) return;
    st.results = { session: sessionId, reason, results, fromGame };
    renderResults();
    show('results');
  }

  function renderResults() {
    const { reason, results } = st.results;
    const s = st.session || {};
    const r = results && typeof results === 'object' ? results : {};
    const players = Array.isArray(r.players) ? r.players : [];
    const teams = s.teams || [];
    const membersOf = (i) => {
      const fromResults = players.filter((p) => p.team === i).map((p) => p.id);
      return fromResults.length ? fromResults : teams[i] || [];
    };
    let myTeam = s.team;
    const mine = players.find((p) => p.id === st.player);
    if (mine) myTeam = mine.team;
    // `winner` is a team index; older games reported a player name.
    let winner = r.winner;
    if (typeof winner === 'string') {
      const p = players.find((x) => x.id === winner);
      const t = p ? p.team : teams.findIndex((m) => m.includes(winner));
      winner = t >= 0 ? t : null;
    }
    let outcome;
    let winnerText;
    if (typeof winner === 'number') {
      outcome = winner === myTeam ? 'You win!' : 'You lose';
      winnerText = `Winner: ${team(winner).name} (${membersOf(winner).join(', ')})`;
    } else if (Array.isArray(r.scores)) {
      outcome = 'Draw';
      winnerText = 'No winner';
    } else {
      outcome = 'Match over';
      winnerText = 'No result';
    }
    $('outcome').textContent = outcome;
    $('winner').textContent = winnerText;
    $('your-team').textContent = typeof myTeam === 'number'
      ? `Your team: ${team(myTeam).name} (${membersOf(myTeam).join(', ')})`
      : '';
    let human = REASONS[reason] || 'The match ended';
    if (typeof winner === 'number' && (reason === 'surrender' || reason === 'forfeit')) {
      const verb = reason === 'surrender' ? 'surrendered' : 'left';
      human = winner === myTeam ? `The other side ${verb}` : `Your team ${verb}`;
    }
    const detail = r.code ? ` — ${r.reason || r.code}` : '';
    $('reason').textContent = `${human}${detail} (${reason})`;
    $('final-score').textContent = Array.isArray(r.scores)
      ? r.scores.map((x, i) => `${team(i).name} ${x}`).join(' – ')
      : r.score && typeof r.score === 'object'
        ? Object.entries(r.score).map(([p, n]) => `${p} ${n}`).join(' – ')
        : '';
    const body = $('results-body');
    body.replaceChildren();
    const rows = players.length ? players : teams.flatMap((m, i) => m.map((id) => ({ id, team: i })));
    for (const p of rows) {
      const tr = document.createElement('tr');
      if (p.id === st.player) tr.className = 'me';
      const name = document.createElement('td');
      name.textContent = p.id + (p.id === st.player ? ' (you)' : '') + (p.left ? ' · left' : '');
      const t = document.createElement('td');
      const sw = document.createElement('span');
      sw.className = 'swatch';
      sw.style.setProperty('--team', team(p.team).color);
      t.append(sw, team(p.team).name);
      const k = document.createElement('td');
      k.textContent = p.kills ?? '–';
      const d = document.createElement('td');
      d.textContent = p.deaths ?? '–';
      tr.append(name, t, k, d);
      body.append(tr);
    }
    $('results-table').hidden = rows.length === 0;
  }

  // ---------------------------------------------------------------- input

  // The movement the player asks for, in screen directions.
  function screenMove() {
    if (input.stick) {
      const R = 48;
      let dx = (input.stick.x - input.stick.x0) / R;
      let dy = (input.stick.y - input.stick.y0) / R;
      const len = Math.hypot(dx, dy);
      if (len < 0.15) return [0, 0];
      if (len > 1) { dx /= len; dy /= len; }
      return [dx, dy];
    }
    const k = input.keys;
    let dx = (k.has('d') || k.has('arrowright') ? 1 : 0) - (k.has('a') || k.has('arrowleft') ? 1 : 0);
    let dy = (k.has('s') || k.has('arrowdown') ? 1 : 0) - (k.has('w') || k.has('arrowup') ? 1 : 0);
    if (dx && dy) { dx *= Math.SQRT1_2; dy *= Math.SQRT1_2; }
    return [dx, dy];
  }

  // The same in the game's directions (the field may be drawn turned; see `layout`).
  function moveVector() {
    const [a, b] = screenMove();
    return game.view && game.view.rotate ? [b, -a] : [a, b];
  }

  // Screen angle → game angle.
  function worldAngle(screenAngle) {
    return game.view && game.view.rotate ? screenAngle - Math.PI / 2 : screenAngle;
  }

  function updateAim() {
    const me = game.me;
    if (input.aimTouch) {
      const t = input.aimTouch;
      const ddx = t.x - t.x0;
      const ddy = t.y - t.y0;
      if (Math.hypot(ddx, ddy) > 12) input.aim = worldAngle(Math.atan2(ddy, ddx));
      else if (me) input.aim = worldAngle(Math.atan2(t.y0 - me.y, t.x0 - me.x));
    } else if (input.mouse && me) {
      input.aim = worldAngle(Math.atan2(input.mouse.y - me.y, input.mouse.x - me.x));
    }
  }

  // Sends the controls when they changed, at most every 50 ms.
  function sendInput(force = false) {
    if (!game.welcome || game.ended) return;
    updateAim();
    const [dx, dy] = moveVector();
    const fire = input.mouseFire || input.keyFire || !!input.aimTouch;
    const next = { dx: +dx.toFixed(3), dy: +dy.toFixed(3), fire, aim: +input.aim.toFixed(3) };
    const s = input.sent;
    const changed = !s || s.dx !== next.dx || s.dy !== next.dy || s.fire !== next.fire
      || (next.fire && Math.abs(s.aim - next.aim) > 0.03);
    if (!changed && !force) return;
    const wait = 50 - (now() - input.lastSend);
    if (wait > 0 && !force) {
      if (!input.timer) input.timer = setTimeout(() => { input.timer = null; sendInput(); }, wait);
      return;
    }
    if (game.send({ type: 'input', seq: ++game.seq, ...next })) {
      input.sent = next;
      input.lastSend = now();
    }
  }

  const MOVE_KEYS = new Set(['w', 'a', 's', 'd', 'arrowup', 'arrowdown', 'arrowleft', 'arrowright']);
  window.addEventListener('keydown', (e) => {
    if (st.screen === 'reflex' && e.key.startsWith('Arrow') && !e.repeat) {
      reflex.tap(e.key.slice(5).toLowerCase());
      e.preventDefault();
      return;
    }
    if (st.screen !== 'playing' || $('surrender-dialog').open || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (MOVE_KEYS.has(k)) {
      input.keys.add(k);
      e.preventDefault();
      sendInput();
    } else if (k === ' ' && !(e.target instanceof HTMLButtonElement)) {
      input.keyFire = true;
      e.preventDefault();
      sendInput();
    }
  });
  window.addEventListener('keyup', (e) => {
    const k = e.key.toLowerCase();
    if (MOVE_KEYS.has(k)) input.keys.delete(k);
    else if (k === ' ') input.keyFire = false;
    else return;
    if (st.screen === 'playing') sendInput();
  });
  window.addEventListener('blur', () => {
    input.keys.clear();
    input.keyFire = input.mouseFire = false;
    input.stick = input.aimTouch = null;
    if (st.screen === 'playing') sendInput();
  });

  function canvasPoint(e) {
    const r = $('canvas').getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top, w: r.width };
  }

  function setupPointer() {
    const c = $('canvas');
    c.addEventListener('contextmenu', (e) => e.preventDefault());
    c.addEventListener('pointerdown', (e) => {
      const p = canvasPoint(e);
      if (e.pointerType === 'mouse') {
        if (e.button !== 0) return;
        input.mouse = p;
        input.mouseFire = true;
        c.focus({ preventScroll: true });
      } else if (p.x < p.w / 2 && !input.stick) {
        input.stick = { id: e.pointerId, x0: p.x, y0: p.y, x: p.x, y: p.y };
      } else if (!input.aimTouch) {
        input.aimTouch = { id: e.pointerId, x0: p.x, y0: p.y, x: p.x, y: p.y };
      } else {
        return;
      }
      try { c.setPointerCapture(e.pointerId); } catch (_) { /* already released */ }
      e.preventDefault();
      sendInput();
    });
    c.addEventListener('pointermove', (e) => {
      const p = canvasPoint(e);
      if (e.pointerType === 'mouse') input.mouse = p;
      else if (input.stick && input.stick.id === e.pointerId) Object.assign(input.stick, { x: p.x, y: p.y });
      else if (input.aimTouch && input.aimTouch.id === e.pointerId) Object.assign(input.aimTouch, { x: p.x, y: p.y });
      else return;
      sendInput();
    });
    const release = (e) => {
      if (e.pointerType === 'mouse') input.mouseFire = false;
      else if (input.stick && input.stick.id === e.pointerId) input.stick = null;
      else if (input.aimTouch && input.aimTouch.id === e.pointerId) input.aimTouch = null;
      else return;
      sendInput();
    };
    c.addEventListener('pointerup', release);
    c.addEventListener('pointercancel', release);
  }

  // ---------------------------------------------------------------- drawing

  function mapImage(map, tile, dpr) {
    const key = `${map.name}:${tile}:${dpr}`;
    if (game.mapCache && game.mapCache.key === key) return game.mapCache.canvas;
    const cv = document.createElement('canvas');
    cv.width = Math.ceil(map.width * tile * dpr);
    cv.height = Math.ceil(map.height * tile * dpr);
    const g = cv.getContext('2d');
    g.scale(dpr, dpr);
    g.fillStyle = '#1e293b';
    g.fillRect(0, 0, map.width * tile, map.height * tile);
    g.fillStyle = '#475569';
    map.rows.forEach((row, y) => {
      for (let x = 0; x < row.length; x += 1) {
        if (row[x] === '#') g.fillRect(x * tile, y * tile, tile + 0.5, tile + 0.5);
      }
    });
    if (tile >= 10) {
      g.strokeStyle = 'rgba(148,163,184,0.08)';
      g.lineWidth = 1;
      for (let x = 0; x <= map.width; x += 1) { g.beginPath(); g.moveTo(x * tile, 0); g.lineTo(x * tile, map.height * tile); g.stroke(); }
      for (let y = 0; y <= map.height; y += 1) { g.beginPath(); g.moveTo(0, y * tile); g.lineTo(map.width * tile, y * tile); g.stroke(); }
    }
    game.mapCache = { key, canvas: cv };
    return cv;
  }

  // Where the field goes on the canvas. A map whose shape does not match the screen's (a wide
  // map on a phone held upright) is turned a quarter clockwise when that makes tiles larger:
  // the game's +x then points down the screen and +y to the left.
  function layout(rect, map) {
    const straight = Math.min(rect.width / map.width, rect.height / map.height);
    const turned = Math.min(rect.width / map.height, rect.height / map.width);
    const rotate = turned > straight * 1.1;
    const tile = Math.max(1, Math.floor(rotate ? turned : straight));
    const sw = (rotate ? map.height : map.width) * tile;
    const sh = (rotate ? map.width : map.height) * tile;
    const ox = Math.floor((rect.width - sw) / 2);
    const oy = Math.floor((rect.height - sh) / 2);
    const at = rotate
      ? (x, y) => [ox + (map.height - y) * tile, oy + x * tile]
      : (x, y) => [ox + x * tile, oy + y * tile];
    return { rotate, tile, ox, oy, at };
  }

  function draw(t) {
    const c = $('canvas');
    const rect = c.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(1, Math.round(rect.width * dpr));
    const H = Math.max(1, Math.round(rect.height * dpr));
    if (c.width !== W || c.height !== H) { c.width = W; c.height = H; }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, rect.width, rect.height);
    const w = game.welcome;
    if (!w) return;
    const map = w.map;
    const view = layout(rect, map);
    game.view = view;
    const { tile, ox, oy } = view;
    const img = mapImage(map, tile, dpr);
    if (view.rotate) {
      g.save();
      g.translate(ox + map.height * tile, oy);
      g.rotate(Math.PI / 2);
      g.drawImage(img, 0, 0, map.width * tile, map.height * tile);
      g.restore();
    } else {
      g.drawImage(img, ox, oy, map.width * tile, map.height * tile);
    }
    const at = view.at;

    const snap = game.snap;
    if (snap) {
      // Drawn one tick behind, between the last two snapshots: smooth at any tick rate.
      const tickMs = 1000 / (w.tick_hz || 20);
      const a = game.prev ? Math.min(1, Math.max(0, (t - snap.at) / tickMs)) : 1;
      const before = new Map((game.prev ? game.prev.players : []).map((p) => [p.id, p]));

      g.lineCap = 'round';
      for (const s of snap.shots || []) {
        const len = Math.hypot(s.dx, s.dy) || 1;
        g.strokeStyle = team(s.team).color;
        g.lineWidth = Math.max(2, tile * 0.15);
        const [x1, y1] = at(s.x, s.y);
        const [x2, y2] = at(s.x - (s.dx / len) * 0.5, s.y - (s.dy / len) * 0.5);
        g.beginPath();
        g.moveTo(x1, y1);
        g.lineTo(x2, y2);
        g.stroke();
      }

      const r = Math.max(5, PLAYER_RADIUS * tile);
      game.me = null;
      for (const p of snap.players || []) {
        const q = before.get(p.id);
        const x = q && q.alive && p.alive ? q.x + (p.x - q.x) * a : p.x;
        const y = q && q.alive && p.alive ? q.y + (p.y - q.y) * a : p.y;
        const [px, py] = at(x, y);
        const mine = p.id === st.player;
        if (mine) game.me = { x: px, y: py };
        g.globalAlpha = p.connected ? 1 : 0.45;
        if (!p.alive) {
          g.strokeStyle = team(p.team).color;
          g.lineWidth = 2;
          g.beginPath(); g.arc(px, py, r, 0, Math.PI * 2); g.stroke();
          g.globalAlpha = 1;
          continue;
        }
        if (mine) {
          // The aim line.
          g.strokeStyle = 'rgba(255,255,255,0.35)';
          g.lineWidth = 2;
          g.setLineDash([4, 4]);
          g.beginPath();
          g.moveTo(px, py);
          const aim = view.rotate ? input.aim + Math.PI / 2 : input.aim;
          g.lineTo(px + Math.cos(aim) * tile * 1.6, py + Math.sin(aim) * tile * 1.6);
          g.stroke();
          g.setLineDash([]);
        }
        g.fillStyle = team(p.team).color;
        g.beginPath(); g.arc(px, py, r, 0, Math.PI * 2); g.fill();
        if (mine) { g.strokeStyle = '#fff'; g.lineWidth = 2.5; g.stroke(); }
        // Health bar.
        const bw = Math.max(18, tile * 0.9);
        const bh = Math.max(3, tile * 0.12);
        const hp = Math.max(0, Math.min(1, p.hp / MAX_HP));
        g.fillStyle = 'rgba(0,0,0,0.6)';
        g.fillRect(px - bw / 2, py - r - bh - 4, bw, bh);
        g.fillStyle = hp > 0.5 ? '#22c55e' : hp > 0.25 ? '#eab308' : '#ef4444';
        g.fillRect(px - bw / 2, py - r - bh - 4, bw * hp, bh);
        if (tile >= 12) {
          g.fillStyle = '#e5e7eb';
          g.font = `${Math.max(10, Math.min(14, tile * 0.45))}px system-ui, "DejaVu Sans", sans-serif`;
          g.textAlign = 'center';
          g.textBaseline = 'top';
          g.fillText(p.id, px, py + r + 2);
        }
        g.globalAlpha = 1;
      }
    }

    // The virtual joystick and the aim touch.
    const stick = input.stick;
    if (stick) {
      g.fillStyle = 'rgba(255,255,255,0.12)';
      g.beginPath(); g.arc(stick.x0, stick.y0, 48, 0, Math.PI * 2); g.fill();
      const [dx, dy] = screenMove();
      g.fillStyle = 'rgba(255,255,255,0.45)';
      g.beginPath(); g.arc(stick.x0 + dx * 48, stick.y0 + dy * 48, 20, 0, Math.PI * 2); g.fill();
    }
    const touch = input.aimTouch;
    if (touch) {
      g.strokeStyle = 'rgba(251,191,36,0.6)';
      g.lineWidth = 3;
      g.beginPath(); g.arc(touch.x0, touch.y0, 26, 0, Math.PI * 2); g.stroke();
      g.beginPath(); g.moveTo(touch.x0, touch.y0); g.lineTo(touch.x, touch.y); g.stroke();
    }
    if (game.rtt !== null) {
      g.fillStyle = 'rgba(229,231,235,0.7)';
      g.font = '11px system-ui, "DejaVu Sans", sans-serif';
      g.textAlign = 'right';
      g.textBaseline = 'bottom';
      g.fillText(`${game.rtt} ms`, rect.width - 4, rect.height - 2);
    }
  }

  // ---------------------------------------------------------------- wiring

  function setup() {
    const list = $('modes');
    for (const m of MODES) {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.id = `mode-${m.name}`;
      b.dataset.testid = `mode-${m.name}`;
      const title = document.createElement('span');
      title.className = 'mode-title';
      title.textContent = m.title;
      const desc = document.createElement('span');
      desc.className = 'mode-desc';
      desc.textContent = m.desc;
      b.append(title, desc);
      b.addEventListener('click', () => queueFor(m.name));
      li.append(b);
      list.append(li);
    }
    $('signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      signIn($('name').value.trim());
    });
    $('signout').addEventListener('click', signOut);
    $('cancel').addEventListener('click', cancelQueue);
    $('error-close').addEventListener('click', clearError);
    $('net-retry').addEventListener('click', () => {
      netStatus(null);
      play.attempt = 0;
      play.connect();
    });
    $('surrender').addEventListener('click', () => $('surrender-dialog').showModal());
    $('surrender-dialog').addEventListener('close', () => {
      if ($('surrender-dialog').returnValue === 'yes') {
        if (game.send({ type: 'surrender' })) note('You surrendered; waiting for the result…');
        else showError('not_connected', 'Not connected to the game right now; try again in a moment.');
      }
      $('canvas').focus({ preventScroll: true });
    });
    $('play-again').addEventListener('click', () => {
      if (st.mode) queueFor(st.mode);
      else show('modes');
    });
    $('change-mode').addEventListener('click', () => show('modes'));
    window.addEventListener('online', () => {
      if (!play.stopped && !play.ws) { play.attempt = 0; play.connect(); }
    });
    setupPointer();
    for (const b of document.querySelectorAll('.reflex-pad .arrow')) {
      b.addEventListener('pointerdown', (e) => { e.preventDefault(); reflex.tap(b.dataset.dir); });
      b.addEventListener('keydown', (e) => {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); reflex.tap(b.dataset.dir); }
      });
    }

    let name = '';
    try { name = localStorage.getItem(NAME_KEY) || ''; } catch (_) { /* private mode */ }
    $('name').value = name;
    show('signin');
    if (name) signIn(name);
  }

  // For trying the reconnect paths by hand (browser console) and in tests: drop a socket as a
  // network would.
  window.berthDebug = Object.freeze({
    dropGame: () => { if (game.ws) game.ws.close(4000, 'debug drop'); },
    dropPlay: () => { if (play.ws) play.ws.close(4000, 'debug drop'); },
  });

  setup();
})();
