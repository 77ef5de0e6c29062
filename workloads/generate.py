#!/usr/bin/env python3
"""Writes the example workloads of this folder (format: `vmbind::workload`, README "Workloads").

    python3 workloads/generate.py        # rewrites the four .jsonl files here

Each workload is seeded, so the files are reproducible.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def h(x):
    return hex(x)


class W:
    def __init__(self, name, arena):
        self.lines = [{"op": "workload", "version": 1, "arena": f"{arena // MIB}MiB", "name": name}]

    def add(self, **kw):
        self.lines.append(kw)

    def comment(self, text):
        self.lines.append("# " + text)

    def write(self, file):
        with open(os.path.join(HERE, file), "w") as f:
            for l in self.lines:
                f.write(l if isinstance(l, str) else json.dumps(l, separators=(",", ":")))
                f.write("\n")


def allocator():
    """A caching allocator (PyTorch's expandable segments): one 1 GiB heap reserved, backed on
    demand in 2 MiB chunks, grown to 96 chunks, shrunk to 16, grown again."""
    w = W("allocator growing and shrinking", 512 * MIB)
    w.comment("A caching allocator: a 1 GiB heap at 0x100000000 backed on demand in 2 MiB chunks.")
    w.add(op="vm", name="gpu", va_size="1TiB")
    heap, chunk = 1 << 32, 2 * MIB
    rng = random.Random(1)
    live = {}
    nxt = 0

    def grow(k):
        nonlocal nxt
        for i in range(k):
            slot = min(set(range(512)) - set(live))
            name = f"c{nxt}"
            nxt += 1
            place = "contiguous" if rng.random() < 0.5 else "scattered"
            w.add(op="memory", name=name, vm="gpu", size="2MiB", placement=place, seed=nxt)
            w.add(op="bind", vm="gpu", va=h(heap + slot * chunk), size="2MiB", memory=name)
            live[slot] = name

    def shrink(k):
        for slot in rng.sample(sorted(live), k):
            w.add(op="unbind", vm="gpu", va=h(heap + slot * chunk), size="2MiB")
            w.add(op="free", vm="gpu", memory=live.pop(slot))

    w.comment("Grow to 96 chunks.")
    grow(96)
    for slot in sorted(live)[:4]:
        w.add(op="check", vm="gpu", va=h(heap + slot * chunk), size="2MiB", memory=live[slot])
    w.comment("Shrink to 16: each chunk's memory is freed once unmapped.")
    shrink(80)
    w.comment("Grow again into the holes.")
    grow(48)
    for slot in sorted(live)[:4]:
        w.add(op="check", vm="gpu", va=h(heap + slot * chunk), size="2MiB", memory=live[slot])
    w.write("allocator_grow_shrink.jsonl")


def sparse_texture():
    """A sparse texture (Vulkan sparse residency, as DXVK/vkd3d-proton stream it): a 256 MiB
    virtual texture bound sparse, 64 KiB tiles made resident from a tile pool as the camera moves,
    evicted tiles rebound sparse. Uploads go on a "transfer" queue, evictions on "evict"."""
    w = W("sparse texture streamed tile by tile", 256 * MIB)
    tex, size, tile = 0x2000000000, 256 * MIB, 64 * KIB
    tiles = size // tile
    pool_tiles = 512
    w.comment("A 256 MiB texture at 0x2000000000, sparse: reads give zero until a tile is resident.")
    w.add(op="vm", name="gpu", va_size="1TiB")
    w.add(op="memory", name="pool", vm="gpu", size=f"{pool_tiles * tile // MIB}MiB", seed=42)
    w.add(op="sparse", vm="gpu", queue="transfer", va=h(tex), size="256MiB", signal="sparse")
    w.add(op="wait", fence="sparse")
    w.add(op="check", vm="gpu", va=h(tex), size="1MiB", zero=True)
    rng = random.Random(2)
    resident = {}  # tile -> pool slot
    free_slots = list(range(pool_tiles))
    fence = 0
    for frame in range(40):
        w.comment(f"Frame {frame}: stream in the tiles around the view, evict the far ones.")
        centre = rng.randrange(tiles)
        want = [(centre + d) % tiles for d in range(-40, 40)]
        if len(free_slots) < len(want):
            far = sorted(resident, key=lambda t: -abs(t - centre))[: len(want)]
            fence += 1
            for i, t in enumerate(far):
                line = dict(op="sparse", vm="gpu", queue="evict", va=h(tex + t * tile), size="64KiB")
                if i == len(far) - 1:
                    line["signal"] = f"e{fence}"
                w.add(**line)
                free_slots.append(resident.pop(t))
            waits = [f"e{fence}"]
        else:
            waits = []
        for t in want:
            if t in resident:
                continue
            s = free_slots.pop()
            line = dict(op="bind", vm="gpu", queue="transfer", va=h(tex + t * tile), size="64KiB", memory="pool", offset=h(s * tile), access="ro")
            if waits:
                line["waits"] = waits
                waits = []
            w.add(**line)
            resident[t] = s
        t = want[len(want) // 2]
        w.add(op="check", vm="gpu", va=h(tex + t * tile), size="64KiB", memory="pool", offset=h(resident[t] * tile))
    w.write("sparse_texture.jsonl")


def kv_cache():
    """vLLM's paged KV cache: a pool of 64 KiB blocks; each running sequence has a VA window into
    which its blocks are bound as it grows; a finished sequence's window is unbound at once and
    its blocks go back to the pool. Four scheduler streams, one per group of sequence slots."""
    w = W("KV-cache page churn (vLLM)", 512 * MIB)
    block, pool_blocks = 64 * KIB, 4096
    slots, window = 64, 256 * block  # 64 sequence slots of up to 256 blocks (16 MiB) each
    base = 0x4000000000
    w.comment("A 256 MiB KV pool of 4096 64 KiB blocks; 64 sequence slots of 16 MiB VA each.")
    w.add(op="vm", name="gpu", va_size="1TiB")
    w.add(op="memory", name="kv", vm="gpu", size=f"{pool_blocks * block // MIB}MiB", seed=7)
    rng = random.Random(3)
    free = list(range(pool_blocks))
    rng.shuffle(free)
    seqs = {}  # slot -> list of blocks
    target = {}
    ops = 0
    checked = 0
    while ops < 24000:
        # Start sequences in empty slots.
        for s in range(slots):
            if s not in seqs and rng.random() < 0.3:
                seqs[s] = []
                target[s] = rng.randrange(8, 256)
        # One decode step: every running sequence grows by a block (prefill: several).
        for s in sorted(seqs):
            q = f"s{s % 4}"
            grow = 1 if seqs[s] else min(target[s], rng.randrange(1, 32))
            for _ in range(grow):
                if not free or len(seqs[s]) >= target[s]:
                    break
                b = free.pop()
                va = base + s * window + len(seqs[s]) * block
                w.add(op="bind", vm="gpu", queue=q, va=h(va), size="64KiB", memory="kv", offset=h(b * block))
                seqs[s].append(b)
                ops += 1
            if len(seqs[s]) >= target[s] or (not free and rng.random() < 0.5):
                # Finished (or preempted): unbind the window at once, blocks back to the pool.
                if checked < 12 and seqs[s]:
                    w.add(op="check", vm="gpu", va=h(base + s * window), size="64KiB", memory="kv", offset=h(seqs[s][0] * block))
                    checked += 1
                w.add(op="unbind", vm="gpu", queue=q, va=h(base + s * window), size=h(len(seqs[s]) * block))
                ops += 1
                free.extend(seqs.pop(s))
                rng.shuffle(free)
    w.write("kv_cache_churn.jsonl")


def munmap_storm():
    """Xe's munmap scenario at scale: 512 MiB bound with 2 MiB leaves, then a storm of 4 KiB
    unbinds at random pages (each splits a huge leaf), then the rest unbound in 1 MiB pieces."""
    w = W("munmap storm", 768 * MIB)
    va, size = 0x8000000000, 512 * MIB
    w.comment("512 MiB of contiguous 2 MiB blocks, bound at once: 256 huge leaves.")
    w.add(op="vm", name="gpu", va_size="1TiB")
    w.add(op="memory", name="heap", vm="gpu", size="512MiB", placement="contiguous", seed=9)
    w.add(op="bind", vm="gpu", va=h(va), size="512MiB", memory="heap")
    w.add(op="check", vm="gpu", va=h(va), size="2MiB", memory="heap")
    rng = random.Random(4)
    pages = rng.sample(range(size // (4 * KIB)), 3000)
    w.comment("3000 single-page unbinds, one per line, on two queues (each splits or trims a leaf).")
    for i, p in enumerate(pages):
        w.add(op="unbind", vm="gpu", queue=f"q{i % 2}", va=h(va + p * 4 * KIB), size="4KiB")
    w.add(op="wait")
    keep = min(set(range(size // (4 * KIB))) - set(pages))
    w.add(op="check", vm="gpu", va=h(va + keep * 4 * KIB), size="4KiB", memory="heap", offset=h(keep * 4 * KIB))
    w.comment("The rest, unbound in 1 MiB pieces.")
    for off in range(0, size, MIB):
        w.add(op="unbind", vm="gpu", va=h(va + off), size="1MiB")
    w.add(op="free", vm="gpu", memory="heap")
    w.write("munmap_storm.jsonl")


if __name__ == "__main__":
    allocator()
    sparse_texture()
    kv_cache()
    munmap_storm()
