#!/usr/bin/env bash
# Boot benchmark (issue 8): userspace time from PID 1's start to the exec of
# the Kubernetes stand-in, Basalt's init against a busybox shell-script init
# doing the same steps on the same kernel, root and disk. N boots of each,
# medians, ratios from this one run.
#
#   BASALT_ASSETS=$PWD/.cache/assets N=5 [SMP=2] benches/boot.sh <image.img>
#
# SMP: the VM's CPUs (default 1, as the tests boot). With more, Basalt's stage
# 1 and the floor load independent modules side by side (module_deps); the
# busybox script loads them one after another, as such a script does.
# <image.img>: the x86_64 test image (`basalt build tests/images/x86_64.toml`).
#
# Variants, each booted N times from a fresh copy:
#   basalt         the image as built: dm-verity root.
#   basalt-noverity the same with `basalt.verity*` removed from the loader entry:
#                  stage 1 mounts root-a directly (and says so on the console).
#   busybox        /init is a busybox script doing stage 1's steps (mount /proc,
#                  /sys, /dev; insmod the same modules in the same order; wait for
#                  the partitions by GPT name; mount root-a's squashfs (no
#                  dm-verity: busybox has no device-mapper tool), /var, a tmpfs
#                  /etc seeded from the image's, /boot, /run; switch_root), then
#                  /run/stage2.sh doing stage 2's steps (cgroup2 with the
#                  controllers enabled, devpts, /dev/shm, /tmp, machine-id,
#                  hostname, lo up) and exec'ing the stand-in as Basalt does.
#   floor          /init is benches/floor-init: the least an init can do on this
#                  path (the same kernel calls in the same order, nothing else: no
#                  settings parsed, no verity, no node config, no update
#                  bookkeeping, no re-exec, no fsync). Its time is the kernel's
#                  share: the floor under any init making these steps.
# Measured: Basalt from its ready line, timings_ms.kubernetes_exec -
# timings_ms.stage1_start; busybox from /proc/uptime printed by /init's first
# line ("bench: start") and by stage2.sh right before it exec's the stand-in
# ("bench: k8s-exec"; "bench: exec" is /init's switch_root). Both CLOCK_BOOTTIME,
# same resolution (/proc/uptime: 10 ms).
# Also printed: Basalt's own split of that time (init_cpu_ms: user = init's own
# code, system = the kernel calls it makes; the rest waiting).
source "$(dirname "$0")/common.sh"
IMG=${1:?usage: boot.sh <image.img>}

esp_off=$(off "$IMG" esp)
noverity="$OUT/noverity.img"
cp --sparse=always "$IMG" "$noverity"
entry=$(mktemp "$OUT/entry.XXXX")
mcopy -o -i "$noverity@@$esp_off" ::loader/entries/basalt-a.conf "$entry"
sed -i -E 's/ basalt\.verity(_data_blocks)?=[^ ]*//g' "$entry"
grep -q 'basalt.verity' "$entry" && { echo "could not strip verity from the loader entry" >&2; exit 1; }
mcopy -o -i "$noverity@@$esp_off" "$entry" ::loader/entries/basalt-a.conf
rm -f "$entry"

stage2=$(mktemp "$OUT/stage2.XXXX")
cat > "$stage2" <<'SCRIPT'
#!/run/busybox sh
# Stage 2's steps, as Basalt's stage 2 does them (init/src/stage2.rs).
B=/run/busybox
$B mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
ctl=$($B cat /sys/fs/cgroup/cgroup.controllers)
for c in $ctl; do echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; done
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts /dev/pts
$B mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$B mount -t tmpfs -o mode=1777 tmpfs /tmp
$B mkdir -p /var/lib/basalt
[ -s /var/lib/basalt/machine-id ] || $B cat /proc/sys/kernel/random/uuid | $B tr -d '-' > /var/lib/basalt/machine-id
$B cp /var/lib/basalt/machine-id /etc/machine-id
$B hostname basalt
$B ip link set lo up
read up _ < /proc/uptime; echo "bench: k8s-exec $up"
exec /usr/bin/k3s server --data-dir /var/lib/rancher/k3s
SCRIPT
(cd "$ROOT" && cargo build --release -q -p floor-init --target x86_64-unknown-linux-musl)
floor="$OUT/floor.img"
floor_image "$IMG" "$floor" "$ROOT/target/x86_64-unknown-linux-musl/release/floor-init" \
  "/usr/bin/k3s server --data-dir /var/lib/rancher/k3s"
