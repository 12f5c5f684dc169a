#!/usr/bin/env bash
# Builds the Berth appliance: a raw GPT disk image that boots by UEFI, from
# Debian 13 packages (mmdebstrap) and the berth binary. No loop devices and no
# mounts: filesystems are filled from directories (mkfs.ext4 -d, mtools) and
# placed into the disk file with dd.
#
#   image/build.sh [--test | --bench] [--berth PATH] [--out DIR]
#
# --test adds the test-only command channel (see image/files/test/); release
# images never contain it. --bench is the test image with Debian's podman
# (image/bench-packages.txt), for `make bench-anchors` only. Needs root (files must belong to root in the image).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
variant=release
berth_bin="$repo/target/release/berth"
out="$repo/build"
while [ $# -gt 0 ]; do
    case "$1" in
        --test) variant=test ;;
        --bench) variant=bench ;;
        --berth) berth_bin=$2; shift ;;
        --out) out=$2; shift ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root (the image's files must be owned by root)" >&2; exit 2; }
[ -x "$berth_bin" ] || { echo "build.sh: $berth_bin is not built (cargo build --release --locked)" >&2; exit 2; }
for tool in mmdebstrap mkfs.ext4 tune2fs mkfs.vfat mcopy mmd sfdisk zstd cpio; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (scripts/deps.sh --image)" >&2; exit 2; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
suite=trixie
mirror=${BERTH_MIRROR:-http://deb.debian.org/debian}
name="berth-$version-amd64"
[ "$variant" = test ] && name="$name-test"
[ "$variant" = bench ] && name="$name-bench"
mkdir -p "$out/cache"
started=$(date +%s)

# 1. The Debian root filesystem, cached by package list, suite and mirror.
lists="$here/packages.txt"
[ "$variant" = bench ] && lists="$lists $here/bench-packages.txt"
# shellcheck disable=SC2086
packages=$(cat $lists | grep -v '^#' | grep -v '^$' | sort | paste -sd, -)
key=$(printf '%s\n%s\n%s\n' "$packages" "$suite" "$mirror" | sha256sum | cut -c1-16)
rootfs_tar="$out/cache/rootfs-$suite-$key.tar"
if [ ! -s "$rootfs_tar" ]; then
    echo "build: mmdebstrap $suite ($packages)"
    mmdebstrap --variant=minbase --mode=root --format=tar --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        "$suite" "$rootfs_tar.partial" "$mirror"
    mv "$rootfs_tar.partial" "$rootfs_tar"
else
    echo "build: reusing $rootfs_tar"
fi

# 2. Unpack and make it a node.
work="$out/work-$variant"
rm -rf "$work"
mkdir -p "$work/root" "$work/esp" "$work/var"
tar -xf "$rootfs_tar" -C "$work/root"
root="$work/root"
kver=$(ls "$root/usr/lib/modules" | head -n1)

install -m 0755 -s "$berth_bin" "$root/usr/bin/berth"
install -m 0644 "$repo"/systemd-units/*.service "$root/usr/lib/systemd/system/"
# The air-gap image store's seed: imported by the agent at start.
"$here/busybox-oci.sh" "$root" "$root/usr/share/berth/images/busybox.tar"
cp -a "$here/files/root/." "$root/"
if [ "$variant" = test ] || [ "$variant" = bench ]; then
    cp -a "$here/files/test/." "$root/"
fi
chroot "$root" systemctl enable berth-agent.service berth-online-sync.service berth-storage-teardown.service berth-update-gate.service systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
# systemd-boot's package is here for systemd-bless-boot; what else it
# brings would write to the read-only ESP at every boot (the boot loader's
# own update, its random seed) or listen for bootctl.
chroot "$root" systemctl mask systemd-boot-update.service systemd-boot-random-seed.service systemd-bootctl.socket >/dev/null 2>&1
# No login on the serial console (nothing to log in as; and a getty hanging
# up the line loses console output).
chroot "$root" systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1
# The root is read-only and replaced whole on update, so the "/usr was
# updated" jobs (ConditionNeedsUpdate) would run, uselessly, on every boot.
chroot "$root" systemctl mask systemd-journal-catalog-update.service systemd-update-done.service \
    ldconfig.service systemd-hwdb-update.service >/dev/null 2>&1
# Kernel modules, API filesystems and boot services an appliance node does
# not use (no device mapper, configfs, static device nodes for modules it
# does not load, udev rules or network config from credentials or the kernel
# command line): each costs a unit start at boot, while the agent starts.
chroot "$root" systemctl mask modprobe@drm.service modprobe@fuse.service modprobe@efi_pstore.service \
    modprobe@dm_mod.service modprobe@configfs.service sys-kernel-config.mount kmod-static-nodes.service \
    systemd-udev-load-credentials.service systemd-network-generator.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount dev-hugepages.mount >/dev/null 2>&1
chroot "$root" systemctl set-default multi-user.target >/dev/null 2>&1
# e2fsprogs (for provisioned volumes) brings LVM snapshot scrubbing, which a
# node without LVM never needs; its boot-time reaper costs seconds under TCG.
chroot "$root" systemctl mask e2scrub_reap.service e2scrub_all.timer e2scrub_all.service >/dev/null 2>&1
rm -f "$root/usr/lib/udev/rules.d/96-e2scrub.rules" "$root/etc/cron.d/e2scrub_all"
# Generators run at every boot, before the first unit starts (each a few
# hundred milliseconds of emulated CPU under TCG). The node's mounts come
# from /etc/fstab and it has no logins, SysV scripts, rc.local, sshd,
# hibernation, offline updates or TPM units: only the fstab generator and
# the debug one (systemd.debug_shell for someone at the console) stay.
mkdir -p "$root/etc/systemd/system-generators"
for gen in getty gpt-auto hibernate-resume rc-local run ssh system-update sysv tpm2; do
    ln -sf /dev/null "$root/etc/systemd/system-generators/systemd-$gen-generator"
done
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
echo berth > "$root/etc/hostname"
: > "$root/etc/machine-id"

# Nothing a node does not need: no package manager, no docs, no sound,
# video or wireless drivers.
rm -rf "$root"/usr/bin/apt* "$root"/usr/bin/dpkg* "$root"/usr/lib/apt "$root"/var/lib/apt "$root"/var/cache/* \
    "$root"/usr/lib/x86_64-linux-gnu/libapt-pkg.so* "$root"/usr/bin/sqv \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale
# Nor CAN, ISDN, amateur radio, data acquisition (comedi) or compute
# accelerators (families nothing else depends on): each megabyte here is
# one more in every update bundle.
for dir in sound drivers/media drivers/gpu drivers/staging drivers/net/wireless net/wireless net/bluetooth drivers/bluetooth drivers/iio drivers/input/touchscreen \
    drivers/net/can net/can drivers/isdn drivers/net/hamradio net/ax25 net/netrom net/rose drivers/comedi drivers/accel; do
    rm -rf "$root/usr/lib/modules/$kver/kernel/$dir"
done
chroot "$root" depmod "$kver"
# The hardware database is compiled (hwdb.bin) and never rebuilt on the
# node (systemd-hwdb-update is masked): its sources are 9 MB of text.
rm -rf "$root/usr/lib/udev/hwdb.d"

# 3. Partition identities, known before the filesystems are made.
esp_uuid=$(cat /proc/sys/kernel/random/uuid)
root_a_uuid=$(cat /proc/sys/kernel/random/uuid)
root_b_uuid=$(cat /proc/sys/kernel/random/uuid)
var_uuid=$(cat /proc/sys/kernel/random/uuid)
# No fsck pass from systemd: the root is read-only (never written at run
# time), the initrd checks /var with e2fsck -p before it mounts it, and the
# ESP is mounted read-only. No line for /: the root is whichever slot the
# boot entry's root= names (the initrd mounts it read-only), and the same
# root image serves both slots. /var and the ESP by partition name, not
# UUID: an update's root comes from another build, with other UUIDs.
cat > "$root/etc/fstab" <<FSTAB
PARTLABEL=var  /var  ext4 rw,noatime,x-systemd.growfs 0 0
PARTLABEL=esp  /efi  vfat ro,nofail,umask=0077 0 0
FSTAB
mkdir -p "$root/efi"

# Nothing for systemd-modules-load (Debian's /etc/modules is empty): the
# initrd loads the modules the agent relies on (usr/lib/berth/boot-modules).
rm -f "$root/etc/modules-load.d/modules.conf"
# Berth's own initrd (image/initrd/): it mounts the root, /var and the ESP
# without udev. The kernel package's initramfs-tools image is not used.
"$here/initrd/build.sh" "$root" "$kver" "$work/initrd.img"
rm -f "$root/boot/initrd.img-$kver"

# /var lives on the data partition; the root keeps an empty mount point.
cp -a "$root/var/." "$work/var/"
rm -rf "$root/var"
# /var/tmp exists before /var is mounted: early services with PrivateTmp=
# (systemd-resolved) set up their namespace then.
mkdir -p "$root/var/tmp"
chmod 1777 "$root/var/tmp"

# 4. The ESP: systemd-boot, the kernel and initrd of slot A, the node config.
esp="$work/esp"
mkdir -p "$esp/EFI/BOOT" "$esp/EFI/systemd" "$esp/loader/entries" "$esp/berth/a" "$esp/berth/b" "$esp/berth"
cp "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$esp/EFI/BOOT/BOOTX64.EFI"
cp "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$esp/EFI/systemd/systemd-bootx64.efi"
cp "$root/boot/vmlinuz-$kver" "$esp/berth/a/vmlinuz"
cp "$work/initrd.img" "$esp/berth/a/initrd.img"
# The kernel boots from the ESP: the root's copy (12 MB that zstd cannot
# shrink, in every bundle) and its symbol map go.
rm -rf "$root"/boot/* "$root"/vmlinuz "$root"/vmlinuz.old "$root"/initrd.img "$root"/initrd.img.old
# No entry editor: at the console it would let anyone boot the node with
# init=/bin/sh (and on a signed image, around everything the image checks).
# Which slot boots is systemd-boot's choice among berth-* entries (see
# agent/berth-update/src/slots.rs): entries out of boot-counting tries
# last, then the highest `version` (an install's generation).
printf 'default berth-*\ntimeout 0\nconsole-mode keep\neditor no\n' > "$esp/loader/loader.conf"
# The security modules Debian's kernel activates, less those the node has
# no policy or use for: TOMOYO (no tomoyo-init), IPE (no policy) and BPF
# (only systemd's RestrictFileSystems= would use it, which no unit here
# sets; loading its program cost systemd 1-2 s of each boot under TCG).
# Two boot-time self-tests skipped: SP800-108 KDF and the "encrypted" key
# type's cipher check (1.5 s of the kernel's start under TCG); neither is
# used on a node.
kernel_tuning="lsm=lockdown,capability,landlock,yama,apparmor,ima,evm initcall_blacklist=crypto_kdf108_init,init_encrypted"
cat > "$esp/loader/entries/berth-a.conf" <<ENTRY
title   Berth $version (slot A)
sort-key berth
version 1
linux   /berth/a/vmlinuz
initrd  /berth/a/initrd.img
options root=PARTUUID=$root_a_uuid berth.slot=a ro rootwait console=tty0 console=ttyS0,115200 systemd.show_status=auto quiet panic=10 $kernel_tuning
ENTRY
cp "$here/files/esp/config.yaml" "$esp/berth/config.yaml"

# 5. Filesystems, from directories. Each root slot's partition is larger
# than the root image (BERTH_ROOT_SLOT_MIB, 768 MiB by default), so that
# later images, which may be larger, still fit the slot they update.
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
root_bytes=$(du -sb "$root" | cut -f1)
root_mib=$(( $(mib "$root_bytes") * 115 / 100 + 64 ))
slot_mib=${BERTH_ROOT_SLOT_MIB:-768}
[ "$slot_mib" -ge "$root_mib" ] || slot_mib=$root_mib
esp_mib=256
var_mib=256
mkfs.ext4 -q -F -E root_owner=0:0 -L berth-root -U "$(cat /proc/sys/kernel/random/uuid)" -d "$root" "$work/root-a.img" "${root_mib}M"
mkfs.ext4 -q -F -E root_owner=0:0 -L berth-var -d "$work/var" "$work/var.img" "${var_mib}M"
# /var's root reserve (5%, kept as the filesystem grows) is the agent's: it
# holds CAP_SYS_RESOURCE, containers and the mounts of their roots do not,
# and the reserve's uid is one no container may run as (65533, see
# VAR_RESERVE_UID). So a pod that fills /var leaves Git, status and the
# agent's state room to work.
tune2fs -m 5 -u 65533 "$work/var.img" >/dev/null

# The update bundle of this build (agent/berth-update/src/bundle.rs): the
# root image zstd-compressed, the kernel and initrd, and bundle.json, signed
# with BERTH_BUNDLE_KEY (an ssh-keygen ed25519 key) when it is set. Slot A
# keeps its manifest on the ESP, as an update's slot does.
bundle="$out/$name.bundle"
rm -rf "$bundle"
mkdir -p "$bundle"
zstd -q -f -T0 -10 "$work/root-a.img" -o "$bundle/root.img.zst"
cp "$esp/berth/a/vmlinuz" "$bundle/vmlinuz"
cp "$esp/berth/a/initrd.img" "$bundle/initrd.img"
"$berth_bin" bundle describe "$bundle" --version "$version" >/dev/null
if [ -n "${BERTH_BUNDLE_KEY:-}" ]; then
    ssh-keygen -Y sign -q -n berth-bundle -f "$BERTH_BUNDLE_KEY" "$bundle/bundle.json"
else
    echo "build: $bundle is not signed (set BERTH_BUNDLE_KEY, or: ssh-keygen -Y sign -n berth-bundle -f KEY $bundle/bundle.json)"
fi
cp "$bundle/bundle.json" "$esp/berth/a/bundle.json"

rm -f "$work/esp.img"
mkfs.vfat -F 32 -n BERTH-ESP -C "$work/esp.img" $(( esp_mib * 1024 )) >/dev/null
(cd "$esp" && find . -mindepth 1 -type d | sed 's|^\./||' | while read -r d; do mmd -i "$work/esp.img" "::$d"; done)
(cd "$esp" && find . -type f | sed 's|^\./||' | while read -r f; do mcopy -i "$work/esp.img" "$f" "::$f"; done)

# 6. The disk: GPT, then each filesystem at its offset.
img="$out/$name.img"
total_mib=$(( 1 + esp_mib + slot_mib + slot_mib + var_mib + 1 ))
rm -f "$img"
truncate -s "${total_mib}M" "$img"
sfdisk --quiet "$img" <<PARTS
label: gpt
unit: sectors
first-lba: 2048
start=2048, size=$(( esp_mib * 2048 )), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$esp_uuid, name="esp"
size=$(( slot_mib * 2048 )), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_a_uuid, name="root-a"
size=$(( slot_mib * 2048 )), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_b_uuid, name="root-b"
size=$(( var_mib * 2048 )), type=4D21B016-B534-45C2-A9FB-5C16E091FD2D, uuid=$var_uuid, name="var"
PARTS
# Slot B stays empty (zeros, sparse) until the first update writes it.
offset=1
for part in esp:$esp_mib root-a:$slot_mib root-b:$slot_mib var:$var_mib; do
    file="$work/${part%%:*}.img"
    [ -f "$file" ] && dd if="$file" of="$img" bs=1M seek="$offset" conv=notrunc,sparse status=none
    offset=$(( offset + ${part#*:} ))
done
built=$(date +%s)
zstd -q -f -T0 -10 "$img" -o "$img.zst"
done_at=$(date +%s)
rm -rf "$work"
echo "build: $img ($(du -h --apparent-size "$img" | cut -f1) raw, $(du -h "$img" | cut -f1) allocated)"
echo "build: $img.zst ($(du -h "$img.zst" | cut -f1))"
echo "build: $(( built - started )) s to build, $(( done_at - built )) s to compress"
