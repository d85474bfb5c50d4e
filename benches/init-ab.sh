#!/usr/bin/env bash
# A/B of two revisions of init on the boot path (issue 8): the x86_64 test
# image built with each revision's init and nothing else different (same
# builder, stand-in, assets, image definition), booted alternately N times
# from fresh copies (first boots, one CPU unless SMP=<n>); medians of PID 1
# start -> Kubernetes exec and of init's user and system CPU (the ready
# report), and the ratios <rev>/<base rev>; the same for stage 1 and for
# what follows it until the exec (stage 1's module loading spreads the most
# between boots, and a change after it shows better without it).
#
#   BASALT_ASSETS=$PWD/.cache/assets N=8 benches/init-ab.sh <base rev> [<rev>, default HEAD]
source "$(dirname "$0")/common.sh"
A="$OUT/init-ab"
mkdir -p "$A"
TARGET=x86_64-unknown-linux-musl
revs=("${1:?usage: init-ab.sh <base rev> [<rev>]}" "${2:-HEAD}")

(cd "$ROOT" && cargo build -q -p basalt-imagebuild && cargo build -q --release -p k8s-standin --target $TARGET)
declare -a img
for r in "${revs[@]}"; do
  sha=$(git -C "$ROOT" rev-parse --short "$r")
  wt="$A/wt-$sha"
  rm -rf "$wt"; git -C "$ROOT" worktree prune
  git -C "$ROOT" worktree add -q --detach "$wt" "$sha"
  (cd "$wt" && cargo build -q --release -p basalt-init --target $TARGET --target-dir "$A/target")
  cp "$A/target/$TARGET/release/init" "$A/init-$sha"
  git -C "$ROOT" worktree remove --force "$wt"
  BASALT_INIT="$A/init-$sha" BASALT_STANDIN="$ROOT/target/$TARGET/release/k8s-standin" \
    BASALT_ASSETS="$ASSETS" SOURCE_DATE_EPOCH=1764288000 \
    "$ROOT/target/debug/basalt" build "$ROOT/tests/images/x86_64.toml" --out "$A/out-$sha" > "$A/build-$sha.log" 2>&1 ||
    { tail "$A/build-$sha.log"; exit 1; }
  img+=("$(ls "$A/out-$sha"/*.img)")
done

declare -a w0 u0 s0 p0 q0 w1 u1 s1 p1 q1
for i in $(seq 1 "$N"); do
  for k in 0 1; do
    cp --sparse=always "${img[$k]}" "$OUT/run.img"
    log="$A/boot-$k-$i.log"
    boot_until "$OUT/run.img" "$log" "basalt: ready" || { echo "boot $i of ${revs[$k]} failed (log $log)"; exit 1; }
    read -r w u s < <(basalt_ms "$log")
    read -r p q < <(phases_ms "$log")
    eval "w$k+=($w); u$k+=($u); s$k+=($s); p$k+=($p); q$k+=($q)"
    echo "${revs[$k]} boot $i: PID 1 start -> kubernetes exec $w ms (stage 1 $p, then $q; init user CPU $u ms, system $s ms)"
  done
done
med() { printf '%s\n' "$@" | median; }
for k in 0 1; do
  eval 'echo "median ${revs[$k]}: $(med "${w'$k'[@]}") ms (stage 1 $(med "${p'$k'[@]}"), then $(med "${q'$k'[@]}") ms; init user CPU $(med "${u'$k'[@]}") ms, system $(med "${s'$k'[@]}") ms; N=$N)"'
done
python3 -c "print('ratio ${revs[1]}/${revs[0]}: PID 1 start -> kubernetes exec %.2f (stage 1 %.2f, after it %.2f), init user CPU %.2f' % ($(med "${w1[@]}")/$(med "${w0[@]}"), $(med "${p1[@]}")/$(med "${p0[@]}"), $(med "${q1[@]}")/$(med "${q0[@]}"), $(med "${u1[@]}")/$(med "${u0[@]}")))"
