# Shared helpers for the benchmark scripts (sourced).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ASSETS=${BASALT_ASSETS:-$ROOT/.cache/assets}
N=${N:-5}
OUT=${OUT:-$ROOT/target/bench}
mkdir -p "$OUT"

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
now_ms() { date +%s%3N; }

# Boot a disk image under QEMU (TCG, OVMF, same flags as tests/src/qemu.rs),
# serial console to $2, until a line matching $3 appears (or $4 seconds pass).
# Extra QEMU arguments: the array BENCH_QEMU_ARGS.
boot_until() {
  local img=$1 log=$2 pattern=$3 limit=${4:-400} vars
  vars=$(mktemp "$OUT/vars.XXXX")
  cp "$ASSETS/amd64/ovmf/usr/share/OVMF/OVMF_VARS_4M.fd" "$vars" 2>/dev/null ||
    cp "$(ls "$ASSETS"/amd64/ovmf/usr/share/OVMF/OVMF_VARS*.fd | head -1)" "$vars"
  local code
  code=$(ls "$ASSETS"/amd64/ovmf/usr/share/OVMF/OVMF_CODE_4M.fd 2>/dev/null || ls "$ASSETS"/amd64/ovmf/usr/share/OVMF/OVMF_CODE*.fd | head -1)
  : > "$log"
  qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp "${SMP:-1}" -m 1024 -nodefaults -display none \
    -no-reboot -serial "file:$log" \
    -drive "if=pflash,format=raw,unit=0,readonly=on,file=$code" \
    -drive "if=pflash,format=raw,unit=1,file=$vars" \
    -drive "if=virtio,format=raw,file=$img" ${BENCH_QEMU_ARGS[@]+"${BENCH_QEMU_ARGS[@]}"} &
  local qpid=$! t=0
  while ! grep -aq "$pattern" "$log" && [ $t -lt $((limit * 10)) ]; do sleep 0.1; t=$((t + 1)); done
  sleep 1
  kill "$qpid" 2>/dev/null || true
  wait "$qpid" 2>/dev/null || true
  rm -f "$vars"
  grep -aq "$pattern" "$log"
}

# basalt_ms <console log> -> "<wall> <user> <system>": PID 1 start to the
# Kubernetes exec and init's CPU until then (ms), from the ready report.
basalt_ms() {
  grep -a "basalt: ready" "$1" | sed 's/.*basalt: ready //' | python3 -c '
import json, sys
j = json.load(sys.stdin); t = j["timings_ms"]; c = j.get("init_cpu_ms") or {}
print(t["kubernetes_exec"] - t["stage1_start"], c.get("user", -1), c.get("system", -1))'
}

# phases_ms <console log> -> "<stage 1> <after stage 1>": stage 1's time and
# from its end to the Kubernetes exec (ms), from the ready report. Stage 1
# is mostly module loading (the kernel's); a change to what runs after it
# shows in the second figure without stage 1's spread.
phases_ms() {
  grep -a "basalt: ready" "$1" | sed 's/.*basalt: ready //' | python3 -c '
import json, sys
t = json.load(sys.stdin)["timings_ms"]
print(t["stage1"] - t["stage1_start"], t["kubernetes_exec"] - t["stage1"])'
}

off() { sfdisk -J "$1" | python3 -c "import json,sys; t=json.load(sys.stdin)['partitiontable']; print([p for p in t['partitions'] if p.get('name')==sys.argv[1]][0]['start']*512)" "$2"; }

# initramfs_open <src.img> <dst.img>: copy the image and unpack slot a's
# initramfs into $work/root; sets work, esp, mods (the board's modules, load
# order) and kver.
initramfs_open() {
  cp --sparse=always "$1" "$2"
  esp=$(off "$2" esp)
  work=$(mktemp -d "$OUT/initrd.XXXX")
  mcopy -o -i "$2@@$esp" ::a/initramfs "$work/initramfs.orig"
  mkdir "$work/root"
  (cd "$work/root" && cpio -id --quiet < ../initramfs.orig)
  mods=$(sed -n 's/^modules *= *\[\(.*\)\]/\1/p' "$work/root/etc/basalt/initramfs.toml" | tr -d '",')
  kver=$(sed -n 's/^kernel_version *= *"\(.*\)"/\1/p' "$work/root/etc/basalt/initramfs.toml")
  # efivarfs when a board lists it late (the x86_64 board loads it early):
  # stage 1 needs it to ask the firmware which disk it started
  # (LoaderDevicePartUUID); the baselines do the same.
  efivarfs=$(sed -n 's/^late_modules *= *\[\(.*\)\]/\1/p' "$work/root/etc/basalt/initramfs.toml" |
    tr -d '",' | tr ' ' '\n' | { grep 'efivarfs\.ko' || true; } | head -1)
}

