#!/bin/bash
# Builds an OCI image-layout archive of busybox from the busybox-static
# binary in an unpacked Debian root, for the appliance's air-gapped image
# store (the agent imports /usr/share/berth/images/*.tar at start).
#
#   image/busybox-oci.sh ROOT OUT.tar
#
# The image is tagged docker.io/library/busybox:<major.minor> of the
# binary's own version, and is reproducible: fixed mtimes, owners and order.
set -euo pipefail
root=$1
out=$2
bb="$root/usr/bin/busybox"
[ -x "$bb" ] || { echo "busybox-oci.sh: $bb missing (install busybox-static)" >&2; exit 2; }
banner=$("$bb" 2>&1 || true)
version=$(printf '%s\n' "$banner" | sed -n '1s/^BusyBox v\([0-9]*\.[0-9]*\).*/\1/p')
[ -n "$version" ] || { echo "busybox-oci.sh: cannot tell the busybox version" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layer="$work/layer"
mkdir -p "$layer"/{bin,etc,root,proc,sys,dev,run,srv/www,tmp,var/tmp}
chmod 1777 "$layer/tmp" "$layer/var/tmp"
chmod 0700 "$layer/root"
install -m 0755 "$bb" "$layer/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$layer/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$layer/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$layer/etc/group"
printf '<h1>served by busybox httpd in a berth pod</h1>\n' > "$layer/srv/www/index.html"

oci="$work/oci"
mkdir -p "$oci/blobs/sha256"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$layer" -cf "$work/layer.tar" .
blob() { # file -> digest hex, stored as a blob
    local hex
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    cp "$1" "$oci/blobs/sha256/$hex"
    echo "$hex"
}
layer_hex=$(blob "$work/layer.tar")
layer_size=$(stat -c %s "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$layer_hex" > "$work/config.json"
config_hex=$(blob "$work/config.json")
config_size=$(stat -c %s "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config_hex" "$config_size" "$layer_hex" "$layer_size" > "$work/manifest.json"
manifest_hex=$(blob "$work/manifest.json")
manifest_size=$(stat -c %s "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"docker.io/library/busybox:%s"}}]}' \
    "$manifest_hex" "$manifest_size" "$version" > "$oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
mkdir -p "$(dirname "$out")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$oci" -cf "$out" .
echo "busybox-oci.sh: $out: docker.io/library/busybox:$version ($(du -h "$out" | cut -f1))"
