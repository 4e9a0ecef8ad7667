"""Reflex: a reaction duel for two phones, on Berth's game-server SDK (docs/sdk.md).

Standard library only. The protocol it speaks to players is in README.md next to this file.
Start-up is slow on purpose, like a real server's: the imports, then loading and checking the
pattern table and building the pool of round schedules. Berth parks the VM after
`initialised`, so that cost is paid once per substrate, never by a player.
"""

import hashlib
import http.client
import json
import os
import random
import socket
import statistics
import sys
import threading
import time

SDK = os.environ.get("BERTH_SDK", "127.0.0.1:7001")
PORT = int(os.environ.get("REFLEX_PORT", "7000"))
DATA = os.environ.get("REFLEX_DATA", "/data/arrows.json")
DIRS = ("left", "right", "up", "down")
SCHEDULES = 1024
MAX_LINE = 4096


def log(*args):
    print("reflex:", *args, flush=True)


class SdkError(Exception):
    def __init__(self, status, code, message):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code


class Sdk:
    """One kept-alive HTTP connection to the SDK. Not shared between threads."""

    def __init__(self, timeout=10):
        host, port = SDK.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def call(self, path, body=None):
        method = "GET" if body is None else "POST"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                answer = json.loads(resp.read() or b"{}")
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self.conn.close()
                if attempt:
                    raise
        if resp.status != 200:
            raise SdkError(resp.status, answer.get("code"), answer.get("message"))
        return answer


def load_patterns(path):
    """The pattern table: every pattern's directions are valid and its digest matches."""
    with open(path) as f:
        table = json.load(f)
    patterns = table["patterns"]
    for p in patterns:
        dirs = p["dirs"]
        if not dirs or any(d not in DIRS for d in dirs):
            raise ValueError(f"pattern {p.get('name')!r}: bad directions {dirs!r}")
        digest = hashlib.sha256(" ".join(dirs).encode()).hexdigest()[:12]
        if digest != p["sha"]:
            raise ValueError(f"pattern {p['name']!r}: checksum {digest} != {p['sha']}")
    return patterns


def build_schedules(patterns):
    """A pool of fair round schedules: each a direction order with no direction three times
    in a row and waits spread evenly between 0 and 1 (scaled by the mode's limits later)."""
    pool = []
    rng = random.Random(0xB37)
    while len(pool) < SCHEDULES:
        p = patterns[rng.randrange(len(patterns))]["dirs"]
        dirs = [p[(i * 7 + rng.randrange(3)) % len(p)] for i in range(16)]
        if any(dirs[i] == dirs[i + 1] == dirs[i + 2] for i in range(14)):
            continue
        waits = [rng.random() for _ in range(16)]
        if abs(statistics.fmean(waits) - 0.5) > 0.08:
            continue
        pool.append((tuple(dirs), tuple(waits)))
    return pool


class Player:
    def __init__(self, name):
        self.name = name
        self.conn = None
        self.left_at = None
        self.best_ms = None


