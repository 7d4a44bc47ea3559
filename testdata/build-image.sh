#!/usr/bin/env bash
# Package a root filesystem directory as a single-layer OCI image archive that
# `ctr image import` accepts, so tests run image-based containers (snapshotter, rootfs mounts)
# without a registry.
#
#   testdata/build-image.sh ROOTFS_DIR IMAGE_REF OUT.tar [CMD_JSON]
#
# CMD_JSON is the image's command as a JSON array (default ["/bin/sh"]).
set -euo pipefail
[ $# -eq 3 ] || [ $# -eq 4 ] || { echo "usage: $0 ROOTFS_DIR IMAGE_REF OUT.tar [CMD_JSON]" >&2; exit 2; }
rootfs=$1 ref=$2 out=$3 cmd=${4:-'["/bin/sh"]'}
[ -d "$rootfs" ] || { echo "build-image: $rootfs is not a directory" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/blobs/sha256"

put_blob() { # file -> prints digest hex, moves the file into blobs/
  local hex; hex=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$stage/blobs/sha256/$hex"
  echo "$hex"
}

tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$stage/layer.tar" .
layer_size=$(stat -c %s "$stage/layer.tar")
layer=$(put_blob "$stage/layer.tar")

printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Cmd":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$cmd" "$layer" > "$stage/config.json"
config_size=$(stat -c %s "$stage/config.json")
config=$(put_blob "$stage/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$stage/manifest.json"
manifest_size=$(stat -c %s "$stage/manifest.json")
manifest=$(put_blob "$stage/manifest.json")

printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$ref" "$ref" > "$stage/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$stage/oci-layout"
tar -C "$stage" -cf "$out" oci-layout index.json blobs
