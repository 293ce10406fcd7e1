#!/usr/bin/env bash
# Imports the busybox bundle's root filesystem into podman as the image localhost/busybox,
# for trying `podman --runtime "$PWD/target/release/husk" run --rm localhost/busybox echo hi`.
#   examples/busybox/image.sh [IMAGE]
set -euo pipefail
image=${1:-localhost/busybox}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$(dirname "$0")/bundle.sh" "$work/bundle" >/dev/null
tar -C "$work/bundle/rootfs" -c . | podman import - "$image" >/dev/null
echo "imported $image"
