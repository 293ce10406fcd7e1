#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/: a handful of valid inputs per target, in
the encoding each target's doc comment describes, built from the messages the unit tests use."""
import json
import os
import struct
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# Device operations (husk_vmm::fuzzing): 0 = a chain of buffers.
def chain(queue, bufs):
    out = bytes([0, queue, len(bufs) - 1])
    for writable, payload_or_len in bufs:
        if writable:
            out += bytes([1]) + struct.pack("<H", payload_or_len)
        else:
            out += bytes([0]) + struct.pack("<H", len(payload_or_len)) + payload_or_len
    return out


def raw_desc(queue, addr, length, flags, nxt):
    return bytes([1, queue]) + struct.pack("<QIHH", addr, length, flags, nxt)


# virtio-blk: header type, reserved, sector; then data; then a status byte.
def blk(kind, sector, out=b"", in_len=0):
    bufs = [(False, struct.pack("<IIQ", kind, 0, sector))]
    if out:
        bufs.append((False, out))
    if in_len:
        bufs.append((True, in_len))
    bufs.append((True, 1))
    return chain(0, bufs)


put("virtio_block", "read", b"\0" + blk(0, 3, in_len=1024))
put("virtio_block", "write_flush", b"\0" + blk(1, 10, out=b"\x07" * 1024) + blk(4, 0))
put("virtio_block", "get_id", b"\0" + blk(8, 0, in_len=20))
put("virtio_block", "read_only_write", b"\1" + blk(1, 0, out=b"\xee" * 512))
put("virtio_block", "indirect", b"\0" + raw_desc(0, 0x100000, 48, 4, 0))

# virtio-vsock: rx 0, tx 1, event 2; a 44-byte header.
GUEST, HOST = 42, 2


def pkt(src_port, dst_port, op, data=b"", buf_alloc=65536, fwd=0, src=GUEST, dst=HOST):
    h = struct.pack("<QQIIIHHIII", src, dst, src_port, dst_port, len(data), 1, op, 0, buf_alloc, fwd)
    return h + data


def rx_bufs(n):
    return b"".join(chain(0, [(True, 44 + 4096)]) for _ in range(n))


FIRST_LOCAL = 1 << 30
put("virtio_vsock", "connect_send", rx_bufs(4) + chain(1, [(False, pkt(5000, 1024, 1))])
    + chain(1, [(False, pkt(5000, 1024, 5, b"hello"))]) + chain(1, [(False, pkt(5000, 1024, 4))]))
put("virtio_vsock", "accept_host", rx_bufs(4) + chain(1, [(False, pkt(1024, FIRST_LOCAL, 2))])
    + chain(1, [(False, pkt(1024, FIRST_LOCAL, 5, b"OK"))]) + chain(1, [(False, pkt(1024, FIRST_LOCAL, 3))]))
put("virtio_vsock", "credit", rx_bufs(2) + chain(1, [(False, pkt(1024, FIRST_LOCAL, 7))])
    + chain(1, [(False, pkt(1024, FIRST_LOCAL, 6, fwd=100))]))
put("virtio_vsock", "split_header", rx_bufs(2) + chain(1, [(False, pkt(5000, 1024, 1)[:20]), (False, pkt(5000, 1024, 1)[20:])]))
put("virtio_vsock", "event", chain(2, [(True, 4)]))

# 9P2000.L messages.
def msg(ty, tag, body):
    return struct.pack("<IBH", 7 + len(body), ty, tag) + body


def s(x):
    x = x.encode()
    return struct.pack("<H", len(x)) + x


TVERSION, TATTACH, TWALK, TLOPEN, TREAD, TCLUNK, TGETATTR, TLCREATE, TREADDIR, TWRITE = 100, 104, 110, 12, 116, 120, 24, 14, 40, 118
TMKDIR, TUNLINKAT, TRENAMEAT, TSETATTR, TSYMLINK = 72, 76, 74, 26, 16
version = msg(TVERSION, 0xFFFF, struct.pack("<I", 8192) + s("9P2000.L"))
attach = msg(TATTACH, 1, struct.pack("<II", 1, 0xFFFFFFFF) + s("root") + s("") + struct.pack("<I", 0))
walk = msg(TWALK, 2, struct.pack("<IIH", 1, 2, 1) + s("file"))
walk_sub = msg(TWALK, 2, struct.pack("<IIH", 1, 3, 2) + s("sub") + s("inner"))
lopen = msg(TLOPEN, 3, struct.pack("<II", 2, 0))
read = msg(TREAD, 4, struct.pack("<IQI", 2, 0, 100))
clunk = msg(TCLUNK, 5, struct.pack("<I", 2))
getattr_ = msg(TGETATTR, 6, struct.pack("<IQ", 1, 0x3FFF))
create = msg(TLCREATE, 7, struct.pack("<I", 1) + s("new") + struct.pack("<III", 2, 0o644, 0))
write = msg(TWRITE, 8, struct.pack("<IQI", 1, 0, 3) + b"abc")
readdir = msg(TREADDIR, 9, struct.pack("<IQI", 1, 0, 4096))
mkdir = msg(TMKDIR, 10, struct.pack("<I", 1) + s("d") + struct.pack("<II", 0o755, 0))
renameat = msg(TRENAMEAT, 11, struct.pack("<I", 1) + s("file") + struct.pack("<I", 1) + s("moved"))
unlinkat = msg(TUNLINKAT, 12, struct.pack("<I", 1) + s("moved") + struct.pack("<I", 0))
symlink = msg(TSYMLINK, 13, struct.pack("<I", 1) + s("sl") + s("/etc/passwd") + struct.pack("<I", 0))


