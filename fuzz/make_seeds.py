#!/usr/bin/env python3
"""Writes the committed seed corpora, fuzz/corpus/<target>/, from valid examples.

Each seed starts with the target's own prefix bytes (see the header of fuzz_targets/<target>.rs).
Run from anywhere: python3 fuzz/make_seeds.py
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ws_decoder: cfg | max_lo | max_hi | piece | k | sizes[k] | stream


def ws(fin, op, payload, mask=None):
    b0 = (0x80 if fin else 0) | op
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head = bytes([b0, m | n])
    elif n < 65536:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        head += bytes(mask)
    return head + payload


def ws_cfg(client, max_message, piece, sizes):
    cfg = (1 if client else 0) | (2 if max_message is None else 0)
    mm = struct.pack("<H", max_message or 0)
    return bytes([cfg]) + mm + bytes([piece, len(sizes)]) + bytes(sizes)


M = [0x12, 0x34, 0x56, 0x78]
write("ws_decoder", "server-masked-text",
      ws_cfg(False, 1000, 3, [1, 4]) + ws(True, 1, b"hello", M) + ws(True, 8, b"\x03\xe8bye", M))
write("ws_decoder", "client-fragments-and-controls",
      ws_cfg(True, 1000, 64, [2])
      + ws(False, 2, b"ab") + ws(True, 9, b"p") + ws(True, 0, b"cd") + ws(True, 10, b"q")
      + ws(True, 8, b"\x0f\xa0going away"))
write("ws_decoder", "client-16bit-length",
      ws_cfg(True, None, 100, [7, 130]) + ws(True, 2, bytes(range(200))) + ws(True, 8, b""))
write("ws_decoder", "client-64bit-length",
      ws_cfg(True, 4096, 0, []) + b"\x82\x7f" + struct.pack(">Q", 5) + b"12345")
# Regression: a Close with a one-byte payload was consumed with its error (found by fuzzing).
write("ws_decoder", "regress-bad-close-consumed", ws_cfg(True, 1000, 64, [0x71]) + b"\x88\x01\x88")
write("ws_decoder", "server-empty-messages",
      ws_cfg(False, 0, 1, [3]) + ws(False, 1, b"", M) + ws(True, 0, b"", M) + ws(True, 2, b"", M))

# batch_reader: k | sizes[k] | body


def frame(kind, flags, session, payload):
    return struct.pack(">BBII", kind, flags, session, len(payload)) + payload


def batch(ack, first_seq, *frames):
    return struct.pack(">BQQ", 1, ack, first_seq) + b"".join(frames)


open_req = json.dumps({"path": "/chat?room=1", "protocols": ["v1"]}).encode()
write("batch_reader", "data-and-close",
      b"\x00" + batch(3, 10, frame(3, 2, 7, b"hello"), frame(6, 0, 7, b"\x03\xe8bye")))
write("batch_reader", "every-kind-chunked",
      b"\x03\x01\x05\x11" + batch(0, 0,
                                   frame(1, 0, 1, open_req),
                                   frame(2, 0, 1, b'{"protocol":"v1"}'),
                                   frame(3, 1, 1, "h\u00e9".encode()),
                                   frame(4, 0, 1, b"p"),
                                   frame(5, 0, 1, b"p"),
                                   frame(7, 0, 1, struct.pack(">I", 65536)),
                                   frame(6, 1, 1, b"\x03\xf3gone")))
# Regression: frame numbers past u64::MAX overflowed (found by fuzzing).
write("batch_reader", "regress-seq-overflow",
      b"\x00" + batch(0, 2**64 - 1, frame(3, 0, 0, b""), frame(3, 0, 0, b"")))
write("batch_reader", "header-only", b"\x00" + batch(42, 1000))
write("batch_reader", "high-seq", b"\x01\x09" + batch(2**64 - 1, 2**64 - 3, frame(3, 2, 1, b"x"),
                                                       frame(3, 2, 1, b"y")))

# agent_api_json: base | text
for name, base, text in [
    ("hello", 0, {"protocol": 4, "backend_id": "app-1", "agent": "backhaul-agent/0.1.0"}),
    ("link-info", 0, {"link": "3f2a", "poll_hold_ms": 25000, "window": 1048576,
                      "max_batch_bytes": 1048576, "agent_timeout_ms": 60000}),
    ("open", 1, {"path": "/chat/room?x=1", "headers": [["origin", "https://a.example"]],
                 "protocols": ["v1", "v2"], "client_addr": "127.0.0.1:5000"}),
    ("open-dots", 2, {"path": "/a/%2e%2E/b?token=mine"}),
    ("opened", 3, {"protocol": "v1"}),
]:
    write("agent_api_json", name, bytes([base]) + json.dumps(text).encode())
write("agent_api_json", "session-path", b"\x00/b/app-1/x/y?q=1&k=2")
write("agent_api_json", "session-path-query-only", b"\x02/b/app.v2?token=evil")
write("agent_api_json", "session-path-encoded", b"\x01/b/a_b/%41%2F/%252e%252e/@evil:1//x")

# reliable: opcode (mod 8) and its arguments, u64 big-endian


def u64(n):
    return struct.pack(">Q", n)


PUSH, ACK, HAS, BATCH, RECV_ACK, CURSOR, NEXT = 1, 2, 3, 4, 5, 6, 7
write("reliable", "push-batch-ack",
      bytes([PUSH, 10, PUSH, 0, PUSH, 200]) + bytes([BATCH]) + u64(0) + u64(0) + u64(60) + b"\x01"
      + bytes([RECV_ACK, BATCH]) + u64(0) + u64(5) + u64(1000) + b"\xff"
      + bytes([RECV_ACK, HAS]) + u64(3))
write("reliable", "cursor",
      bytes([PUSH, 1, PUSH, 2, CURSOR]) + u64(16) + u64(64) + bytes([NEXT, 0, NEXT, 0, PUSH, 3])
      + bytes([NEXT, 1, RECV_ACK, NEXT, 0]))
write("reliable", "lone-receiver-and-bad-acks",
      bytes([0]) + u64(0) + bytes([0]) + u64(0) + bytes([0]) + u64(2**64 - 1)
      + bytes([PUSH, 0, ACK]) + u64(2**64 - 1) + bytes([ACK]) + u64(1) + bytes([ACK]) + u64(0))


# relay_http: the bytes a client sends to the relay (tokens as fuzz_targets/relay_http.rs sets).
AGENT = "Authorization: Bearer fuzz-agent-token\r\n"
CLIENT = "Authorization: Bearer fuzz-client-token\r\n"
UPGRADE = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
hello = json.dumps({"protocol": 4, "backend_id": "fz", "agent": "fuzz"})
for name, req in [
    ("healthz", "GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n"),
    ("session", "GET /b/fz/x?y=1 HTTP/1.1\r\nHost: r\r\n" + CLIENT + UPGRADE
     + "Sec-WebSocket-Protocol: a, b\r\nCookie: c=1\r\n\r\n"),
    ("session-no-token", "GET /b/fz HTTP/1.1\r\nHost: r\r\n" + UPGRADE + "\r\n"),
    ("register", "POST /agent/v1/links HTTP/1.1\r\nHost: r\r\n" + AGENT
     + "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(hello), hello)),
    ("poll", "GET /agent/v1/links/00000000-0000-0000-0000-000000000000/poll?ack=0&round=1 HTTP/1.1\r\n"
     "Host: r\r\n" + AGENT + "\r\n"),
    ("push", "POST /agent/v1/links/00000000-0000-0000-0000-000000000000/push HTTP/1.1\r\n"
     "Host: r\r\n" + AGENT + "Content-Length: 17\r\n\r\n" + "\x01" + "\x00" * 16),
    ("delete", "DELETE /agent/v1/links/x HTTP/1.1\r\nHost: r\r\n" + AGENT + "\r\n"),
    ("pipelined", "GET /healthz HTTP/1.1\r\nHost: r\r\n\r\nGET /nope HTTP/1.1\r\nHost: r\r\n\r\n"),
]:
    write("relay_http", name, req.encode("latin-1"))
# HTTP/2 with prior knowledge: the preface, an empty SETTINGS frame, then a HEADERS frame for
# GET /healthz (HPACK indexed :method GET, :scheme http, :path literal, :authority literal).
path = b"/healthz"
block = bytes([0x82, 0x86, 0x44, len(path)]) + path + bytes([0x41, 1]) + b"r"
h2 = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
      + struct.pack(">I", len(block))[1:] + b"\x01\x05\x00\x00\x00\x01" + block)
write("relay_http", "h2-healthz", h2)