base="$OUT/baseline.img"
BENCH_STAGE2=$stage2 busybox_image "$IMG" "$base" "/run/busybox sh /run/stage2.sh"
rm -f "$stage2"

declare -a bv bu bs nv nu ns sv fv
for i in $(seq 1 "$N"); do
  cp --sparse=always "$IMG" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/basalt-$i.log" "basalt: ready" || { echo "basalt boot $i failed (log $OUT/basalt-$i.log)"; exit 1; }
  read -r w u s < <(basalt_ms "$OUT/basalt-$i.log"); bv+=("$w"); bu+=("$u"); bs+=("$s")
  echo "basalt           boot $i: PID 1 start -> kubernetes exec $w ms (init user CPU $u ms, system $s ms)"

  cp --sparse=always "$noverity" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/noverity-$i.log" "basalt: ready" || { echo "basalt (no verity) boot $i failed (log $OUT/noverity-$i.log)"; exit 1; }
  read -r w u s < <(basalt_ms "$OUT/noverity-$i.log"); nv+=("$w"); nu+=("$u"); ns+=("$s")
  echo "basalt-noverity  boot $i: PID 1 start -> kubernetes exec $w ms (init user CPU $u ms, system $s ms)"

  cp --sparse=always "$base" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/busybox-$i.log" "bench: k8s-exec" || { echo "busybox boot $i failed (log $OUT/busybox-$i.log)"; exit 1; }
  st=$(grep -a "bench: start" "$OUT/busybox-$i.log" | awk '{print $3}'); ex=$(grep -a "bench: k8s-exec" "$OUT/busybox-$i.log" | awk '{print $3}')
  v=$(python3 -c "print(round(($ex-$st)*1000))"); sv+=("$v")
  echo "busybox          boot $i: /init start -> kubernetes exec $v ms"

  cp --sparse=always "$floor" "$OUT/run.img"
  boot_until "$OUT/run.img" "$OUT/floor-$i.log" "floor: k8s-exec" || { echo "floor boot $i failed (log $OUT/floor-$i.log)"; exit 1; }
  st=$(grep -a "floor: start" "$OUT/floor-$i.log" | tr -d '\r' | awk '{print $3}')
  ex=$(grep -a "floor: k8s-exec" "$OUT/floor-$i.log" | tr -d '\r' | awk '{print $3}')
  grep -a "^floor: " "$OUT/floor-$i.log" | grep -v "start\|k8s-exec" && { echo "floor boot $i reported errors (log $OUT/floor-$i.log)"; exit 1; }
  v=$((ex - st)); fv+=("$v")
  echo "floor            boot $i: /init start -> kubernetes exec $v ms"
done
med() { printf '%s\n' "$@" | median; }
mb=$(med "${bv[@]}"); mn=$(med "${nv[@]}"); ms=$(med "${sv[@]}")
echo "median basalt          ${mb} ms (init user CPU $(med "${bu[@]}") ms, system $(med "${bs[@]}") ms; N=$N)"
echo "median basalt-noverity ${mn} ms (init user CPU $(med "${nu[@]}") ms, system $(med "${ns[@]}") ms; N=$N)"
echo "median busybox         ${ms} ms (N=$N)"
mf=$(med "${fv[@]}")
echo "median floor           ${mf} ms (N=$N)"
python3 -c "print('ratio basalt-noverity/busybox = %.2f  (same steps; target <= 0.5)' % ($mn/$ms))"
python3 -c "print('ratio basalt/busybox          = %.2f  (basalt also sets up dm-verity)' % ($mb/$ms))"
python3 -c "print('ratio floor/busybox           = %.2f  (the kernel\'s share: no init making these calls does better)' % ($mf/$ms))"
python3 -c "print('basalt-noverity - floor       = %d ms (everything Basalt does beyond the kernel calls the path needs)' % ($mn-$mf))"
echo "init's own overhead (user CPU, tick-sampled: ~4 ms resolution) median: $(med "${bu[@]}") ms (target <= 10 ms)"