class Match:
    """One session's match. Every field is guarded by `cond`."""

    def __init__(self, activation, schedules):
        params = activation.get("params") or {}
        self.session = activation["session_id"]
        self.order = list(activation["players"])
        self.players = {p: Player(p) for p in self.order}
        self.first_to = int(params.get("first_to", 3))
        self.max_rounds = int(params.get("max_rounds", 7))
        self.wait_min = int(params.get("wait_min_ms", 800)) / 1000
        self.wait_max = int(params.get("wait_max_ms", 2000)) / 1000
        self.round_s = int(params.get("round_ms", 2000)) / 1000
        self.rejoin_s = float(params.get("rejoin_s", 10))
        seed = int(activation.get("rng_seed", 0))
        self.dirs, self.waits = schedules[seed % len(schedules)]
        self.score = {p: 0 for p in self.order}
        self.cond = threading.Condition()
        self.round = 0
        self.go_at = None  # when the current round's `go` went out
        self.out = set()  # players out of the current round
        self.winner = None  # the current round's winner, once there is one
        self.foul = None
        self.over = None

    def broadcast(self, msg):
        line = (json.dumps(msg) + "\n").encode()
        for p in self.players.values():
            if p.conn is not None:
                try:
                    p.conn.sendall(line)
                except OSError:
                    pass

    def welcome(self, name):
        return {
            "type": "welcome",
            "game": "reflex",
            "player": name,
            "team": self.order.index(name),
            "players": self.order,
            "first_to": self.first_to,
            "max_rounds": self.max_rounds,
        }

    def tap(self, name, n, d):
        """A player's tap in round n (under `cond`)."""
        if n != self.round or self.winner is not None or self.foul is not None or name in self.out:
            return
        if self.go_at is None:
            self.foul = name
        elif d == self.dirs[(n - 1) % len(self.dirs)]:
            self.winner = name
            ms = round((time.monotonic() - self.go_at) * 1000)
            best = self.players[name].best_ms
            self.players[name].best_ms = ms if best is None else min(best, ms)
            self.win_ms = ms
        else:
            self.out.add(name)
        self.cond.notify_all()

    def present(self):
        return [p for p in self.players.values() if p.conn is not None]

    def wait_for_players(self):
        """Until everyone is here; None, or the forfeit's winner if someone never came."""
        deadline = time.monotonic() + max(self.rejoin_s, 30)
        with self.cond:
            while len(self.present()) < len(self.order):
                missing = [p for p in self.order if self.players[p].conn is None]
                self.broadcast({"type": "waiting", "for": missing})
                left = deadline - time.monotonic()
                if left <= 0:
                    here = [p.name for p in self.present()]
                    return here[0] if here else None, True
                self.cond.wait(min(left, 2))
        return None, False

    def play_round(self, n):
        wait = self.wait_min + self.waits[(n - 1) % len(self.waits)] * (self.wait_max - self.wait_min)
        with self.cond:
            self.round, self.go_at, self.out = n, None, set()
            self.winner = self.foul = None
            self.broadcast({"type": "round", "n": n, "score": dict(self.score)})
            self.cond.wait_for(lambda: self.foul is not None, timeout=wait)
            if self.foul is None:
                self.go_at = time.monotonic()
                self.broadcast({"type": "go", "n": n, "dir": self.dirs[(n - 1) % len(self.dirs)]})
                everyone_out = lambda: len(self.out) >= len(self.order)
                self.cond.wait_for(
                    lambda: self.winner is not None or self.foul is not None or everyone_out(),
                    timeout=self.round_s,
                )
            point = {"type": "point", "n": n, "winner": None, "why": "timeout", "ms": None}
            if self.foul is not None:
                other = [p for p in self.order if p != self.foul]
                point.update(winner=other[0] if other else None, why="foul")
            elif self.winner is not None:
                point.update(winner=self.winner, why="fastest", ms=self.win_ms)
            if point["winner"] is not None:
                self.score[point["winner"]] += 1
            self.round = 0
            point["score"] = dict(self.score)
            self.broadcast(point)

    def forfeit(self):
        """The player still here wins if the other has been gone past `rejoin_s`."""
        with self.cond:
            now = time.monotonic()
            gone = [p for p in self.players.values()
                    if p.conn is None and p.left_at is not None and now - p.left_at > self.rejoin_s]
            if gone:
                here = [p.name for p in self.present()]
                return here[0] if here else None
        return False

    def run(self):
        winner, forfeited = self.wait_for_players()
        why = "forfeit" if forfeited else None
        n = 0
        while why is None:
            n += 1
            self.play_round(n)
            top = max(self.score.values(), default=0)
            leaders = [p for p in self.order if self.score[p] == top]
            gone = self.forfeit()
            if gone is not False:
                winner, why = gone, "forfeit"
            elif top >= self.first_to:
                winner, why = leaders[0], "first_to"
            elif n >= self.max_rounds:
                winner, why = (leaders[0] if len(leaders) == 1 else None), "max_rounds"
            else:
                time.sleep(0.4)
        self.finish(winner, why, n)

    def finish(self, winner, why, rounds):
        results = {
            "winner": winner,
            "why": why,
            "score": dict(self.score),
            "best_ms": {p: self.players[p].best_ms for p in self.order},
            "rounds": rounds,
        }
        with self.cond:
            self.over = results
            self.broadcast({"type": "over", "winner": winner, "why": why, "score": dict(self.score)})
        log("over", json.dumps(results))
        Sdk().call("/v1/ended", {"reason": why, "results": results})


