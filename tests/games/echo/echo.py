"""Echoes every frame back, in Berth's `frames` framing (docs/sdk.md): a kind byte (1 text,
2 binary) and a big-endian u32 length, then the payload. The first frame is the gateway's
join, checked with the SDK; a binary frame is echoed reversed, so that a test sees the game
really read it."""

import http.client
import json
import os
import socket
import struct
import threading

host, port = os.environ.get("BERTH_SDK", "127.0.0.1:7001").rsplit(":", 1)


def sdk(path, body=None):
    c = http.client.HTTPConnection(host, int(port))
    c.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body))
    r = c.getresponse()
    answer = json.loads(r.read() or b"{}")
    return r.status, answer


def read_exact(f, n):
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return data


def frame(kind, payload):
    return struct.pack(">BI", kind, len(payload)) + payload


def player(conn):
    f = conn.makefile("rb")
    try:
        kind, n = struct.unpack(">BI", read_exact(f, 5))
        join = json.loads(read_exact(f, n))
        status, who = sdk("/v1/tickets/verify", {"ticket": join.get("ticket", "")})
        if status != 200:
            conn.sendall(frame(1, json.dumps({"type": "error", "code": who.get("code")}).encode()))
            return
        hello = {"type": "welcome", "player": who["player"], "join_kind": kind}
        conn.sendall(frame(1, json.dumps(hello).encode()))
        while True:
            kind, n = struct.unpack(">BI", read_exact(f, 5))
            payload = read_exact(f, n)
            conn.sendall(frame(kind, payload if kind == 1 else payload[::-1]))
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()


def main():
    listener = socket.create_server(("0.0.0.0", 7000))
    sdk("/v1/initialised", {})
    sdk("/v1/activation")
    sdk("/v1/ready", {})

    def health():
        while sdk("/v1/health", {})[0] == 200:
            threading.Event().wait(2)

    threading.Thread(target=health, daemon=True).start()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=player, args=(conn,), daemon=True).start()


main()
