// Berth's admin dashboard: signs in with an admin token, follows the live feed
// (GET /v1/admin/events, server-sent events read with fetch so the token travels in the
// Authorization header), and acts through the admin API (/v1/admin/*). Plain JS, no build step;
// charts by uPlot (vendor/). The feed's messages are in docs/protocol.md ("Admin event feed").
'use strict';

(() => {
  const TOKEN_KEY = 'berth.admin.token';
  const FEED = '/v1/admin/events';
  const ROW_H = 40; // px, style.css --row
  const OVERSCAN = 12; // rows rendered above and below the visible ones
  const WATCHDOG_MS = 25000; // the feed sends at least a keep-alive every 10 s
  const RETRY_MAX_MS = 5000;
  const STATES = ['placing', 'activating', 'active', 'ending', 'ended'];
  const REASONS = {
    admin: 'ended by an operator',
    deadline: 'reached its time limit',
    placement_failed: 'no host could take it',
    vm_failed: 'the game server failed',
    vm_lost: 'the game server was lost',
    host_lost: 'its host stopped answering',
    ending_timeout: 'its host did not confirm the end',
    score_limit: 'score limit reached',
    time_limit: 'time is up',
    surrender: 'a team surrendered',
    forfeit: 'a team left',
    abandoned: 'everybody left',
    game_over: 'game over',
  };
  // Histogram buckets (upper bounds, ms) for the latency charts.
  // The sessions-over-time chart's span (the server keeps 30 minutes of points).
  const SERIES_SPAN_S = 30 * 60;
  const BUCKETS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000, Infinity];

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'role' || k === 'scope') e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  };
  const jitter = (ms) => ms * (0.8 + Math.random() * 0.4);
  // The server's clock, from the browser's (the feed says the server's time on every snapshot).
  const serverNow = () => Date.now() + st.skew;

  function ms(n) {
    if (n == null || !isFinite(n)) return '–';
    if (n < 1000) return `${Math.round(n)} ms`;
    if (n < 10000) return `${(n / 1000).toFixed(2)} s`;
    if (n < 60000) return `${(n / 1000).toFixed(1)} s`;
    const s = Math.round(n / 1000);
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }
  function age(n) {
    const s = Math.max(0, Math.floor(n / 1000));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
  }
  const clockTime = (t) => {
    const d = new Date(t);
    return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, '0')}`;
  };
  const mib = (n) => (n >= 10240 ? `${(n / 1024).toFixed(1)} GiB` : `${n} MiB`);
  const shortId = (id) => (id.length > 14 ? `${id.slice(0, 12)}…` : id);

  // ------------------------------------------------------------------------ state

  const st = {
    token: null,
    who: '',
    skew: 0,
    windowMs: 15 * 60 * 1000,
    sessions: new Map(), // id → row (the feed's SessionRow)
    hosts: [],
    pools: [],
    queues: [],
    act: [], // [at_ms, ms, image, path]
    ttm: [], // [at_ms, ms, mode]
    series: [], // [at_ms, placing, activating, active, ending]
    view: [], // the filtered, sorted rows
    viewDirty: true,
    sort: { key: 'age', dir: 'asc' },
    filter: '',
    stateFilter: '',
    focusId: null, // the session row that takes the keyboard focus (roving tabindex)
    open: null, // the session shown in the dialog
    detail: null, // its full view (GET /v1/admin/sessions/{id})
    feed: { state: 'offline', ctrl: null, attempt: 0, timer: null, lastByte: 0, everLive: false },
    chartsDirty: true,
    charts: {},
    perf: { snapshots: 0 },
  };

  // ------------------------------------------------------------------------ banners

  function showError(text) {
    $('error-text').textContent = text;
    $('error').hidden = false;
  }
  function hideError() { $('error').hidden = true; }

  let outcomeTimer = null;
  function outcome(text, kind = 'ok') {
    const t = $('outcome');
    $('outcome-text').textContent = text;
    t.dataset.kind = kind;
    t.hidden = false;
    clearTimeout(outcomeTimer);
    outcomeTimer = setTimeout(() => { t.hidden = true; }, kind === 'error' ? 20000 : 10000);
    const inDialog = $('sd-outcome');
    if ($('session-dialog').open) {
      inDialog.textContent = text;
      inDialog.dataset.kind = kind;
      inDialog.hidden = false;
    }
  }

  function setFeed(state, text) {
    st.feed.state = state;
    const f = $('feed');
    f.dataset.state = state;
    $('feed-text').textContent = {
      live: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…', offline: 'Offline',
    }[state];
    document.body.dataset.feed = state === 'live' ? 'live' : 'stale';
    const net = $('net');
    if (state === 'live' || !st.feed.everLive || !st.token) {
      net.hidden = true;
    } else {
      $('net-text').textContent = text || 'The live feed is down; the page shows what it last knew.';
      net.hidden = false;
    }
  }

  // ------------------------------------------------------------------------ sign-in

  function claims(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
    } catch {
      return null;
    }
  }

  function signedIn(token) {
    st.token = token;
    const c = claims(token);
    st.who = c && c.sub ? c.sub : '';
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* private mode: this load only */ }
    $('who').textContent = st.who ? `Signed in as ${st.who}` : '';
    $('signout').hidden = false;
    $('signout').setAttribute('aria-label', st.who ? `Sign out (${st.who})` : 'Sign out');
    $('screen-signin').hidden = true;
    $('screen-dash').hidden = false;
    document.body.dataset.screen = 'dash';
    connect();
  }

  function signOut(message) {
    st.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* nothing kept */ }
    stopFeed();
    st.feed.everLive = false;
    setFeed('offline');
    closeDialogs();
    $('who').textContent = '';
    $('signout').hidden = true;
    $('screen-dash').hidden = true;
    $('screen-signin').hidden = false;
    document.body.dataset.screen = 'signin';
    if (message) showError(message);
  }

  async function devSignIn(ev) {
    ev.preventDefault();
    hideError();
    const name = $('dev-name').value.trim();
    const btn = $('dev-signin');
    btn.disabled = true;
    try {
      const r = await fetch('/v1/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ player: name, role: 'admin' }),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        const why = body.code === 'dev_tokens_disabled'
          ? 'this server does not mint tokens (it is not in development mode): paste a token from `berth-server token --admin NAME`'
          : `${body.code || r.status}: ${body.message || 'refused'}`;
        showError(`No development token: ${why}`);
        return;
      }
      signedIn(body.token);
    } catch (e) {
      showError(`The server cannot be reached (${e.message}).`);
    } finally {
      btn.disabled = false;
    }
  }

  function tokenSignIn(ev) {
    ev.preventDefault();
    hideError();
    const token = $('token').value.trim().replace(/^Bearer\s+/i, '');
    if (!token) {
      showError('Paste an admin token first.');
      return;
    }
    $('token').value = '';
    signedIn(token);
  }

  // ------------------------------------------------------------------------ the feed

  function stopFeed() {
    clearTimeout(st.feed.timer);
    st.feed.timer = null;
    if (st.feed.ctrl) st.feed.ctrl.abort();
    st.feed.ctrl = null;
  }

  function retry(why, soon = false) {
    if (!st.token) return;
    stopFeed();
    const delay = soon ? 250 : jitter(Math.min(RETRY_MAX_MS, 500 * 2 ** st.feed.attempt));
    st.feed.attempt += 1;
    const secs = Math.max(1, Math.round(delay / 1000));
    setFeed('reconnecting', `${why} Reconnecting${soon ? '' : ` in ${secs} s`}… (the page shows what it last knew)`);
    st.feed.timer = setTimeout(connect, delay);
  }

  async function connect() {
    if (!st.token) return;
    stopFeed();
    const ctrl = new AbortController();
    st.feed.ctrl = ctrl;
    if (st.feed.state !== 'reconnecting') setFeed('connecting');
    let r;
    try {
      r = await fetch(FEED, {
        headers: { Authorization: `Bearer ${st.token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: ctrl.signal,
      });
    } catch (e) {
      if (ctrl.signal.aborted && st.feed.ctrl !== ctrl) return;
      retry('The server cannot be reached.');
      return;
    }
    if (r.status === 401 || r.status === 403) {
      const body = await r.json().catch(() => ({}));
      signOut(`The server refused the token: ${body.code || r.status}${body.message ? ` (${body.message})` : ''}.`);
      return;
    }
    if (!r.ok || !r.body) {
      const body = await r.json().catch(() => ({}));
      retry(`The feed answered ${r.status}${body.code ? ` ${body.code}` : ''}.`);
      return;
    }
    st.feed.lastByte = performance.now();
    let bye = null;
    try {
      bye = await read(r.body, ctrl);
    } catch (e) {
      if (st.feed.ctrl !== ctrl) return; // replaced or stopped on purpose
    }
    if (st.feed.ctrl !== ctrl) return;
    if (bye === 'expired_token') {
      signOut('Your admin token expired: sign in again.');
    } else if (bye === 'shutting_down') {
      retry('The server is restarting.', true);
    } else {
      retry('The live feed was cut.');
    }
  }

  // Reads server-sent events until the stream ends; returns the `bye` reason, if any.
  async function read(body, ctrl) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    ctrl.signal.addEventListener('abort', () => reader.cancel().catch(() => {}));
    let buf = '';
    let from = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      st.feed.lastByte = performance.now();
      buf += value;
      for (;;) {
        const end = buf.indexOf('\n\n', from);
        if (end < 0) {
          from = Math.max(0, buf.length - 1);
          break;
        }
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        from = 0;
        const bye = dispatch(block);
        if (bye) return bye;
      }
    }
  }

  // One SSE block: `event:` and `data:` lines (comments, `:…`, are keep-alives).
  function dispatch(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (!data.length) return null;
    const t0 = performance.now();
    const m = JSON.parse(data.join('\n'));
    switch (event) {
      case 'snapshot': snapshot(m, t0); break;
      case 'sessions': sessionsChanged(m); break;
      case 'samples': samples(m); break;
      case 'hosts': st.hosts = m.hosts; st.pools = m.pools; renderInfra(); break;
      case 'queues': st.queues = m.queues; renderQueues(); renderTiles(); break;
      case 'series': st.series.push(m.point); trimSeries(); st.chartsDirty = true; break;
      case 'bye': return m.reason || 'bye';
      default: break;
    }
    return null;
  }

  function snapshot(m, t0) {
    const parsed = performance.now();
    st.skew = m.now_ms - Date.now();
    st.windowMs = m.window_ms;
    st.sessions = new Map(m.sessions.map((s) => [s.id, s]));
    st.hosts = m.hosts;
    st.pools = m.pools;
    st.queues = m.queues;
    st.act = m.activation;
    st.ttm = m.time_to_match;
    st.series = m.series;
    st.viewDirty = true;
    st.chartsDirty = true;
    st.feed.attempt = 0;
    st.feed.everLive = true;
    $('where').textContent = `replica ${m.replica} · ${m.store} store`;
    setFeed('live');
    renderInfra();
    renderQueues();
    renderSessions();
    if (st.open) refreshDetail();
    const rendered = performance.now();
    // Charts after the list (they are not part of the list's figures).
    setTimeout(renderCharts, 0);
    requestAnimationFrame(() => requestAnimationFrame(() => {
      const p = st.perf;
      p.snapshots += 1;
      p.snapshotRows = m.sessions.length;
      p.parseMs = parsed - t0;
      p.renderMs = rendered - parsed;
      p.paintedMs = performance.now() - t0;
      document.body.dataset.snapshots = String(p.snapshots);
    }));
  }

  function sessionsChanged(m) {
    for (const row of m.upsert) st.sessions.set(row.id, row);
    for (const id of m.remove) st.sessions.delete(id);
    st.viewDirty = true;
    scheduleRender();
    if (st.open && (m.upsert.some((r) => r.id === st.open) || m.remove.includes(st.open))) {
      refreshDetailSoon();
    }
  }

  function samples(m) {
    st.act.push(...m.activation);
    st.ttm.push(...m.time_to_match);
    st.chartsDirty = true;
  }

  function trimSeries() {
    if (st.series.length > 720) st.series.splice(0, st.series.length - 720);
  }

  // ------------------------------------------------------------------------ hosts, pools, queues

  const hostRows = new Map(); // id → {tr, cells, button}

  function hostState(h) {
    if (h.state === 'up' && h.draining) return 'draining';
    return h.state;
  }

  function renderInfra() {
    const body = $('hosts-body');
    const seen = new Set();
    const now = serverNow();
    for (const h of st.hosts) {
      seen.add(h.id);
      let r = hostRows.get(h.id);
      if (!r) {
        const button = el('button', { type: 'button', class: 'secondary small', 'data-testid': `host-action-${h.id}` });
        button.addEventListener('click', () => askDrain(h.id));
        // (`data-label`s name the facts where the table folds into cards, on phones.)
        const cells = {
          id: el('td', { class: 'h-id' }, el('code', { text: h.id })),
          state: el('td', { class: 'h-state' }),
          accel: el('td', { class: 'h-accel', 'data-label': 'Accel' }),
          images: el('td', { class: 'h-images' }),
          memory: el('td', { class: 'num h-memory', 'data-label': 'Memory' }),
          seen: el('td', { class: 'num h-seen', 'data-label': 'Seen' }),
          action: el('td', { class: 'h-action' }, button),
        };
        const tr = el('tr', { 'data-testid': `host-${h.id}`, 'data-host': h.id }, ...Object.values(cells));
        r = { tr, cells, button };
        hostRows.set(h.id, r);
      }
      const s = hostState(h);
      r.tr.dataset.state = s;
      r.cells.state.replaceChildren(el('span', { class: `badge h-${s}`, text: s }));
      r.cells.accel.textContent = `${h.accel} · ${h.driver}`;
      r.cells.images.replaceChildren(el('div', { class: 'images' }, ...h.images.map((i) => el('span', { class: 'chip' },
        el('b', { text: i.name }),
        document.createTextNode(`${i.docked ? 'docked' : 'not docked'} · ${i.warm} warm · ${i.running} running`)))),
      el('div', { class: 'hint', text: `${h.running} of ${h.max_vms} VMs` }));
      r.cells.memory.textContent = mib(h.vm_memory_mib);
      r.cells.seen.textContent = `${age(now - h.last_seen_ms)} ago`;
      r.cells.seen.dataset.seen = String(h.last_seen_ms);
      r.button.textContent = h.draining ? 'Undrain' : 'Drain';
      r.button.setAttribute('aria-label', `${h.draining ? 'Undrain' : 'Drain'} host ${h.id}`);
      r.button.dataset.action = h.draining ? 'undrain' : 'drain';
      r.button.hidden = h.state === 'lost';
    }
    for (const [id, r] of hostRows) {
      if (!seen.has(id)) {
        r.tr.remove();
        hostRows.delete(id);
      }
    }
    // Keep the rows in the feed's order, moving only what is out of place (a focused button stays focused).
    let prev = null;
    for (const h of st.hosts) {
      const tr = hostRows.get(h.id).tr;
      const want = prev ? prev.nextSibling : body.firstChild;
      if (want !== tr) body.insertBefore(tr, want);
      prev = tr;
    }
    $('hosts-empty').hidden = st.hosts.length > 0;
    $('hosts-wrap').hidden = !st.hosts.length;
    const up = st.hosts.filter((h) => h.state === 'up').length;
    $('hosts-count').textContent = st.hosts.length ? `${up} up of ${st.hosts.length}` : '';

    $('pools-body').replaceChildren(...st.pools.map((p) => el('tr', { 'data-testid': `pool-${p.image}` },
      el('td', { class: 'name' }, el('code', { text: p.image })),
      el('td', { class: 'num', 'data-label': 'Hosts', text: p.hosts }),
      el('td', { class: 'num', 'data-label': 'Docked', text: p.docked_hosts }),
      el('td', { class: 'num', 'data-label': 'Warm', text: p.warm }),
      el('td', { class: 'num', 'data-label': 'Running', text: p.running }),
      el('td', { class: 'num', 'data-label': 'Activations / min', text: p.activations_per_min }))));
    $('pools-empty').hidden = st.pools.length > 0;
    $('pools-wrap').hidden = !st.pools.length;
    renderTiles();
  }

  function renderQueues() {
    const now = serverNow();
    $('queues-body').replaceChildren(...st.queues.map((q) => el('tr', { 'data-testid': `queue-${q.mode}-${q.region}` },
      el('td', { class: 'name', text: q.mode }),
      el('td', { 'data-label': 'Region', text: q.region }),
      el('td', { class: 'num', 'data-label': 'Waiting', text: q.depth }),
      el('td', { class: 'num wait', 'data-label': 'Longest wait', 'data-since': q.oldest_enqueued_ms ?? '', text: q.oldest_enqueued_ms ? age(now - q.oldest_enqueued_ms) : '–' }),
      el('td', { class: 'num', 'data-label': 'Away', text: q.away }))));
    $('queues-empty').hidden = st.queues.length > 0;
    $('queues-wrap').hidden = !st.queues.length;
  }

  function renderTiles() {
    const up = st.hosts.filter((h) => h.state === 'up' && !h.draining).length;
    $('t-hosts').textContent = String(up);
    let live = 0;
    for (const s of st.sessions.values()) if (s.state !== 'ended') live += 1;
    $('t-live').textContent = String(live);
    $('t-queued').textContent = String(st.queues.reduce((n, q) => n + q.depth, 0));
    $('t-apm').textContent = String(st.pools.reduce((n, p) => n + p.activations_per_min, 0));
  }

  // ------------------------------------------------------------------------ sessions list

  const collator = new Intl.Collator(undefined, { numeric: true });
  const SORTS = {
    id: (a, b) => collator.compare(a.id, b.id),
    state: (a, b) => STATES.indexOf(a.state) - STATES.indexOf(b.state),
    mode: (a, b) => collator.compare(a.mode, b.mode) || collator.compare(a.region, b.region),
    host: (a, b) => collator.compare(a.host || '', b.host || ''),
    players: (a, b) => a.players.length - b.players.length,
    // Age ascending: the youngest first.
    age: (a, b) => b.created_ms - a.created_ms,
  };

  function matches(s, words) {
    if (st.stateFilter === 'live' ? s.state === 'ended' : st.stateFilter && s.state !== st.stateFilter) return false;
    if (!words.length) return true;
    const hay = s._hay || (s._hay = `${s.id} ${s.mode} ${s.region} ${s.image} ${s.host || ''} ${s.players.join(' ')} ${s.state} ${s.end_reason || ''}`.toLowerCase());
    return words.every((w) => hay.includes(w));
  }

  function buildView() {
    const words = st.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const cmp = SORTS[st.sort.key] || SORTS.age;
    const dir = st.sort.dir === 'asc' ? 1 : -1;
    const v = [];
    for (const s of st.sessions.values()) if (matches(s, words)) v.push(s);
    v.sort((a, b) => dir * cmp(a, b) || SORTS.age(a, b) || collator.compare(a.id, b.id));
    st.view = v;
    st.viewDirty = false;
  }

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderSessions();
    });
  }

  const rowCache = new Map(); // id → {tr, row, key}

  function rowKey(s) {
    return `${s.state}|${s.host}|${s.players.length}|${s.since_ms}|${s.end_reason}`;
  }

  function makeRow(s) {
    const tr = el('tr', { class: 'row', tabIndex: -1, 'data-id': s.id, 'data-testid': 'session-row' });
    const players = s.players.length;
    tr.append(
      el('td', { class: 'mono', title: s.id, text: s.id }),
      el('td', {}, el('span', { class: `badge s-${s.state}`, text: s.state })),
      el('td', { text: `${s.mode} · ${s.region}` }),
      el('td', { class: 'c-host', text: s.host || '–' }),
      el('td', { class: 'c-players' }, document.createTextNode(String(players)),
        el('span', { class: 'players-names', text: players ? ` · ${s.players.join(', ')}` : '' })),
      el('td', { class: 'num age', text: age(serverNow() - s.created_ms) }),
    );
    tr.setAttribute('aria-label', `Session ${s.id}, ${s.state}, ${s.mode} in ${s.region}, ${players} players`);
    return tr;
  }

  function renderSessions() {
    if (st.viewDirty) buildView();
    const v = st.view;
    const scroll = $('sessions-scroll');
    const body = $('sessions-body');
    const total = st.sessions.size;
    $('sessions-count').textContent = v.length === total ? `${total}` : `${v.length} of ${total}`;
    $('sessions-empty').hidden = v.length > 0;
    $('sessions-empty').textContent = total ? 'No session matches the filter.' : 'No sessions.';
    $('sessions-table').setAttribute('aria-rowcount', String(v.length + 1));
    // Which rows are in view.
    const head = ROW_H;
    const top = Math.max(0, scroll.scrollTop - head);
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    // (The list is as tall as its rows up to a cap: the window's height bounds what is in view.)
    const last = Math.min(v.length, Math.ceil((top + window.innerHeight) / ROW_H) + OVERSCAN);
    // The row that takes the focus: kept if still listed, else the first one.
    let focusIdx = st.focusId ? v.findIndex((s) => s.id === st.focusId) : -1;
    if (focusIdx < 0 && v.length) {
      focusIdx = 0;
      st.focusId = v[0].id;
    }
    const active = document.activeElement;
    const hadFocus = active && active.closest && active.closest('#sessions-body') ? active.dataset.id : null;
    const rows = [];
    const keep = new Set();
    for (let i = first; i < last; i++) {
      const s = v[i];
      const key = rowKey(s);
      let c = rowCache.get(s.id);
      if (!c || c.key !== key || c.row !== s) {
        c = { tr: makeRow(s), row: s, key };
        rowCache.set(s.id, c);
      }
      c.tr.tabIndex = i === focusIdx ? 0 : -1;
      c.tr.setAttribute('aria-rowindex', String(i + 2));
      keep.add(s.id);
      rows.push(c.tr);
    }
    // The focused row stays in the DOM even when scrolled away, so Tab still reaches the list.
    if (focusIdx >= 0 && (focusIdx < first || focusIdx >= last)) {
      // (Not rendered: the first rendered row takes the tab stop instead.)
      if (rows.length) rows[0].tabIndex = 0;
    }
    for (const id of rowCache.keys()) if (!keep.has(id)) rowCache.delete(id);
    const before = el('tr', { class: 'spacer', 'aria-hidden': 'true' }, el('td', { colSpan: 6 }));
    before.firstChild.style.height = `${first * ROW_H}px`;
    const after = el('tr', { class: 'spacer', 'aria-hidden': 'true' }, el('td', { colSpan: 6 }));
    after.firstChild.style.height = `${(v.length - last) * ROW_H}px`;
    body.replaceChildren(before, ...rows, after);
    if (hadFocus) {
      // The rows were put back: so is the focus (on the row that owns it now).
      const c = rowCache.get(st.focusId) || rowCache.get(hadFocus);
      if (c) c.tr.focus({ preventScroll: true });
    }
    document.body.dataset.rows = String(rows.length);
    renderTiles();
  }

  function moveFocus(to) {
    const v = st.view;
    if (!v.length) return;
    const i = Math.max(0, Math.min(v.length - 1, to));
    st.focusId = v[i].id;
    const scroll = $('sessions-scroll');
    const y = ROW_H + i * ROW_H; // below the sticky header
    if (y - ROW_H < scroll.scrollTop) scroll.scrollTop = y - ROW_H;
    else if (y + ROW_H > scroll.scrollTop + scroll.clientHeight) scroll.scrollTop = y + ROW_H - scroll.clientHeight;
    renderSessions();
    const c = rowCache.get(st.focusId);
    if (c) c.tr.focus({ preventScroll: true });
  }

  function onRowsKey(ev) {
    const tr = ev.target.closest('tr.row');
    if (!tr) return;
    const i = st.view.findIndex((s) => s.id === tr.dataset.id);
    const page = Math.max(1, Math.floor($('sessions-scroll').clientHeight / ROW_H) - 1);
    const moves = { ArrowDown: i + 1, ArrowUp: i - 1, PageDown: i + page, PageUp: i - page, Home: 0, End: st.view.length - 1 };
    if (ev.key in moves) {
      ev.preventDefault();
      moveFocus(moves[ev.key]);
    } else if (ev.key === 'Enter' || ev.key === ' ') {
      ev.preventDefault();
      openSession(tr.dataset.id);
    }
  }

  function setSort(key) {
    if (st.sort.key === key) st.sort.dir = st.sort.dir === 'asc' ? 'desc' : 'asc';
    else st.sort = { key, dir: 'asc' };
    sortHeaders();
    st.viewDirty = true;
    renderSessions();
  }

  function sortHeaders() {
    for (const th of document.querySelectorAll('#sessions-table th[data-key]')) {
      th.setAttribute('aria-sort', th.dataset.key === st.sort.key ? (st.sort.dir === 'asc' ? 'ascending' : 'descending') : 'none');
    }
  }

  function onFilter(ev) {
    const t0 = ev.timeStamp || performance.now();
    st.filter = $('filter').value;
    st.viewDirty = true;
    $('sessions-scroll').scrollTop = 0;
    renderSessions();
    const rendered = performance.now();
    requestAnimationFrame(() => {
      st.perf.filterRenderMs = rendered - t0;
      st.perf.filterMs = performance.now() - t0;
      st.perf.filters = (st.perf.filters || 0) + 1;
    });
  }

  // Ages tick without re-rendering the rows.
  function tick() {
    const now = serverNow();
    for (const c of rowCache.values()) {
      const td = c.tr.lastChild;
      if (td) td.textContent = age(now - c.row.created_ms);
    }
    for (const td of document.querySelectorAll('#hosts-body td[data-seen]')) {
      td.textContent = `${age(now - Number(td.dataset.seen))} ago`;
    }
    for (const td of document.querySelectorAll('#queues-body td.wait')) {
      if (td.dataset.since) td.textContent = age(now - Number(td.dataset.since));
    }
    if (st.chartsDirty) renderCharts();
    // A feed that has said nothing (not even a keep-alive) for too long is dead.
    if (st.feed.state === 'live' && performance.now() - st.feed.lastByte > WATCHDOG_MS) {
      retry('The live feed went silent.');
    }
  }

  // ------------------------------------------------------------------------ charts

  function quantile(sorted, q) {
    if (!sorted.length) return null;
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }

  function histogram(values) {
    const counts = BUCKETS.map(() => 0);
    for (const v of values) counts[BUCKETS.findIndex((b) => v < b)] += 1;
    return counts;
  }

  const BUCKET_LABELS = BUCKETS.map((b, i) => {
    const lo = i ? BUCKETS[i - 1] : 0;
    const f = (n) => (n >= 1000 ? `${n / 1000}s` : `${n}ms`);
    return b === Infinity ? `≥${f(lo)}` : `<${f(b)}`;
  });

  const AXIS = { stroke: '#cbd5e1', grid: { stroke: '#334155', width: 1 }, ticks: { stroke: '#475569', width: 1 }, font: '12px system-ui, "DejaVu Sans", sans-serif' };

  function chartWidth(box) {
    return Math.max(200, Math.floor(box.getBoundingClientRect().width));
  }

  function makeHistogram(box, color) {
    const n = BUCKETS.length;
    const opts = {
      width: chartWidth(box),
      height: 190,
      legend: { show: false },
      cursor: { show: false },
      scales: { x: { time: false, range: [-0.6, n - 0.4] }, y: { range: (u, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
      axes: [
        { ...AXIS, incrs: [1, 2, 3, 4], values: (u, splits) => splits.map((i) => BUCKET_LABELS[i] || ''), size: 30, grid: { show: false } },
        { ...AXIS, size: 40, values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? String(v) : '')) },
      ],
      series: [{}, { label: 'sessions', stroke: color, fill: `${color}cc`, width: 1, paths: uPlot.paths.bars({ size: [0.75, 48] }), points: { show: false } }],
    };
    return new uPlot(opts, [BUCKETS.map((_, i) => i), BUCKETS.map(() => 0)], box);
  }

  function makeSeries(box) {
    const opts = {
      width: chartWidth(box),
      height: 190,
      legend: { show: false },
      cursor: { show: false },
      // The last half hour, whatever the points cover so far.
      scales: {
        x: { time: true, range: () => { const now = serverNow() / 1000; return [now - SERIES_SPAN_S, now]; } },
        y: { range: (u, lo, hi) => [0, Math.max(2, Math.ceil(hi * 1.15))] },
      },
      axes: [{ ...AXIS, size: 30 }, { ...AXIS, size: 40, values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? String(v) : '')) }],
      series: [
        {},
        // (uPlot shows the points while they are few and far apart: a first one is visible.)
        { label: 'active', stroke: '#22c55e', width: 2 },
        { label: 'starting', stroke: '#60a5fa', width: 2 },
        { label: 'ending', stroke: '#f59e0b', width: 2 },
      ],
    };
    return new uPlot(opts, [[], [], [], []], box);
  }

  function initCharts() {
    if (st.charts.act || typeof uPlot === 'undefined') return;
    st.charts.act = makeHistogram($('c-act'), '#60a5fa');
    st.charts.ttm = makeHistogram($('c-ttm'), '#c084fc');
    st.charts.series = makeSeries($('c-series'));
    const ro = new ResizeObserver(() => {
      for (const [id, c] of [['c-act', st.charts.act], ['c-ttm', st.charts.ttm], ['c-series', st.charts.series]]) {
        const w = chartWidth($(id));
        if (Math.abs(w - c.width) > 2) c.setSize({ width: w, height: 190 });
      }
    });
    for (const id of ['c-act', 'c-ttm', 'c-series']) ro.observe($(id));
  }

  function renderCharts() {
    if ($('screen-dash').hidden) return;
    initCharts();
    st.chartsDirty = false;
    const since = serverNow() - st.windowMs;
    const trim = (a) => {
      const i = a.findIndex((x) => x[0] >= since);
      if (i > 0) a.splice(0, i);
      else if (i < 0) a.length = 0;
    };
    trim(st.act);
    trim(st.ttm);
    const mins = Math.round(st.windowMs / 60000);
    const stats = (values, what) => {
      const sorted = values.slice().sort((a, b) => a - b);
      if (!sorted.length) return { text: `No ${what} in the last ${mins} min.`, p50: null };
      const p50 = quantile(sorted, 0.5);
      return {
        p50,
        text: `${sorted.length} in the last ${mins} min · p50 ${ms(p50)} · p95 ${ms(quantile(sorted, 0.95))} · p99 ${ms(quantile(sorted, 0.99))} · max ${ms(sorted[sorted.length - 1])}`,
      };
    };
    const act = st.act.map((a) => a[1]);
    const a = stats(act, 'activations');
    const paths = {};
    for (const s of st.act) paths[s[3] || '?'] = (paths[s[3] || '?'] || 0) + 1;
    const byPath = Object.entries(paths).map(([p, n]) => `${n} ${p}`).join(', ');
    $('c-act-stats').textContent = a.p50 == null ? a.text : `${a.text}${byPath ? ` (${byPath})` : ''}`;
    $('t-act').textContent = ms(a.p50);
    const ttm = st.ttm.map((m) => m[1]);
    const t = stats(ttm, 'matches');
    $('c-ttm-stats').textContent = t.text;
    $('t-ttm').textContent = ms(t.p50);
    const last = st.series[st.series.length - 1];
    $('c-series-stats').textContent = last
      ? `Now: ${last[3]} active · ${last[1] + last[2]} starting · ${last[4]} ending (one point every 5 s)`
      : 'Collecting…';
    if (!st.charts.act) return;
    st.charts.act.setData([BUCKETS.map((_, i) => i), histogram(act)]);
    st.charts.ttm.setData([BUCKETS.map((_, i) => i), histogram(ttm)]);
    st.charts.series.setData([
      st.series.map((p) => p[0] / 1000),
      st.series.map((p) => p[3]),
      st.series.map((p) => p[1] + p[2]),
      st.series.map((p) => p[4]),
    ]);
  }

  // ------------------------------------------------------------------------ admin API

  async function api(method, path) {
    let r;
    try {
      r = await fetch(path, { method, headers: { Authorization: `Bearer ${st.token}` }, cache: 'no-store' });
    } catch (e) {
      return { ok: false, status: 0, code: 'unreachable', message: `the server cannot be reached (${e.message})` };
    }
    const body = await r.json().catch(() => ({}));
    if (r.status === 401 || r.status === 403) {
      signOut(`The server refused the token: ${body.code || r.status}.`);
    }
    return r.ok ? { ok: true, status: r.status, body } : { ok: false, status: r.status, code: body.code || String(r.status), message: body.message || r.statusText };
  }

  let confirmAction = null;
  function confirm(title, text, yes, action) {
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-yes').textContent = yes;
    $('confirm-yes').disabled = false;
    confirmAction = action;
    $('confirm').showModal();
    $('confirm-no').focus();
  }

  async function confirmed() {
    const action = confirmAction;
    confirmAction = null;
    $('confirm-yes').disabled = true;
    $('confirm').close();
    if (action) await action();
  }

  function askDrain(id) {
    const h = st.hosts.find((x) => x.id === id);
    if (!h) return;
    const drain = !h.draining;
    const text = drain
      ? `Host ${id} gets no new sessions while drained; its ${h.running} running VM${h.running === 1 ? '' : 's'} finish normally.`
      : `Host ${id} takes new sessions again.`;
    confirm(drain ? `Drain ${id}?` : `Undrain ${id}?`, text, drain ? 'Drain host' : 'Undrain host', async () => {
      const r = await api('POST', `/v1/admin/hosts/${encodeURIComponent(id)}/${drain ? 'drain' : 'undrain'}`);
      if (r.ok) {
        outcome(drain ? `Host ${id} is draining: no new sessions go to it.` : `Host ${id} takes new sessions again.`);
      } else {
        outcome(`Could not ${drain ? 'drain' : 'undrain'} ${id}: ${r.code} — ${r.message}`, 'error');
      }
      const btn = hostRows.get(id);
      if (btn) btn.button.focus();
    });
  }

  // ------------------------------------------------------------------------ session dialog

  let lastFocus = null;
  function openSession(id) {
    const row = st.sessions.get(id);
    if (!row) return;
    st.open = id;
    st.focusId = id;
    st.detail = null;
    lastFocus = document.activeElement;
    $('sd-id').textContent = id;
    $('sd-outcome').hidden = true;
    renderDetail();
    const d = $('session-dialog');
    if (!d.open) d.showModal();
    $('sd-close').focus();
    refreshDetail();
  }

  function closeDialogs() {
    for (const id of ['confirm', 'session-dialog']) if ($(id).open) $(id).close();
  }

  async function refreshDetail() {
    const id = st.open;
    if (!id) return;
    const r = await api('GET', `/v1/admin/sessions/${encodeURIComponent(id)}`);
    if (st.open !== id) return;
    if (r.ok) {
      st.detail = r.body;
    } else if (r.code === 'unknown_session') {
      st.detail = { gone: true };
    } else {
      outcome(`Could not read session ${id}: ${r.code} — ${r.message}`, 'error');
    }
    renderDetail();
  }

  let detailTimer = null;
  function refreshDetailSoon() {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(refreshDetail, 150);
  }

  function renderDetail() {
    const id = st.open;
    if (!id) return;
    const row = st.sessions.get(id);
    const d = st.detail && !st.detail.gone ? st.detail : null;
    const s = d || row;
    const dialog = $('session-dialog');
    if (!s) {
      $('sd-facts').replaceChildren(el('dt', { text: 'State' }), el('dd', { text: 'no longer kept by the server' }));
      $('sd-end').hidden = true;
      return;
    }
    dialog.dataset.state = s.state;
    const facts = [
      ['State', el('span', { class: `badge s-${s.state}`, 'data-testid': 'session-state', text: s.state })],
      ['Mode', `${s.mode} · ${s.region}`],
      ['Image', s.image],
      ['Host', s.host || '–'],
    ];
    if (d) {
      facts.push(['VM', d.vm || '–'], ['Gateway', d.endpoint || '–'], ['Queued before match', ms(d.match_ms)]);
    }
    facts.push(['Created', `${new Date(s.created_ms).toLocaleString()} (${age(serverNow() - s.created_ms)} ago)`]);
    if (s.end_reason) facts.push(['End reason', `${s.end_reason}${REASONS[s.end_reason] ? ` — ${REASONS[s.end_reason]}` : ''}`]);
    $('sd-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', {}, typeof v === 'string' ? document.createTextNode(v) : v)]));

    const teams = d && d.teams && d.teams.length ? d.teams : [s.players];
    $('sd-players').replaceChildren(...teams.flatMap((team, t) => team.map((p) => el('li', { 'data-testid': 'session-player' },
      teams.length > 1 ? el('span', { class: 'team', text: `Team ${t + 1}` }) : null, el('code', { text: p })))));

    const tl = $('sd-timeline');
    if (d) {
      const start = d.history.length ? d.history[0].at_ms : d.created_ms;
      tl.replaceChildren(...d.history.map((h, i) => el('li', { 'data-testid': 'timeline-entry', 'data-state': h.state },
        el('span', { class: `badge s-${h.state}`, text: h.state }), document.createTextNode(' '),
        el('time', { dateTime: new Date(h.at_ms).toISOString(), text: clockTime(h.at_ms) }),
        el('span', { class: 'delta', text: i ? `+${ms(h.at_ms - start)}` : '' }),
        h.note ? el('span', { class: 'note', text: h.note }) : null)));
    } else {
      tl.replaceChildren(el('li', { text: st.detail && st.detail.gone ? 'The server no longer keeps this session.' : 'Loading…' }));
    }

    const res = $('sd-results');
    const results = d ? d.results : null;
    if (!d) {
      res.replaceChildren(el('p', { text: '…' }));
    } else if (results == null) {
      res.replaceChildren(el('p', { class: 'hint', text: s.state === 'ended' ? 'No results (the game did not report any).' : 'None yet: the session has not ended.' }));
    } else if (Array.isArray(results.players)) {
      const winner = results.winner == null ? 'No winner (draw or abandoned)' : `Team ${results.winner + 1} won`;
      const scores = Array.isArray(results.scores) ? results.scores.map((n, i) => `team ${i + 1}: ${n}`).join(' · ') : '';
      res.replaceChildren(
        el('p', { 'data-testid': 'results-winner', text: `${winner}${scores ? ` — ${scores}` : ''}` }),
        el('div', { class: 'table-wrap' }, el('table', { class: 'data' },
          el('thead', {}, el('tr', {}, ...['Player', 'Team', 'Kills', 'Deaths', 'Joined', 'Left'].map((h) => el('th', { scope: 'col', text: h })))),
          el('tbody', {}, ...results.players.map((p) => el('tr', {},
            el('td', {}, el('code', { text: p.id })), el('td', { text: p.team + 1 }), el('td', { text: p.kills ?? '' }),
            el('td', { text: p.deaths ?? '' }), el('td', { text: p.joined ? 'yes' : 'no' }), el('td', { text: p.left ? 'yes' : 'no' })))))),
        results.duration_ms != null ? el('p', { class: 'hint', text: `Map ${results.map || '?'} · ${ms(results.duration_ms)}` }) : null,
      );
    } else {
      res.replaceChildren(el('pre', { text: JSON.stringify(results, null, 2) }));
    }
    const live = s.state !== 'ended' && s.state !== 'ending';
    $('sd-end').hidden = !live;
  }

  function askEnd() {
    const id = st.open;
    const s = (st.detail && !st.detail.gone && st.detail) || st.sessions.get(id);
    if (!s) return;
    const n = s.players.length;
    confirm('End this session?', `Session ${id} (${s.mode}, ${n} player${n === 1 ? '' : 's'}) ends now: its players are told it ended (reason “admin”) and its VM is destroyed.`, 'End session', async () => {
      const r = await api('POST', `/v1/admin/sessions/${encodeURIComponent(id)}/end`);
      if (r.ok) {
        outcome(`Session ${shortId(id)} is ${r.body.state}: its players were told it ended (admin).`);
        st.detail = r.body;
        renderDetail();
      } else {
        outcome(`Could not end session ${shortId(id)}: ${r.code} — ${r.message}`, 'error');
      }
      if ($('session-dialog').open) $('sd-close').focus();
    });
  }

  // ------------------------------------------------------------------------ wiring

  function init() {
    $('dev-form').addEventListener('submit', devSignIn);
    $('token-form').addEventListener('submit', tokenSignIn);
    $('signout').addEventListener('click', () => signOut());
    $('error-close').addEventListener('click', hideError);
    $('outcome-close').addEventListener('click', () => { $('outcome').hidden = true; });
    $('net-retry').addEventListener('click', () => { st.feed.attempt = 0; connect(); });
    $('filter').addEventListener('input', onFilter);
    $('state-filter').addEventListener('change', () => {
      st.stateFilter = $('state-filter').value;
      st.viewDirty = true;
      $('sessions-scroll').scrollTop = 0;
      renderSessions();
    });
    for (const b of document.querySelectorAll('button.sort')) b.addEventListener('click', () => setSort(b.dataset.key));
    sortHeaders();
    $('sessions-scroll').addEventListener('scroll', scheduleRender, { passive: true });
    const body = $('sessions-body');
    body.addEventListener('keydown', onRowsKey);
    body.addEventListener('click', (ev) => {
      const tr = ev.target.closest('tr.row');
      if (tr) openSession(tr.dataset.id);
    });
    body.addEventListener('focusin', (ev) => {
      const tr = ev.target.closest('tr.row');
      if (tr) st.focusId = tr.dataset.id;
    });
    $('sd-close').addEventListener('click', () => $('session-dialog').close());
    $('sd-end').addEventListener('click', askEnd);
    $('session-dialog').addEventListener('close', () => {
      const id = st.open;
      st.open = null;
      st.detail = null;
      const c = id && rowCache.get(id);
      const back = c ? c.tr : lastFocus;
      if (back && back.isConnected) back.focus({ preventScroll: !!c });
    });
    $('confirm-no').addEventListener('click', () => { confirmAction = null; $('confirm').close(); });
    $('confirm-yes').addEventListener('click', confirmed);
    $('confirm').addEventListener('close', () => { confirmAction = null; });
    setInterval(tick, 1000);
    window.addEventListener('resize', scheduleRender);

    let saved = null;
    try { saved = sessionStorage.getItem(TOKEN_KEY); } catch { /* none */ }
    if (saved) signedIn(saved);
    else $('dev-name').focus();
  }

  // Script errors, kept for tests (which fail on any).
  const errors = [];
  window.addEventListener('error', (e) => errors.push(`${e.message} (${e.filename}:${e.lineno})`));
  window.addEventListener('unhandledrejection', (e) => errors.push(`unhandled: ${e.reason}`));

  // For tests and for poking around from the console.
  window.berthAdmin = {
    state: st,
    errors,
    get perf() { return st.perf; },
    dropFeed() { if (st.feed.ctrl) st.feed.ctrl.abort(); },
  };

  init();
})();
