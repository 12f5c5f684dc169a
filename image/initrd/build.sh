#!/usr/bin/env bash
# Builds Berth's initrd (see ./init) from an unpacked image root:
#
#   image/initrd/build.sh ROOT KERNEL-VERSION OUT.img
#
# Contents: busybox (shell, mount, switch_root), kmod's modprobe, blkid,
# e2fsck, the libraries they link, and the kernel modules that can lead to the
# root disk of a QEMU guest or a common x86-64 server, uncompressed (the
# archive is compressed as a whole) with their own modules.dep.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$1
kver=$2
out=$3
[ -d "$root/usr/lib/modules/$kver" ] || { echo "initrd: no modules for $kver in $root" >&2; exit 2; }
for tool in cpio zstd xz; do
    command -v "$tool" >/dev/null || { echo "initrd: $tool is missing (scripts/deps.sh)" >&2; exit 2; }
done

# Built inside the image root so that the image's own depmod indexes it.
tree=$(mktemp -d "$root/tmp/initrd.XXXXXX")
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/usr/bin "$tree"/usr/sbin "$tree"/usr/lib/x86_64-linux-gnu "$tree"/usr/lib64 \
    "$tree"/etc "$tree"/dev "$tree"/proc "$tree"/sys "$tree"/run "$tree"/root
for link in bin sbin lib lib64; do ln -s "usr/$link" "$tree/$link"; done
mknod -m 0600 "$tree/dev/console" c 5 1
ln -s /proc/mounts "$tree/etc/mtab"
install -m 0755 "$here/init" "$tree/init"

# Programs, and the shared libraries each one links (as the image's own
# dynamic loader resolves them).
install -m 0755 "$root/usr/bin/busybox" "$tree/usr/bin/busybox"
for applet in sh mount umount switch_root setsid sleep cat ls tr mkdir grep sed; do
    ln -s busybox "$tree/usr/bin/$applet"
done
install -m 0755 "$root/usr/bin/kmod" "$tree/usr/bin/kmod"
ln -s ../bin/kmod "$tree/usr/sbin/modprobe"
for program in /usr/sbin/blkid /usr/sbin/e2fsck; do
    install -m 0755 "$root$program" "$tree$program"
done
for program in /usr/bin/kmod /usr/sbin/blkid /usr/sbin/e2fsck; do
    chroot "$root" ldd "$program" | awk '$2 == "=>" { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    real=$(chroot "$root" readlink -f "$lib")
    dest="$tree/usr${lib#/usr}"
    mkdir -p "$(dirname "$dest")"
    cp -L "$root$real" "$dest"
done

# Kernel modules: whole driver families for disks and their controllers, the
# root's and the ESP's filesystems, and everything they depend on
# (modprobe --show-depends also follows softdeps such as ext4's crc32c).
moddir=usr/lib/modules/$kver
wanted=$(cd "$root/$moddir/kernel" && find drivers/ata drivers/nvme drivers/scsi drivers/virtio \
    drivers/usb/host drivers/usb/storage drivers/mmc drivers/block/virtio_blk.ko.xz \
    fs/ext4 fs/fat fs/nls/nls_cp437.ko.xz fs/nls/nls_ascii.ko.xz fs/nls/nls_utf8.ko.xz \
    -name '*.ko.xz' \
    -not -path 'drivers/scsi/fcoe/*' -not -path 'drivers/scsi/libfc/*' -not -path 'drivers/scsi/qed*' \
    -not -path 'drivers/scsi/bnx2*' -not -path 'drivers/scsi/cxgbi/*' -not -path 'drivers/scsi/be2iscsi/*' \
    -not -path 'drivers/scsi/csiostor/*' -not -path 'drivers/scsi/lpfc/*' -not -path 'drivers/scsi/qla2xxx/*' \
    -not -path 'drivers/scsi/qla4xxx/*' -not -path 'drivers/scsi/bfa/*' -not -path 'drivers/scsi/fnic/*' \
    -not -path 'drivers/scsi/snic/*' -not -path 'drivers/scsi/pcmcia/*' -not -name 'scsi_debug.ko.xz' \
    -not -path 'drivers/nvme/target/*' -not -name 'nvme-rdma.ko.xz' -not -name 'nvme-fc.ko.xz' \
    -not -name 'nvme-tcp.ko.xz' -not -name 'hv_storvsc.ko.xz' -not -name 'xen-scsifront.ko.xz' \
    -not -name '*iscsi*' | sed 's|.*/||; s|\.ko\.xz$||')
# shellcheck disable=SC2086
chroot "$root" sh -c 'for m in "$@"; do modprobe -S "'"$kver"'" --show-depends "$m"; done' sh $wanted \
    | awk '$1 == "insmod" { print $2 }' | sort -u | while read -r module; do
    rel=${module#/lib/}
    rel=${rel#/usr/lib/}
    dest="$tree/usr/lib/${rel%.xz}"
    mkdir -p "$(dirname "$dest")"
    xz -dc "$root/usr/lib/$rel" > "$dest"
done
cp "$root/$moddir/modules.builtin" "$root/$moddir/modules.builtin.modinfo" "$root/$moddir/modules.order" "$tree/$moddir/"
chroot "$root" depmod -b "${tree#"$root"}" "$kver"

(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | zstd -q -19 -T0 > "$out"
echo "initrd: $out ($(du -h "$out" | cut -f1), $(find "$tree/$moddir" -name '*.ko' | wc -l) modules)"
