#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/): well-formed
inputs in the wire formats of docs/protocol.md, so that fuzzing starts from what the decoders
accept. Run from the repository root; the files are committed."""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def u8(v): return struct.pack("<B", v)
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def i32(v): return struct.pack("<i", v)
def u64(v): return struct.pack("<Q", v)
def f32(v): return struct.pack("<f", v)
def string(s): return u32(len(s)) + s


def optimizer(kind=2):
    return u8(kind) + f32(0.01) + f32(0.0) + f32(0.9) + u8(0) + f32(0.9) + f32(0.999) + f32(1e-8) + f32(0.0)


def remote_key(packed=b"\x01" * 16):
    return u64(0x7f0000001000) + u64(4096) + u64(len(packed)) + packed


def view(nodes=()):
    # 2 servers, 3 workers; sync, no staleness, mean, no quorum, no weights, fixed rule; then the
    # workers' nodes (node-level reduction: none, or one per worker), the job id, 1 replica, a 2000 ms failover timeout.
    return (u32(2) + u32(3) + u32(2) + u32(1) + string(b"127.0.0.1:4000") + u32(2) +
            string(b"127.0.0.1:4001") + u8(0) + u32(0) + u8(0) + u32(0) + u32(0) + u8(0) +
            u64(4 << 20) + u32(500) + u32(5000) + string(b"tcp") + u32(len(nodes)) +
            b"".join(u32(n) for n in nodes) + u64(0x1234) + u32(1) + u32(2000))


def codecs(push=0, block=256, pull=0):  # CreateChunkItem's codecs, then primary and backup
    return u8(push) + u32(block) + u8(pull) + u32(0) + u32(1)


def grant():
    return u32(3) + u64(3 * 4096) + remote_key()


MESSAGES = {
    "cluster_view": (0, view()),
    "register_request": (1, u8(2) + i32(-1) + string(b"") + string(b"host") + u32(123) + string(b"tcp") +
                         string(b"") + i32(-1) + u32(1)),
    "register_request_node": (1, u8(2) + i32(-1) + string(b"") + string(b"host") + u32(123) + string(b"tcp") +
                              string(b"host/node1") + i32(1) + u32(2)),
    "cluster_view_nodes": (0, view((0, 0, 1))),
    "register_reply": (2, u32(7) + u32(1) + view() + u8(0) + u8(0) + u64(0) + u64(0) + u64(0)),
    "register_reply_rejoined": (2, u32(7) + u32(2) + view() + u8(1) + u8(0) + u64(0) + u64(0) + u64(0)),
    "register_reply_joined": (2, u32(7) + u32(2) + view() + u8(0) + u8(1) + u64(1) + u64(1) + u32(0)
                              + u64(1) + u32(2)),
    "create_chunk_item": (3, u64(1) + string(b"fc1.weight") + u64(0) + u64(1024) + optimizer() + codecs()),
    "create_chunk_item_topk": (3, u64(1) + string(b"fc1.weight") + u64(0) + u64(1024) + optimizer() + codecs(5, 256, 2)),
    "chunk_slots": (4, remote_key() + u64(4160) + u64(0) + u64(0)),
    "landing_grant": (5, grant()),
    "grant_request": (6, u64(0) + u64(1) + u64(4096) + u32(0) + u64(1)),
    "push_done": (7, u64(0) + u64(1) + u32(3) + u32(0) + u64(1) + u64(4096)),
    "push_ack": (8, u64(0) + u64(5) + u8(1) + grant()),
    "push_ack_plain": (8, u64(0) + u64(5) + u8(0)),
    "remote_key": (9, remote_key()),
    "optimizer": (10, optimizer(1)),
    "reply_head": (11, u64(9) + i32(0) + string(b"") + b"body"),
    "reply_error": (11, u64(9) + i32(3) + string(b"unknown chunk 7")),
    "barrier": (13, string(b"step-7") + u64(30000)),
    "declare": (14, u32(2) + string(b"fc1.weight") + u64(200704) + string(b"fc1.bias") + u64(256)),
    "declare_reply": (15, u32(1) + u32(2) + u64(1) + u32(0) + u32(1) + u64(0) + u64(1024) + u64(2) + u32(1) + u32(0xffffffff) + u64(1024) + u64(10)),
    "create_chunks": (16, u32(1) + u64(1) + string(b"fc1.weight") + u64(0) + u64(1024) + optimizer() + codecs(3, 256, 1)
                      + i32(-1) + u32(0)),
    "create_chunks_rejoin": (16, u32(1) + u64(1) + string(b"fc1.weight") + u64(0) + u64(1024) + optimizer() + codecs(3, 256, 1)
                             + i32(2) + u32(1) + u64(9)),
    "create_chunks_reply": (17, u32(1) + remote_key() + u64(4160) + u64(0) + u64(0)),
    "create_chunks_reply_rejoin": (17, u32(1) + remote_key() + u64(4160) + u64(8) + u64(9)),
    "batch": (18, u64(0) + u32(1) + u32(3)
              + u64(1) + u8(3) + u64(1) + u64(32) + u64(0)
              + u64(2) + u8(2)
              + u64(3) + u8(5) + u64(2) + u64(16) + u64(1) + f32(0.5)),
    "batch_answer": (19, u64(0) + u64(7) + u32(2)
                     + u32(0) + i32(0) + string(b"") + u64(1) + u8(2) + u64(1) + u64(32)
                     + u32(2) + i32(3) + string(b"unknown chunk 3") + u64(0) + u8(0)),
    "server_down": (20, u64(2) + u32(1)),
    "worker_down": (21, u32(2)),
    "backup_orders": (22, u64(1) + u32(2) + u64(3) + u32(0) + u64(6) + u32(2)),
    "backup_rebuilt": (23, u64(3) + u32(0) + string(b"")),
    "backup_rebuilt_error": (23, u64(3) + u32(0) + string(b"server 0 was declared dead")),
    "install_replica": (24, u64(1) + u64(3) + string(b"fc1.weight") + u64(0) + u64(1024) + optimizer() + codecs()
                        + u64(7) + u64(7) + u32(2) + u64(7) + u64(6) + u32(1) + u32(1) + u32(2) + u64(0) + u64(9) + u64(1024) + u64(1024)),
    "worker_up": (25, u32(2)),
    "replica_membership": (26, u64(1) + u64(3) + u32(2) + u8(2) + u64(9)),
    "checkpoint_gate": (27, u64(3) + u32(60000)),
    "checkpoint_counts": (28, u64(3) + u32(2) + string(b"fc1.weight") + u64(7) + string(b"fc1.bias") + u64(6)),
    "checkpoint_cuts": (29, u64(3) + u8(0) + string(b"/ckpt/run1") + u32(60000) + u32(1)
                        + string(b"fc1.weight") + u32(2) + u64(7) + u64(6) + u64(7)),
    "checkpoint_done": (30, u64(3) + i32(0) + string(b"") + string(b"generation 2 in /ckpt/run1")),
    "checkpoint_done_error": (30, u64(3) + i32(5) + string(b"timed out") + string(b"")),
    "take_checkpoint": (31, string(b"/ckpt/run1") + u32(120000)),
    "save_chunks": (32, string(b"/ckpt/run1") + string(b"g2-server-0.chunks") + u32(0) + u32(0)),
    "save_chunks_cuts": (32, string(b"/ckpt/run1") + string(b"g2-server-0.chunks") + u32(60000) + u32(1)
                         + string(b"fc1.weight") + u32(2) + u64(7) + u64(6) + u64(7)),
    "server_joined": (33, u64(1) + u32(2) + u32(9) + string(b"127.0.0.1:7071")),
    "server_reached": (34, u32(2) + string(b"")),
    "server_reached_error": (34, u32(2) + string(b"connection refused")),
    "forwarded_step": (35, u64(1) + u64(3) + u64(7) + u8(1) + f32(0.1) + f32(0.5) + u64(2) + u32(0) + u32(1)),
    "forwarded_step_no_lr": (35, u64(1) + u64(3) + u64(7) + u8(0) + f32(1.0) + u64(1) + u32(2)),
    "counts": (12, u32(3) + u64(4) + b"abcd" + u64(2) + f32(1.0) + f32(2.0) + string(b"s")),
}

KEY = b"@@SHARDPS-KEY@@@"  # fuzz_frame puts the region's real key here


def frame(ftype, meta=b"", payload=b"", aux=0, request=0, magic=0x31535053, version=1):
    return (u32(magic) + u8(version) + u8(ftype) + u16(0) + u32(len(meta)) + u32(aux) +
            u64(len(payload)) + u64(request)) + meta + payload


FRAMES = {
    "message": frame(1, b"meta", b"payload", aux=5),
    "message_empty": frame(1, aux=9),
    "two_messages": frame(1, b"a", b"b", aux=1) + frame(1, b"c", b"", aux=2),
    "write": frame(2, KEY + u64(0), b"\x07" * 64, request=1),
    "write_outside": frame(2, KEY + u64(4090), b"\x07" * 64, request=2),
    "write_msg": frame(6, KEY + u64(0) + b"note", b"\x07" * 64, aux=32),
    "write_msg_outside": frame(6, KEY + u64(4090) + b"note", b"\x07" * 64, aux=32),
    "read": frame(4, KEY + u64(0) + u64(128), request=3),
    "read_bad_key": frame(4, b"\x00" * 16 + u64(0) + u64(128), request=4),
    "write_resp_unsolicited": frame(3, i32(0) + string(b""), request=77),
    "claims_big": frame(1, b"", b"", aux=1)[:16] + u64(1 << 30) + u64(0) + b"x" * 100,
    "bad_magic": frame(1, b"m", magic=0x12345678),
    "truncated": frame(1, b"meta", b"payload")[:20],
}

CONFIGS = {
    "global": b"log-level = \"debug\"\n",
    "bench": b"[bench]\nservers = 2\nworkers = 3\nmode = \"async\"\nchunk-size = \"64KiB\"\n",
    "both": b"log-level = \"warn\"\n[bench]\nlanding-buffers = 8\n[launch]\nbusy-poll-us = 0\n",
    "inbound": b"[bench]\nconnection-inbound-bytes = \"8MiB\"\nprocess-inbound-bytes = \"1GiB\"\n",
    "unknown_key": b"[bench]\nserverz = 2\n",
    "unknown_section": b"[nope]\nservers = 2\n",
    "ini": b"; comment\n[bench]\naggregate=sum\n",
    "size": b"4MiB",
}


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def codec_seed(codec, block, numel, lo, hi, body):
    return u8(codec) + u16(block) + u16(numel) + u16(lo) + u16(hi) + body


CODECS = {
    "none": codec_seed(0, 256, 4, 1, 3, f32(1) + f32(-2) + f32(3) + f32(0.5)),
    "fp16": codec_seed(1, 256, 4, 0, 4, u16(0x3c00) + u16(0xc000) + u16(0x7c00) + u16(0x0001)),
    "bf16": codec_seed(2, 256, 2, 1, 2, u16(0x3f80) + u16(0x7fc0)),
    "int8": codec_seed(3, 2, 5, 1, 4, f32(0.5) + f32(1) + f32(2) + bytes([1, 255, 127, 129, 0])),
    "onebit": codec_seed(4, 4, 10, 3, 9, f32(0.25) + f32(1) + f32(2) + bytes([0x5a, 0x01])),
    "topk": codec_seed(5, 256, 100, 10, 90, u32(3) + u32(4) + u32(50) + u32(99) + f32(1) + f32(-1) + f32(7)),
    "spec": b"topk:k=10,ef=off",
    "spec_int8": b"int8:block=128",
}


def main():
    for name, (sel, body) in MESSAGES.items():
        write("messages", name, bytes([sel]) + body)
    for name, data in FRAMES.items():
        write("frame", name, data)
    for name, data in CONFIGS.items():
        write("config", name, data)
    for name, data in CODECS.items():
        write("codec", name, data)


if __name__ == "__main__":
    main()