def p9(*msgs, reply=8192):
    return b"".join(chain(0, [(False, m), (True, reply)]) for m in msgs)


put("virtio_9p", "read_file", b"\0" + p9(version, attach, walk, lopen, read, clunk))
put("virtio_9p", "create_write", b"\0" + p9(version, attach, getattr_, create, write, readdir))
put("virtio_9p", "dirs", b"\0" + p9(version, attach, mkdir, renameat, unlinkat, symlink, walk_sub))
put("virtio_9p", "read_only", b"\1" + p9(version, attach, create, mkdir))


# p9_messages: (request, reply) pairs, each u16 length-prefixed.
def pair(req, reply):
    return struct.pack("<H", len(req)) + req + struct.pack("<H", len(reply)) + reply


qid = bytes(13)
rversion = msg(TVERSION + 1, 0xFFFF, struct.pack("<I", 8192) + s("9P2000.L"))
rattach = msg(TATTACH + 1, 1, qid)
rwalk1 = msg(TWALK + 1, 2, struct.pack("<H", 1) + qid)
rwalk2 = msg(TWALK + 1, 2, struct.pack("<H", 2) + qid + qid)
rlopen = msg(TLOPEN + 1, 3, qid + struct.pack("<I", 0))
rclunk = msg(TCLUNK + 1, 5, b"")
rrenameat = msg(TRENAMEAT + 1, 11, b"")
rlerror = msg(7, 2, struct.pack("<I", 2))
put("p9_messages", "walk_open_clunk", pair(version, rversion) + pair(attach, rattach) + pair(walk, rwalk1)
    + pair(lopen, rlopen) + pair(clunk, rclunk))
put("p9_messages", "deep_walk", pair(version, rversion) + pair(attach, rattach) + pair(walk_sub, rwalk2)
    + pair(renameat, rrenameat))
put("p9_messages", "errors", pair(version, rversion) + pair(attach, rattach) + pair(walk, rlerror))
put("p9_messages", "setattr_mknod", pair(msg(TSETATTR, 1, struct.pack("<II", 1, 8) + bytes(52)), msg(27, 1, b""))
    + pair(msg(18, 2, struct.pack("<I", 1) + s("dev") + struct.pack("<IIII", 0o20644, 1, 3, 0)), msg(7, 2, struct.pack("<I", 1))))


# Agent frames: "HSK", version 1, kind, u32 length, payload.
def frame(kind, payload):
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    return b"HSK" + bytes([1, kind]) + struct.pack("<I", len(payload)) + payload


REQ, RESP, STDOUT, STDERR, STDIN = 1, 2, 3, 4, 5
exit0 = frame(RESP, {"type": "exit", "code": 0, "signal": None})
put("agent_host_reads", "ping", bytes([0]) + frame(RESP, {"type": "pong"}))
put("agent_host_reads", "version", bytes([1]) + frame(RESP, {"type": "version", "agent": "0.1.0", "protocol": 1}))
put("agent_host_reads", "exec", bytes([2]) + frame(STDOUT, b"out\n") + frame(STDERR, b"err\n") + exit0)
put("agent_host_reads", "wait", bytes([3]) + exit0)
put("agent_host_reads", "processes", bytes([4]) + frame(RESP, {"type": "processes", "pids": [1, 7]}))
put("agent_host_reads", "replies", bytes([5]) + frame(RESP, {"type": "ok"}) + frame(RESP, {"type": "error", "message": "no"})
    + frame(RESP, {"type": "created", "pid": 3}) + frame(9, b"x"))
put("agent_host_reads", "events", bytes([7]) + frame(STDOUT, b"a") + frame(RESP, {"type": "exit", "code": None, "signal": 9}))

put("agent_guest_reads", "ping_version", frame(REQ, {"type": "ping"}) + frame(REQ, {"type": "version"}))
put("agent_guest_reads", "exec", frame(REQ, {"type": "exec", "argv": ["sh", "-c", "cat"], "env": ["A=1"], "cwd": "/", "stdin": True})
    + frame(STDIN, b"input") + frame(REQ, {"type": "close_stdin"}) + frame(REQ, {"type": "signal", "signal": 15}))
