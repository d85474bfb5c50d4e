#!/usr/bin/env bash
# Memory benchmark (issue 8): VmRSS and PSS of PID 1 with the Kubernetes
# stand-in supervised, after boot and after 1 000 service restarts, for
# Basalt's init and for tini-static and catatonit as PID 1 (Debian packages,
# `apt-get download tini catatonit`, unpacked into $OUT/pkgs) on the same
# kernel and root (busybox stage 1 script, then `switch_root` into them).
#
#   BASALT_ASSETS=/work/main/.cache/assets N=5 benches/memory.sh <image.img> <restarts.img>
#
# <restarts.img>: the test image built from benches/images/restarts.toml, whose
# service `flap` exits at once with a 1 ms backoff and `mem-probe` prints
# `mem: <restarts> VmRSS=<kB> Rss=<kB> Pss=<kB>` (Rss and Pss from smaps_rollup: VmRSS
# in /proc/1/status lags for small processes, the kernel batches its counters) for PID 1 at 0 and after 1 000 restarts.
source "$(dirname "$0")/common.sh"
IMG=${1:?usage: memory.sh <image.img> <restarts.img>}
RIMG=${2:?usage: memory.sh <image.img> <restarts.img>}

rss_of_pid1_script='for i in 1 2 3 4 5 6 7 8 9 10; do sleep 1; done; r=$(cat /proc/1/smaps_rollup); echo "mem: pid1 Rss=$(echo "$r" | grep ^Rss: | tr -dc 0-9) Pss=$(echo "$r" | grep ^Pss: | tr -dc 0-9)"; sleep 1000'

# tini-static and catatonit from Debian.
mkdir -p "$OUT/pkgs" && cd "$OUT/pkgs"
for p in tini catatonit; do
  ls ${p}_*.deb >/dev/null 2>&1 || apt-get download "$p" >/dev/null
  dpkg-deb -x ${p}_*.deb "$OUT/pkgs/root"
done
cd - >/dev/null


declare -A rss
for variant in ${VARIANTS:-basalt tini catatonit}; do
  vals=()
  for i in $(seq 1 "$N"); do
    log="$OUT/mem-$variant-$i.log"
    case $variant in
      basalt)
        cp --sparse=always "$RIMG" "$OUT/run.img"
        boot_until "$OUT/run.img" "$log" "mem: 1000 " 600 || { echo "no mem line ($log)"; exit 1; }
        a=$(grep -a "mem: 0 " "$log" | sed 's/.*Rss=\([0-9]*\).*Pss=\([0-9]*\).*/\1 \2/')
        b=$(grep -a "mem: 1000 " "$log" | sed 's/.*Rss=\([0-9]*\).*Pss=\([0-9]*\).*/\1 \2/')
        echo "basalt    boot $i: PID 1 after boot RSS/PSS $a kB, after 1000 restarts $b kB"
        vals+=("${a%% *}")
        ;;
      *)
        bin=$([ $variant = tini ] && echo /usr/bin/tini-static || echo /usr/bin/catatonit)
        # The binary rides in the initramfs and is copied into /run (tmpfs) before switch_root.
        BENCH_EXTRA="$OUT/pkgs/root$bin" busybox_image "$IMG" "$OUT/base-$variant.img" \
          "/run/pid1 -- /bin/sh -c '/usr/bin/k3s server --data-dir /var/lib/rancher/k3s & $rss_of_pid1_script'"
        cp --sparse=always "$OUT/base-$variant.img" "$OUT/run.img"
        boot_until "$OUT/run.img" "$log" "mem: pid1" 400 || { echo "no mem line ($log)"; exit 1; }
        a=$(grep -a "mem: pid1" "$log" | sed 's/.*Rss=\([0-9]*\).*Pss=\([0-9]*\).*/\1 \2/')
        echo "$variant boot $i: PID 1 RSS/PSS $a kB"
        vals+=("${a%% *}")
        ;;
    esac
  done
  rss[$variant]=$(printf '%s\n' "${vals[@]}" | median)
  echo "median $variant RSS ${rss[$variant]} kB (N=$N)"
done
[ -n "${rss[tini]:-}" ] && python3 -c "print('ratio basalt/tini = %.2f, basalt/catatonit = %.2f' % (${rss[basalt]}/${rss[tini]}, ${rss[basalt]}/${rss[catatonit]}))"
