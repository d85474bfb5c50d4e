#!/usr/bin/env bash
# Install benchmark for `basaltctl update` (issue 6): one x86_64 VM (QEMU TCG)
# copies the bundle's bytes raw into the inactive root partition (tar | dd
# conv=fsync: the baseline), then installs the same bundle with
# `basaltctl update --no-reboot -`. Prints both throughputs, their ratio and
# the agent's peak RSS (target <= 32 MiB). Same image, disk and VM for both.
#
#   BASALT_ASSETS=$PWD/.cache/assets benches/update.sh
#
# Needs the musl device binaries (cargo build --release --target
# x86_64-unknown-linux-musl -p basalt-init -p k8s-standin); the test builds the
# image and the bundle itself (tests/tests/update_bench.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASALT_ASSETS:=$PWD/.cache/assets}"
export BASALT_ASSETS
cargo test -q -p basalt-tests --test update_bench -- --ignored --nocapture 2>&1 | grep -E '^bench:|^boot |FAILED|Error' || {
    echo "update bench failed (logs in target/e2e/update_bench/)" >&2
    exit 1
}
