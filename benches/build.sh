#!/usr/bin/env bash
# Build benchmark (issue 8): `basalt build` from a warm cache vs a shell
# pipeline doing the same job with mksquashfs, veritysetup, mkfs.vfat + mcopy,
# mke2fs and sfdisk on the same inputs (the root tree and ESP files taken from
# a first basalt build), N runs each, medians, ratio.
#
#   BASALT_ASSETS=/work/main/.cache/assets BASALT_INIT=... BASALT_STANDIN=... \
#     N=5 benches/build.sh [definition.toml]
source "$(dirname "$0")/common.sh"
DEF=${1:-$ROOT/tests/images/x86_64.toml}
BASALT=${BASALT:-$ROOT/target/release/basalt}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1764288000}
cd "$ROOT"

# Warm-up build; its output gives the shell pipeline its inputs.
"$BASALT" build "$DEF" --out "$OUT/warm" >/dev/null
img=$(ls "$OUT"/warm/*.img | head -1)
in="$OUT/inputs"; rm -rf "$in"; mkdir -p "$in/esp"
unsquashfs -q -o "$(off "$img" root-a)" -d "$in/root" "$img" >/dev/null
mcopy -s -i "$img@@$(off "$img" esp)" ::EFI ::loader ::a "$in/esp/"

b=(); s=()
for i in $(seq 1 "$N"); do
  t0=$(now_ms)
  "$BASALT" build "$DEF" --out "$OUT/b$i" >/dev/null
  t1=$(now_ms); b+=($((t1 - t0)))

  w="$OUT/sh$i"; rm -rf "$w"; mkdir -p "$w"
  t0=$(now_ms)
  mksquashfs "$in/root" "$w/root.sqfs" -comp zstd -noappend -quiet -all-root >/dev/null
  sz=$(stat -c %s "$w/root.sqfs"); hoff=$(( (sz + 4095) / 4096 * 4096 ))
  veritysetup format "$w/root.sqfs" "$w/root.sqfs" --hash-offset=$hoff --data-blocks=$((hoff / 4096)) >"$w/verity.txt"
  mkfs.vfat -C -F 32 -n BASALT "$w/esp.img" $((128 * 1024)) >/dev/null
  mcopy -s -i "$w/esp.img" "$in/esp/EFI" "$in/esp/loader" "$in/esp/a" ::
  mke2fs -q -t ext4 -b 4096 -N 8192 -J size=16 -L basalt-data "$w/data.img" 64M
  truncate -s $(( (1 + 128 + 512 + 512 + 64 + 1) * 1024 * 1024 )) "$w/disk.img"
  printf 'label: gpt\nsize=128MiB, type=U, name="esp"\nsize=512MiB, name="root-a"\nsize=512MiB, name="root-b"\nsize=64MiB, name="data"\n' | sfdisk -q "$w/disk.img"
  dd if="$w/esp.img" of="$w/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
  dd if="$w/root.sqfs" of="$w/disk.img" bs=1M seek=129 conv=notrunc,sparse status=none
  dd if="$w/data.img" of="$w/disk.img" bs=1M seek=$((129 + 1024)) conv=notrunc,sparse status=none
  t1=$(now_ms); s+=($((t1 - t0)))
  echo "run $i: basalt build $((b[-1])) ms, shell pipeline $((s[-1])) ms"
done
mb=$(printf '%s\n' "${b[@]}" | median); ms=$(printf '%s\n' "${s[@]}" | median)
echo "median basalt build ${mb} ms, shell pipeline ${ms} ms (N=$N)"
python3 -c "print('ratio basalt/shell = %.2f' % ($mb/$ms))"
