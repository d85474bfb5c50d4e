#!/usr/bin/env bash
# Code translated on the path to Kubernetes (issue 8: init's own overhead).
#
# Under QEMU TCG, PID 1's own (user) CPU time on the boot path is mostly QEMU
# translating code the first time it runs (docs/performance.md), and the
# tick-sampled user CPU in the boot report is coarse (~4 ms) and noisy. This
# counts the thing itself, deterministically: the guest code QEMU translated
# (`-d in_asm`, filtered to init's text) from PID 1's start to the exec of
# the Kubernetes stand-in, for PID 1 and for its node-config child apart,
# with the functions it belongs to.
#
#   BASALT_ASSETS=$PWD/.cache/assets benches/translated.sh [<base rev>] [<rev>]
#
# One revision (default HEAD): its figures. Two: both, and the ratio
# <rev>/<base rev> in the same invocation. Each revision is checked out into a
# worktree under $OUT and built twice as a non-PIE static binary with
# symbols, at fixed addresses: PID 1 at 0x20000000 and a copy for the
# node-config child at 0x30000000 (measurement only: a patch in the
# worktree makes PID 1 exec that copy, /usr/lib/basalt/init-child, instead
# of /proc/self/exe, so that the child's code is told apart and translated
# separately, as it is when both are position-independent; revisions that
# fork the child instead need no patch and have no copy to count apart). The stand-in is
# linked at 0x400000: its first translated block marks the Kubernetes exec;
# counting starts at init's entry point (the firmware runs before, at low
# addresses).
source "$(dirname "$0")/common.sh"
T="$OUT/translated"
mkdir -p "$T"
revs=("$@")
[ ${#revs[@]} -eq 0 ] && revs=(HEAD)
TARGET=x86_64-unknown-linux-musl

(cd "$ROOT" && cargo build -q -p basalt-imagebuild)
(cd "$ROOT" && RUSTFLAGS="-C relocation-model=static" \
  cargo build -q --release -p k8s-standin --target $TARGET --target-dir "$T/target-standin")
STANDIN="$T/target-standin/$TARGET/release/k8s-standin"

measure() { # <rev> -> prints "<pid1 KiB> <child KiB>" last
  local rev=$1 sha wt
  sha=$(git -C "$ROOT" rev-parse --short "$rev")
  wt="$T/wt-$sha"
  rm -rf "$wt"; git -C "$ROOT" worktree prune
  git -C "$ROOT" worktree add -q --detach "$wt" "$sha"
  python3 - "$wt/init/src/apply/pid1.rs" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
old = "    let mut cmd = Command::new(program);"
new = ("    let measure = Path::new(\"/usr/lib/basalt/init-child\");\n"
       "    let program = if measure.exists() { measure } else { program };\n" + old)
if "sys::fork_run" in s:
    pass  # forked child (no exec): nothing to patch, its code is PID 1's
elif new not in s:
    if old not in s:
        sys.exit(f"{p}: the child's Command::new(program) line moved: update benches/translated.sh")
    open(p, "w").write(s.replace(old, new, 1))
PY
  for at in 20000000 30000000; do
    (cd "$wt" && RUSTFLAGS="-C relocation-model=static -C link-arg=-Wl,-Ttext-segment=0x$at" \
      CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
      cargo build -q --release -p basalt-init --target $TARGET --target-dir "$T/target-$at")
  done
  local ov="$T/ov-$sha" def="$wt/tests/images/translated.toml" log="$T/console-$sha.log"
  rm -rf "$ov" && mkdir -p "$ov/usr/lib/basalt"
  cp "$T/target-30000000/$TARGET/release/init" "$ov/usr/lib/basalt/init-child"
  cp "$T/target-20000000/$TARGET/release/init" "$T/init-$sha"
  { cat "$wt/tests/images/x86_64.toml"; printf '\n[[overlays]]\nsource = "%s"\n' "$ov"; } > "$def"
  BASALT_INIT="$T/init-$sha" BASALT_STANDIN="$STANDIN" BASALT_ASSETS="$ASSETS" SOURCE_DATE_EPOCH=1764288000 \
    "$ROOT/target/debug/basalt" build "$def" --out "$T/out-$sha" > "$T/build-$sha.log" 2>&1 ||
    { tail "$T/build-$sha.log"; exit 1; }
  cp --sparse=always "$T/out-$sha"/*.img "$T/run.img"
  BENCH_QEMU_ARGS=(-d in_asm -D "$T/inasm-$sha.log" -dfilter
    "$(python3 "$ROOT/benches/translated.py" --text "$STANDIN"),0x20000000..0x21000000,0x30000000..0x31000000")
  boot_until "$T/run.img" "$log" "basalt: ready" 600 || { echo "no ready line ($log)"; exit 1; }
  BENCH_QEMU_ARGS=()
  git -C "$ROOT" worktree remove --force "$wt"
  echo "== $rev ($sha)"
  python3 "$ROOT/benches/translated.py" "$T/inasm-$sha.log" "$T/init-$sha" "$STANDIN" "${TOP:-25}"
}

declare -a res
for r in "${revs[@]}"; do
  out=$(measure "$r")
  echo "$out"
  res+=("$(echo "$out" | tail -1)")
done
if [ ${#revs[@]} -eq 2 ]; then
  read -r b1 b2 <<< "${res[0]}"; read -r n1 n2 <<< "${res[1]}"
  python3 -c "print('ratio %s/%s: PID 1 and its node-config child together %.2f (%.1f -> %.1f KiB); PID 1 %s -> %s KiB, child %s -> %s KiB (0: forked, counted in PID 1)' % ('${revs[1]}', '${revs[0]}', ($n1+$n2)/($b1+$b2), $b1+$b2, $n1+$n2, $b1, $n1, $b2, $n2))"
fi
