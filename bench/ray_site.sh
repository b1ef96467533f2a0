#!/usr/bin/env bash
# Ray for a GPU machine that cannot reach a package index: one tarball of a Python site directory holding
# Ray (with the extras the project uses) and every package it needs that the machine's image lacks, for
# CPython 3.12 on x86-64 Linux, built the same way byte for byte from the same wheels:
#
#   bash bench/ray_site.sh [OUT]        # default .whl/ray-site.tar.gz (ignored by git, carried to the machine)
#
# Left out to fit a machine call's 64 MiB: Ray's Java jars (no Java workers here) and the dashboard's
# JavaScript source maps. What the image already holds is listed in bench/gpu_image_packages.txt (from the
# machine's package list); its wheels are not packed. Reproducible: files sorted by name, times, owners and
# gzip's own header fixed; the script prints the tarball's SHA-256, the same for the same inputs.
# On the machine: mkdir -p /tmp/site && tar -xzf .whl/ray-site.tar.gz -C /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl/ray-site.tar.gz}
PY=${PY:-python3}
RAY_VERSION=${RAY_VERSION:-$($PY -c "import ray; print(ray.__version__)")}
HAVE=bench/gpu_image_packages.txt
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
norm() { tr 'A-Z_.' 'a-z--'; }
# shellcheck disable=SC2086
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$work/wheels" "ray[default,train,tune,data]==$RAY_VERSION" "omegaconf>=2.3"
norm < "$HAVE" | sort -u > "$work/have"
for w in "$work"/wheels/*.whl; do
    name=$(basename "$w" | cut -d- -f1 | norm)
    if grep -qx "$name" "$work/have"; then rm "$w"; fi
done
# shellcheck disable=SC2086
$PY -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work/site/ray/jars" "$work/site/bin"
# pip records where each wheel came from (a temporary path): drop it, and its line in RECORD
find "$work/site" -name direct_url.json -path '*.dist-info/*' -delete
find "$work/site" -name RECORD -path '*.dist-info/*' -exec sed -i '/direct_url.json/d' {} +
find "$work/site" -name '*.map' -delete
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
mkdir -p "$(dirname "$OUT")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/site" -cf - . | gzip -9n > "$OUT"
echo "packed: $(ls "$work/wheels" | sed 's/-[0-9].*//' | tr '\n' ' ')"
echo "$(sha256sum "$OUT" | cut -d' ' -f1)  $OUT  $(du -m "$OUT" | cut -f1) MiB"
