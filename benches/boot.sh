#!/usr/bin/env bash
# Boot benchmark (issue 8): userspace time from PID 1 start to the exec of the
# Kubernetes stand-in, Basalt's init vs a busybox shell-script /init doing the
# same steps on the same kernel, root and disk, N boots each, medians, ratio.
#
#   BASALT_ASSETS=/work/main/.cache/assets N=5 benches/boot.sh <image.img>
#
# Basalt: from the ready line, timings_ms.kubernetes_exec - timings_ms.stage1_start
# (CLOCK_BOOTTIME ms). Baseline: the script prints /proc/uptime at its first
# line and right before it exec's switch_root into the stand-in.
# The baseline does NOT set up dm-verity (busybox has no device-mapper tool):
# it mounts root-a's squashfs directly, which flatters it.
source "$(dirname "$0")/common.sh"
IMG=${1:?usage: boot.sh <image.img>}

base="$OUT/baseline.img"
busybox_image "$IMG" "$base" "/usr/bin/k3s server --data-dir /var/lib/rancher/k3s"

b=(); s=()
for i in $(seq 1 "$N"); do
  cp --sparse=always "$IMG" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/basalt-$i.log" "basalt: ready" || { echo "basalt boot $i failed (log $OUT/basalt-$i.log)"; exit 1; }
  v=$(grep -a "basalt: ready" "$OUT/basalt-$i.log" | sed 's/.*basalt: ready //' | python3 -c 'import json,sys; t=json.load(sys.stdin)["timings_ms"]; print(t["kubernetes_exec"]-t["stage1_start"])')
  b+=("$v"); echo "basalt  boot $i: PID1 start -> kubernetes exec $v ms"
  cp --sparse=always "$base" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/busybox-$i.log" "bench: exec" || { echo "busybox boot $i failed (log $OUT/busybox-$i.log)"; exit 1; }
  st=$(grep -a "bench: start" "$OUT/busybox-$i.log" | awk '{print $3}'); ex=$(grep -a "bench: exec" "$OUT/busybox-$i.log" | awk '{print $3}')
  v=$(python3 -c "print(round(($ex-$st)*1000))")
  s+=("$v"); echo "busybox boot $i: /init start -> exec $v ms"
done
mb=$(printf '%s\n' "${b[@]}" | median); ms=$(printf '%s\n' "${s[@]}" | median)
echo "median basalt  ${mb} ms (N=$N)"
echo "median busybox ${ms} ms (N=$N)"
python3 -c "print('ratio basalt/busybox = %.2f' % ($mb/$ms))"