# initramfs_close <dst.img>: pack $work/root back as slot a's initramfs.
initramfs_close() {
  (cd "$work/root" && find . | sort | cpio -o -H newc --quiet > ../initramfs.new)
  mcopy -o -i "$1@@$esp" "$work/initramfs.new" ::a/initramfs
  rm -rf "$work"
}

# busybox_image <src.img> <dst.img> <final command>
# ($BENCH_EXTRA: a file copied to /run/pid1 of the real root; $BENCH_STAGE2: a
# busybox script copied to /run/stage2.sh, with busybox as /run/busybox)
# A copy of <src.img> whose initramfs /init is a busybox shell script doing
# stage 1's steps (no dm-verity: busybox has no device-mapper tool), ending in
# `exec switch_root /newroot <final command>`.
busybox_image() {
  local src=$1 base=$2 final=$3
  initramfs_open "$src" "$base"
  mkdir -p "$work/root/bin"
  cp "$ASSETS/amd64/busybox/bin/busybox" "$work/root/bin/busybox"
  [ -n "${BENCH_EXTRA:-}" ] && cp "$BENCH_EXTRA" "$work/root/pid1"
  [ -n "${BENCH_STAGE2:-}" ] && cp "$BENCH_STAGE2" "$work/root/stage2.sh"
  cat > "$work/root/init" <<SCRIPT
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up _ < /proc/uptime; echo "bench: start \$up"
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev
for m in $mods; do insmod /lib/modules/$kver/\$m 2>/dev/null; done
find_part() { for u in /sys/class/block/*/uevent; do grep -q "^PARTNAME=\$1\$" \$u && { . \$u; echo /dev/\$DEVNAME; return; }; done; }
i=0; while [ -z "\$(find_part root-a)" ] && [ \$i -lt 500 ]; do sleep 0.02; i=\$((i+1)); done
ROOT=\$(find_part root-a); DATA=\$(find_part data); ESP=\$(find_part esp)
EFIVARS=/sys/firmware/efi/efivars
if [ -d \$EFIVARS ]; then
  [ -n "$efivarfs" ] && insmod /lib/modules/$kver/$efivarfs 2>/dev/null
  mount -t efivarfs -o ro efivarfs \$EFIVARS && cat \$EFIVARS/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f > /dev/null
  umount \$EFIVARS
fi
mount -t squashfs -o ro \$ROOT /newroot
mount -t ext4 -o noatime \$DATA /newroot/var
mkdir -p /newetc; mount -t tmpfs tmpfs /newetc; cp -a /newroot/etc/. /newetc/; mount --move /newetc /newroot/etc
mount -t vfat -o umask=0077 \$ESP /newroot/boot
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
[ -e /pid1 ] && cp /pid1 /newroot/run/pid1
[ -e /stage2.sh ] && cp /bin/busybox /newroot/run/busybox && cp /stage2.sh /newroot/run/stage2.sh
mount --move /dev /newroot/dev; mount --move /sys /newroot/sys
read up _ < /proc/uptime; echo "bench: exec \$up"
mount --move /proc /newroot/proc
exec switch_root /newroot $final
SCRIPT
  chmod 755 "$work/root/init"
  initramfs_close "$base"

}

# floor_image <src.img> <dst.img> <floor-init binary> <exec argv>
# A copy of <src.img> whose initramfs /init is benches/floor-init (the least an
# init can do on the boot path), with /floor.conf naming the image's modules
# in load order, what each needs first (`module_deps`) and the command to exec.
floor_image() {
  local src=$1 base=$2 bin=$3 exec_argv=$4
  initramfs_open "$src" "$base"
  { for m in $mods; do echo "module /lib/modules/$kver/$m"; done
    [ -n "$efivarfs" ] && echo "efivarfs /lib/modules/$kver/$efivarfs"
    python3 - "$work/root/etc/basalt/initramfs.toml" "/lib/modules/$kver/" <<'PY'
import sys, tomllib
s = tomllib.load(open(sys.argv[1], "rb"))
for m, deps in s.get("module_deps", {}).items():
    print("after", " ".join(sys.argv[2] + x for x in [m] + deps))
PY
    echo "exec $exec_argv"; } > "$work/root/floor.conf"
  rm -f "$work/root/init"
  cp "$bin" "$work/root/init"
  initramfs_close "$base"
}
