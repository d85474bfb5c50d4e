#!/usr/bin/env python3
"""benches/translated.sh's reading of a QEMU `-d in_asm` log: the guest code
translated for PID 1 (text at 0x20000000) and for its node-config child (at
0x30000000) before the stand-in's first block (below 0x20000000), by crate
and by function (addr2line on the block addresses).

    translated.py <in_asm log> <init binary with symbols> <stand-in binary> [<top N>]
    translated.py --text <binary>    (its executable segment, for -dfilter)

Counting starts at init's entry point (the firmware and the boot loader run
at low addresses before it) and ends at the stand-in's first block.
Last line: "<PID 1 KiB> <child KiB>"."""
import collections
import re
import struct
import subprocess
import sys


def elf(path):
    """(entry point, [(start, end) of executable PT_LOAD segments]) of an ELF64."""
    with open(path, "rb") as f:
        h = f.read(64)
        if h[:5] != b"\x7fELF\x02":
            sys.exit(f"{path}: not a 64-bit ELF file")
        entry, phoff = struct.unpack_from("<QQ", h, 0x18)
        phentsize, phnum = struct.unpack_from("<HH", h, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    text = []
    for i in range(phnum):
        p_type, p_flags, _, vaddr, _, _, memsz = struct.unpack_from("<IIQQQQQ", ph, i * phentsize)
        if p_type == 1 and p_flags & 1:
            text.append((vaddr, vaddr + memsz))
    return entry, text


if sys.argv[1] == "--text":
    _, text = elf(sys.argv[2])
    print(",".join(f"{a:#x}..{b:#x}" for a, b in text))
    sys.exit(0)
log, binary, standin = sys.argv[1], sys.argv[2], sys.argv[3]
top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
entry, _ = elf(binary)
_, standin_text = elf(standin)
blocks = []  # [start address, bytes of guest code]
for line in open(log, errors="replace"):
    if line.startswith("IN:"):
        blocks.append([None, 0])
        continue
    m = re.match(r"0x([0-9a-f]+):\s+((?:[0-9a-f]{2} )+)", line)
    if m and blocks:
        b = blocks[-1]
        if b[0] is None:
            b[0] = int(m.group(1), 16)
        b[1] += len(m.group(2).split())
blocks = [b for b in blocks if b[0] is not None]
start = next((i for i, b in enumerate(blocks) if b[0] == entry), None)
if start is None:
    sys.exit(f"{log}: init's entry point {entry:#x} never ran")
cut = next((i for i, b in enumerate(blocks) if i > start and
            any(a <= b[0] < e for a, e in standin_text)), None)
if cut is None:
    sys.exit(f"{log}: no block of the stand-in: the boot never reached the Kubernetes exec")
pid1 = [b for b in blocks[start:cut] if 0x20000000 <= b[0] < 0x30000000]
child = [b for b in blocks[start:cut] if 0x30000000 <= b[0] < 0x40000000]
if not pid1:
    sys.exit(f"{log}: no blocks of PID 1 between init's start and the exec")
# No child blocks: the child is forked (since 2026-11-29), running PID 1's
# code at PID 1's addresses; what it translates anew is counted with PID 1.
# The child's copy is the same code 0x10000000 higher.
addrs = sorted({b[0] for b in pid1} | {b[0] - 0x10000000 for b in child})
out = subprocess.run(["addr2line", "-f", "-C", "-e", binary] + [hex(a) for a in addrs],
                     capture_output=True, text=True, check=True).stdout.split("\n")
fn = {a: out[2 * i] for i, a in enumerate(addrs)}
GROUPS = ["basalt_init::stage1", "basalt_init::stage2", "basalt_init::tomlfast",
          "basalt_init::apply", "basalt_init::nodeconfig", "basalt_init::service",
          "basalt_init::supervisor", "basalt_init::modules", "basalt_init::", "init::",
          "toml", "serde", "core::fmt", "core::", "alloc::", "std::", "nix::"]


def group(f):
    return next((g for g in GROUPS if g in f), "libc (musl) and other")


def report(name, bs, offset):
    kib = sum(b[1] for b in bs) / 1024
    print(f"{name}: {len(bs)} blocks, {kib:.1f} KiB of guest code translated")
    by_group, by_fn = collections.Counter(), collections.Counter()
    for b in bs:
        f = fn[b[0] - offset]
        by_group[group(f)] += b[1]
        by_fn[f] += b[1]
    for g, n in by_group.most_common():
        print(f"  {n / 1024:6.1f} KiB  {g}")
    print(f"  top functions (bytes):")
    for f, n in by_fn.most_common(top):
        print(f"  {n:7d}  {f[:120]}")
    return kib


a = report("PID 1 until the Kubernetes exec", pid1, 0)
if child:
    b = report("node-config child (before the Kubernetes exec)", child, 0x10000000)
else:
    b = 0.0
    print("node-config child: forked from PID 1, no code of its own address range: "
          "what it translated is in PID 1's figure")
print(f"together: {a + b:.1f} KiB")
print(f"{a:.1f} {b:.1f}")