put("agent_guest_reads", "container", frame(REQ, {"type": "create_container", "id": "c", "spec": {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}, "rootfs": "/rootfs"})
    + frame(REQ, {"type": "start_container", "id": "c"}) + frame(REQ, {"type": "wait_container", "id": "c"})
    + frame(REQ, {"type": "signal_container", "id": "c", "signal": 9, "all": True}) + frame(REQ, {"type": "delete_container", "id": "c"}))
put("agent_guest_reads", "mounts", frame(REQ, {"type": "mount_shares", "shares": [{"tag": "rootfs", "target": "/run/rootfs", "read_only": False, "msize": 65560}]})
    + frame(REQ, {"type": "clone_init", "time_ns": 12345, "entropy": [1, 2, 3]}) + frame(REQ, {"type": "prepare_spare", "namespaces": ["net"]})
    + frame(REQ, {"type": "resize", "rows": 24, "cols": 80}) + frame(REQ, {"type": "exec_in_container", "id": "c", "process": {"args": ["ls"]}})
    + frame(REQ, {"type": "list_processes", "id": "c"}) + frame(REQ, {"type": "attach_stdio", "id": "c"}) + frame(REQ, {"type": "poweroff"}))
put("agent_guest_reads", "bad_payload_then_good", frame(REQ, b"{not json") + frame(7, b"?") + frame(REQ, {"type": "ping"}))

# Page files: mode 0 = whole file; mode 1 = codec, data (u16 length), postcard index.
def crc(b):
    return zlib.crc32(b) & 0xFFFFFFFF


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def index(regions, blocks, base=None):
    out = varint(len(regions))
    for addr, length, base_off in regions:
        out += varint(addr) + varint(length) + varint(base_off)
    if base is None:
        out += b"\0"
    else:
        path, size = base
        out += b"\1" + varint(len(path)) + path + varint(size)
    out += varint(len(blocks))
    for guest, pages, offset, length in blocks:
        out += varint(guest) + varint(pages) + varint(offset) + varint(length) + varint(0)
    return out


def page_file(codec, data, idx):
    hdr = b"HUSKPAGE" + struct.pack("<II", 1, codec)
    hdr += struct.pack("<I", crc(hdr))
    off = len(hdr) + len(data)
    t = b"HUSKPEND" + struct.pack("<QQI", off, len(idx), crc(idx))
    return hdr + data + idx + t + struct.pack("<I", crc(t))


# An lz4 block of one zero page: a single sequence of 4096 literals would be long; use a match.
lz4_zero_page = bytes([0x1F, 0x00, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xDC, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00])
idx_one = index([(0, 1 << 20, 0)], [(0, 1, 20, len(lz4_zero_page))])
put("page_file", "structured_lz4", b"\1\0" + struct.pack("<H", len(lz4_zero_page)) + lz4_zero_page + idx_one)
put("page_file", "structured_base", b"\1\1" + struct.pack("<H", 0) + index([(0, 1 << 20, 0), (1 << 32, 1 << 20, 1 << 20)], [], base=(b"/templates/t/memory", 2 << 20)))
put("page_file", "whole_empty_index", b"\0" + page_file(1, b"", index([(0, 1 << 20, 0)], [])))
put("page_file", "whole_block", b"\0" + page_file(1, lz4_zero_page, idx_one))

# Snapshot state files: mode 1 = body behind a valid header; mode 0 = the whole file.
body = bytes(64)
put("snapshot_state", "header_only_body", b"\1" + body)
whole = b"HUSKSNAP" + struct.pack("<IIQI", 2, 0, len(body), crc(body)) + body
put("snapshot_state", "whole", b"\0" + whole)

# Checkpoint manifests.
manifest = {"format": 1, "id": "c1", "bundle": "/bundles/c1", "template": None,
            "files": [{"name": "state", "size": 5, "crc32": 0}, {"name": "pages", "size": 5, "crc32": crc(b"pages")}]}
put("checkpoint_manifest", "cold", json.dumps(manifest, indent=2).encode())
manifest2 = dict(manifest, template={"name": "base", "hash": "ab" * 32, "memory": {"dev": 1, "ino": 2, "size": 4096, "mtime_ns": 3}})
put("checkpoint_manifest", "template", json.dumps(manifest2).encode())
put("checkpoint_manifest", "pages_only", json.dumps(dict(manifest, files=[{"name": "pages", "size": 5, "crc32": crc(b"pages")}])).encode())

# config.json into a guest plan.
spec = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["PATH=/bin"], "cwd": "/"},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "h",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "rw"]},
        {"destination": "/data/ro", "type": "bind", "source": "data", "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "hosts", "options": ["bind", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=65536k"]},
    ],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}],
              "resources": {"memory": {"limit": 536870912}, "cpu": {"quota": 200000, "period": 100000}}},
}
put("config_plan", "binds", json.dumps(spec, indent=1).encode())
minimal = {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/", "user": {"uid": 1000, "gid": 1000}}, "root": {"path": "rootfs"}}
put("config_plan", "minimal", json.dumps(minimal).encode())
put("config_plan", "user_name", json.dumps(dict(minimal, process={"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0, "username": "nobody"}})).encode())