def send(conn, msg):
    conn.sendall((json.dumps(msg) + "\n").encode())


def serve_player(conn, state):
    """One player's connection: the gateway's join line, then taps and pings."""
    sdk = Sdk()
    f = conn.makefile("rb")
    name = None
    try:
        first = json.loads(f.readline(MAX_LINE) or b"{}")
        try:
            who = sdk.call("/v1/tickets/verify", {"ticket": first.get("ticket", "")})
        except SdkError as e:
            send(conn, {"type": "error", "code": e.code, "message": "ticket refused"})
            return
        state["ready"].wait()
        match = state["match"]
        name = who["player"]
        with match.cond:
            old = match.players[name].conn
            if old is not None:
                old.close()
            match.players[name].conn = conn
            match.players[name].left_at = None
            send(conn, match.welcome(name))
            match.cond.notify_all()
        sdk.call("/v1/players/joined", {"player": name})
        for line in iter(lambda: f.readline(MAX_LINE), b""):
            handle(match, name, conn, line)
    except (OSError, ValueError, SdkError) as e:
        log("connection", name, "ended:", e)
    finally:
        if name is not None:
            gone(state["match"], name, conn, sdk)
        conn.close()


def handle(match, name, conn, line):
    try:
        msg = json.loads(line)
        kind = msg.get("type")
    except (ValueError, AttributeError):
        kind, msg = None, {}
    if kind == "tap" and isinstance(msg.get("n"), int):
        with match.cond:
            match.tap(name, msg["n"], msg.get("dir"))
    elif kind == "ping":
        send(conn, {"type": "pong", "t": msg.get("t")})
    else:
        send(conn, {"type": "error", "code": "bad_message", "message": "expected tap or ping"})


def gone(match, name, conn, sdk):
    with match.cond:
        p = match.players[name]
        if p.conn is not conn:
            return  # replaced by a reconnect
        p.conn, p.left_at = None, time.monotonic()
        match.cond.notify_all()
    try:
        sdk.call("/v1/players/left", {"player": name})
    except (OSError, SdkError):
        pass


def accept(listener, state):
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve_player, args=(conn, state), daemon=True).start()


def health():
    sdk = Sdk()
    while True:
        time.sleep(2)
        try:
            sdk.call("/v1/health", {})
        except SdkError as e:
            if e.code == "already_ended":
                return
        except OSError as e:
            log("health:", e)


def warm_ups(schedules, control):
    """The SDK's warm-up hook: run a match's set-up paths with a fake activation, and a call
    on the connection `ready` will take."""
    sdk = Sdk(timeout=None)
    while True:
        clock = sdk.call("/v1/prewarm")
        fake = {"session_id": "warm-up", "players": ["a", "b"], "params": {},
                "rng_seed": clock.get("wall_clock_ms", 0)}
        m = Match(fake, schedules)
        json.dumps(m.welcome("a"))
        with m.cond:
            m.tap("a", 1, "left")
        control.call("/v1/session")
        sdk.call("/v1/prewarmed", {})


def main():
    started = time.monotonic()
    patterns = load_patterns(DATA)
    schedules = build_schedules(patterns)
    listener = socket.create_server(("0.0.0.0", PORT), backlog=16)
    state = {"match": None, "ready": threading.Event()}
    threading.Thread(target=accept, args=(listener, state), daemon=True).start()
    log(f"loaded {len(patterns)} patterns, {len(schedules)} schedules "
        f"in {time.monotonic() - started:.1f}s; python {sys.version.split()[0]}")
    # One connection for `ready`, opened before the VM is parked: after activation, the
    # least possible work stands between the activation's answer and `ready`.
    control = Sdk()
    control.call("/v1/initialised", {"warm_up": True})
    threading.Thread(target=warm_ups, args=(schedules, control), daemon=True).start()
    activation = Sdk(timeout=None).call("/v1/activation")
    control.call("/v1/ready", {})
    state["match"] = Match(activation, schedules)
    state["ready"].set()
    threading.Thread(target=health, daemon=True).start()
    log("activated", activation["session_id"], "players", activation["players"])
    state["match"].run()
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
