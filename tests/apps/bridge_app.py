#!/usr/bin/env python3
"""A small real HTTP application behind `backhaul-backend --http-bridge`, for the end-to-end
tests (Python standard library only). It takes the bridge's POSTs and answers through callback
URLs, as an application of websocket-bridge would:

  POST /echo/frame      sends the message back to its own session (same type, same bytes)
  POST /chat/frame      sends the message to every session that has spoken in /chat: the app
                        shares one client's callback URL with the others' messages
  POST /flaky/frame     answers 503 to the first two tries of each message, then echoes it
  POST /broken/frame    always answers 500
  POST /refuse/frame    always answers 403
  POST /slow/frame      answers after 3 s
  POST /hold/frame      answers once someone POSTs /hold/release, then echoes
  POST /<room>/disconnect   the session ended: recorded, and the session leaves the room
  GET  /events          everything recorded, as JSON

Usage: bridge_app.py [CA_FILE]   (CA_FILE: trust it for https:// callback URLs)
Prints "listening on 127.0.0.1:PORT" once it serves.
"""

import hashlib
import json
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
EVENTS = []
ROOMS = {}  # room -> list of callback URLs, in the order they joined
TRIES = {}  # (callback, seq) -> tries seen
RELEASE = threading.Event()  # lets /hold/frame answer
CONTEXT = ssl.create_default_context(cafile=sys.argv[1]) if len(sys.argv) > 1 else None


def record(event):
    with LOCK:
        EVENTS.append(event)


def send(callback, content_type, body):
    """POSTs a message to a callback URL; returns the HTTP status (0: no answer)."""
    req = urllib.request.Request(
        callback, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=10, context=CONTEXT) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/events":
            with LOCK:
                body = json.dumps(EVENTS).encode()
            return self.answer(200, body)
        self.answer(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        room, _, what = self.path.strip("/").partition("/")
        callback = self.headers.get("x-ws-proxy-send", "")
        content_type = self.headers.get("Content-Type", "")
        seq = self.headers.get("x-ws-proxy-seq")
        event = {
            "kind": what,
            "room": room,
            "callback": callback,
            "seq": int(seq) if seq else None,
            "type": content_type,
            "len": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "forwarded_for": self.headers.get("x-forwarded-for"),
        }
        if content_type.startswith("text/"):
            event["text"] = body.decode("utf-8")
        if what == "disconnect":
            event["close_code"] = self.headers.get("x-ws-proxy-close-code")
            record(event)
            with LOCK:
                if callback in ROOMS.get(room, []):
                    ROOMS[room].remove(callback)
            return self.answer(204)
        if room == "hold" and what == "release":
            RELEASE.set()
            return self.answer(204)
        if what != "frame":
            return self.answer(404)
        if room == "broken":
            record(dict(event, kind="failed-try"))
            return self.answer(500, b"broken on purpose\n")
        if room == "refuse":
            return self.answer(403, b"not for you\n")
        if room == "slow":
            time.sleep(3)
            return self.answer(204)
        if room == "hold":
            RELEASE.wait(30)
        if room == "flaky":
            with LOCK:
                tries = TRIES.get((callback, seq), 0) + 1
                TRIES[(callback, seq)] = tries
            if tries <= 2:
                return self.answer(503, b"not yet\n")
        record(event)
        if room == "chat":
            with LOCK:
                members = ROOMS.setdefault(room, [])
                if callback not in members:
                    members.append(callback)
                members = list(members)
        else:
            members = [callback]
        for member in members:
            status = send(member, content_type, body)
            if status != 204:
                record({"kind": "callback-failed", "callback": member, "status": status})
        self.answer(204)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print("listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
