#!/usr/bin/env bash
# dev/images/build-test-image.sh -- build the tiny BIOS-bootable "cloud-like" test
# disk image the agent's tests boot under QEMU. Everything comes from Debian
# packages (apt-get download + dpkg-deb -x): no image is downloaded, nothing is
# installed on the host, no loop device, no mount, no root-only step.
#
# Result (in $OUT):
#   disk.raw     MBR (syslinux mbr.bin) + one active FAT partition holding syslinux,
#                syslinux.cfg, vmlinuz (linux-image-cloud-amd64) and initrd.img.
#                Boots under SeaBIOS from a plain disk, like a cloud image.
#   disk.qcow2   the same image as qcow2 (what an image URL serves)
#   vmlinuz, initrd.img, cmdline   for a -kernel/-initrd debugging boot
#   seed-example.iso / seed-example-vfat.img  NoCloud seed examples (label cidata)
#
# What the guest does (busybox initramfs /init):
#   * finds the NoCloud seed (a filesystem labelled cidata/CIDATA, ISO 9660 or vfat),
#     prints "otherix-test-image: instance-id=...", "otherix-test-image: local-hostname=..."
#     and every user-data line containing "otherix", and sets the hostname;
#   * prints the boot marker           otherix-test-image: booted
#   * runs busybox acpid: the ACPI power button (QMP system_powerdown) powers off;
#   * runs getty on ttyS0: "<hostname> login:", user root, empty password.
#
# Usage:  OUT=/tmp/img dev/images/build-test-image.sh
#   DEBS = where downloaded .debs are cached (default $OUT/../debs-cache)
#   KERNEL_FLAVOR = cloud [default] | generic;  BOOTLOADER = syslinux [default] | grub
#   EXTRA_CMDLINE = extra kernel args (default "quiet")
#   SOURCE_DATE_EPOCH = timestamp for all files (default 1700000000): the same package
#                       versions give byte-identical disk.raw/disk.qcow2
# Needs (Debian 12, apt-get update done): dosfstools mtools fdisk cpio qemu-utils genisoimage
# Adapted from ../shared/notes/build-test-image.sh (measured in qemu-on-this-machine.md).
set -euo pipefail

OUT=${OUT:-$PWD/test-image}
KERNEL_FLAVOR=${KERNEL_FLAVOR:-cloud}
DEBS=${DEBS:-$(dirname "$OUT")/debs-cache}
EXTRA_CMDLINE=${EXTRA_CMDLINE-quiet}
BOOTLOADER=${BOOTLOADER:-syslinux}     # syslinux (fast) | grub (what real cloud images use)
MARKER="otherix-test-image: booted"

t0=$(date +%s.%N)
need() { command -v "$1" >/dev/null 2>&1 || { echo "missing tool $1 (apt-get install -y --no-install-recommends $2)" >&2; exit 1; }; }
need dpkg-deb dpkg; need cpio cpio; need gzip gzip; need mkfs.vfat dosfstools
need mcopy mtools; need mmd mtools; need sfdisk fdisk; need qemu-img qemu-utils; need genisoimage genisoimage

case "$KERNEL_FLAVOR" in
  cloud)   KMETA=linux-image-cloud-amd64 ;;
  generic) KMETA=linux-image-amd64 ;;
  *) echo "KERNEL_FLAVOR must be cloud or generic" >&2; exit 1 ;;
esac

mkdir -p "$OUT" "$DEBS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/otherix-img.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- 1. packages
# Resolve the versioned kernel package behind the metapackage.
KPKG=$(apt-cache depends "$KMETA" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { echo "cannot resolve $KMETA (run apt-get update)" >&2; exit 1; }
fetch() { # fetch PKG -> prints path of cached .deb
  local p=$1 f
  f=$(ls "$DEBS"/"${p}"_*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$f" ]; then (cd "$DEBS" && apt-get download "$p" >/dev/null); f=$(ls "$DEBS"/"${p}"_*.deb | head -n1); fi
  echo "$f"
}
PKGS="$KPKG busybox-static syslinux syslinux-common"
[ "$BOOTLOADER" = grub ] && PKGS="$PKGS grub-pc-bin grub-common"
for p in $PKGS; do
  dpkg-deb -x "$(fetch "$p")" "$WORK/x"
done
KVER=${KPKG#linux-image-}
KDIR="$WORK/x/lib/modules/$KVER"
BB="$WORK/x/bin/busybox"
echo "kernel package: $KPKG ($(dpkg-deb -f "$(fetch "$KPKG")" Version))"

# ------------------------------------------------------ 2. initramfs contents
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,etc/udhcpc,proc,sys,dev,run,tmp,mnt/seed,root,var/log,lib/modules}
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list-full); do          # e.g. bin/sh, sbin/init, usr/bin/env
  [ -e "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
[ -e "$R/init" ] && rm -f "$R/init"

# Modules: resolve dependencies with busybox depmod (no kmod needed on host).
"$BB" depmod -b "$WORK/x" "$KVER"
# nls_ascii is required: Debian kernels default FAT iocharset=ascii, vfat mounts fail without it
WANT="virtio_pci virtio_blk virtio_scsi virtio_net virtio_rng ata_piix ahci sr_mod sd_mod isofs vfat nls_cp437 nls_ascii nls_iso8859-1 nls_utf8 button evdev"
declare -A SEEN=()
ORDER=()
resolve() { # DFS: dependencies first
  local path=$1 dep
  [ -n "${SEEN[$path]:-}" ] && return 0
  SEEN[$path]=1
  for dep in $(awk -v p="$path:" '$1==p{for(i=2;i<=NF;i++)print $i}' "$KDIR/modules.dep"); do resolve "$dep"; done
  ORDER+=("$path")
}
for m in $WANT; do
  path=$(awk -F: -v m="/$m.ko" 'index($1,m) && substr($1,length($1)-length(m)+1)==m {print $1; exit}' "$KDIR/modules.dep")
  if [ -z "$path" ]; then
    grep -q "/$m.ko" "$KDIR/modules.builtin" && continue   # built into the kernel
    echo "note: module $m not in $KPKG (skipped)"; continue
  fi
  resolve "$path"
done
: > "$R/etc/modules.list"
for p in "${ORDER[@]}"; do
  install -D -m 0644 "$KDIR/$p" "$R/lib/modules/$(basename "$p")"
  echo "$(basename "$p")" >> "$R/etc/modules.list"
done

cat > "$R/etc/passwd" <<'EOF'
root::0:0:root:/root:/bin/sh
EOF
cat > "$R/etc/group" <<'EOF'
root:x:0:
EOF
printf 'otherix test image \\n \\l\n\n' > "$R/etc/issue"
echo "otherix-test" > "$R/etc/hostname"

# busybox acpid maps the ACPI power button (evdev KEY_POWER) to /etc/acpi/PWRF/00000080
cat > "$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "otherix-test-image: ACPI power button -> poweroff" > /dev/console
exec /bin/busybox poweroff
EOF
chmod 0755 "$R/etc/acpi/PWRF/00000080"

# Debian's busybox looks for /etc/udhcpc/default.script (not /usr/share/udhcpc/...)
cat > "$R/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# minimal udhcpc hook: $interface $ip $mask(prefix) $router $dns
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : > /etc/resolv.conf; for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "otherix-test-image: dhcp $interface $ip/${mask:-24} router=${router:-none}" > /dev/console ;;
esac
exit 0
EOF
chmod 0755 "$R/etc/udhcpc/default.script"

cat > "$R/init" <<'EOF'
#!/bin/sh
# otherix test image init (busybox). Prints progress to the console (ttyS0).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
log() { echo "otherix-test-image: $*"; }
arg() { for a in $(cat /proc/cmdline); do case "$a" in "$1"=*) echo "${a#*=}"; return;; esac; done; }
log "init started, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/modules.list); do insmod "/lib/modules/$m" 2>/dev/null; done
# bring NICs up early so carrier/operstate settle while the seed is read
ip link set lo up
for n in /sys/class/net/*; do n=${n##*/}; [ "$n" = lo ] || ip link set "$n" up; done

# --- NoCloud seed: a filesystem labelled cidata/CIDATA (iso9660 or vfat)
wait=$(arg otherix.seedwait); wait=${wait:-50}      # tenths of a second
# busybox findfs (volume_id) misses ISO images smaller than ~68 KiB (it reads a
# 0x11000-byte buffer), which util-linux blkid (used by real cloud-init) accepts;
# so also read the ISO 9660 primary volume descriptor ourselves.
isoscan() {
  for b in /sys/block/*; do d=/dev/${b##*/}; [ -b "$d" ] || continue
    [ "$(dd if="$d" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
    case "$(dd if="$d" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' \000')" in
      cidata|CIDATA) echo "$d"; return 0 ;; esac
  done; return 1; }
seed=""; i=0
while [ $i -lt "$wait" ]; do
  seed=$(findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null || isoscan) && [ -n "$seed" ] && break
  sleep 0.1; i=$((i+1))
done
if [ -n "$seed" ] && mount -o ro "$seed" /mnt/seed; then
  log "seed device $seed ($(grep " /mnt/seed " /proc/mounts | cut -d' ' -f3))"
  md=/mnt/seed/meta-data; ud=/mnt/seed/user-data; nc=/mnt/seed/network-config
  key() { sed -n "s/^[[:space:]\"]*$1\"*[[:space:]]*:[[:space:]]*\"*\([^\",]*\)\"*,*[[:space:]]*\$/\1/p" "$md" 2>/dev/null | head -n1; }
  iid=$(key instance-id); lh=$(key local-hostname)
  log "instance-id=${iid:-<none>}"
  log "local-hostname=${lh:-<none>}"
  [ -n "$lh" ] && hostname "$lh" && echo "$lh" > /etc/hostname
  if [ -f "$ud" ]; then
    log "user-data line 1: $(head -n1 "$ud")"
    grep -i 'otherix' "$ud" | while IFS= read -r l; do log "user-data: $l"; done
  else log "no user-data"; fi
  [ -f "$nc" ] && log "network-config present ($(wc -l < "$nc") lines)"
else
  log "no cidata seed found"; hostname "$(cat /etc/hostname)"
fi

# --- network
for n in /sys/class/net/*; do n=${n##*/}; [ "$n" = lo ] && continue
  i=0; while [ "$(cat /sys/class/net/$n/carrier 2>/dev/null)" != 1 ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
  log "link $n mac=$(cat /sys/class/net/$n/address) carrier=$(cat /sys/class/net/$n/carrier 2>/dev/null) operstate=$(cat /sys/class/net/$n/operstate)"; done
mode=$(arg otherix.net)
if [ -z "$mode" ] && [ -f /mnt/seed/network-config ]; then
  if grep -q 'dhcp4:[[:space:]]*\(true\|yes\)' /mnt/seed/network-config; then mode=dhcp
  else
    addr=$(sed -n 's/^[[:space:]]*-[[:space:]]*\([0-9.]*\/[0-9]*\)[[:space:]]*$/\1/p' /mnt/seed/network-config | head -n1)
    gw=$(sed -n 's/^[[:space:]]*gateway4:[[:space:]]*\([0-9.]*\).*/\1/p' /mnt/seed/network-config | head -n1)
    [ -n "$addr" ] && mode=static
  fi
fi
first=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
if [ -n "$first" ]; then
  case "$mode" in
    dhcp) udhcpc -i "$first" -s /etc/udhcpc/default.script -n -q -t 5 -T 1 -A 1 >/dev/null 2>&1 || log "dhcp on $first failed" ;;
    static) ip addr add "$addr" dev "$first"; [ -n "$gw" ] && ip route add default via "$gw"
            log "static $first $addr gw=${gw:-none}" ;;
  esac
fi
for n in $(ls /sys/class/net); do [ "$n" = lo ] || log "link $n state=$(cat /sys/class/net/$n/operstate) addr=$(ip -o -4 addr show dev $n | awk '{print $4}')"; done

# --- ACPI power button -> poweroff
acpid -c /etc/acpi -l /run/acpid.log 2>/dev/null || log "acpid failed"

# --- console: login prompt (default) or a root shell
if [ "$(arg otherix.console)" = shell ]; then con='ttyS0::respawn:-/bin/sh'
else con='ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100'; fi
cat > /etc/inittab <<EOT
$con
::shutdown:/bin/echo otherix-test-image: shutting down
::shutdown:/bin/umount -a -r
::ctrlaltdel:/sbin/reboot
EOT
echo "booted at uptime $(cut -d' ' -f1 /proc/uptime)s" > /run/otherix-booted
log "uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "otherix-test-image: booted"
exec /sbin/init
EOF
chmod 0755 "$R/init"
grep -q "$MARKER" "$R/init"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}   # mtools honours it; mkfs.vfat gets --invariant
EPOCH=$SOURCE_DATE_EPOCH                        # fixed timestamps => reproducible initrd/disk
find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 --reproducible | gzip -9 -n) > "$OUT/initrd.img"
cp "$WORK/x/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
touch -d "@$EPOCH" "$OUT/initrd.img" "$OUT/vmlinuz"
CMDLINE="console=ttyS0,115200 $EXTRA_CMDLINE"
echo "$CMDLINE" > "$OUT/cmdline"

# ------------------------------------------------------------- 3. boot disk
SL="$WORK/x/usr/lib/syslinux"
cat > "$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT otherix
LABEL otherix
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $CMDLINE
EOF
kb=$(( ( $(stat -c %s "$OUT/vmlinuz") + $(stat -c %s "$OUT/initrd.img") ) / 1024 ))
part_kb=$(( (kb + 1024 + 1023) / 1024 * 1024 ))          # payload + 1 MiB slack, MiB aligned
PART="$WORK/part.img"
touch -d "@$EPOCH" "$WORK/syslinux.cfg"
mkfs.vfat --invariant -C -i 0711E71D -n OTHERIXBOOT "$PART" "$part_kb" >/dev/null
mcopy -m -i "$PART" "$OUT/vmlinuz" ::vmlinuz
mcopy -m -i "$PART" "$OUT/initrd.img" ::initrd.img
disk_kb=$(( part_kb + 1024 ))
rm -f "$OUT/disk.raw"; truncate -s "${disk_kb}K" "$OUT/disk.raw"
printf 'label: dos\nlabel-id: 0x0711e71d\nstart=2048, type=e, bootable\n' | sfdisk -q "$OUT/disk.raw"
if [ "$BOOTLOADER" = grub ]; then
  # GRUB i386-pc without grub-install/loop devices: boot.img (its kernel-sector field
  # defaults to LBA 1) in the MBR, core.img (diskboot.img + modules, built with
  # grub-mkimage, which fills in diskboot's block list) in the gap at LBA 1..2047.
  G="$WORK/x/usr/lib/grub/i386-pc"
  cat > "$WORK/grub.cfg" <<EOG
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
menuentry "otherix" {
  linux /vmlinuz $CMDLINE
  initrd /initrd.img
}
EOG
  touch -d "@$EPOCH" "$WORK/grub.cfg"
  mmd -i "$PART" ::boot ::boot/grub
  mcopy -m -i "$PART" "$WORK/grub.cfg" ::boot/grub/grub.cfg
  "$WORK/x/usr/bin/grub-mkimage" -d "$G" -O i386-pc -o "$WORK/core.img" -p '(hd0,msdos1)/boot/grub' \
      biosdisk part_msdos fat normal linux serial terminal configfile echo test
  [ $(( $(stat -c %s "$WORK/core.img") / 512 )) -lt 2000 ] || { echo "core.img too big for the MBR gap" >&2; exit 1; }
  dd if="$G/boot.img" of="$OUT/disk.raw" bs=440 count=1 conv=notrunc status=none
  dd if="$WORK/core.img" of="$OUT/disk.raw" bs=512 seek=1 conv=notrunc status=none
else
  mcopy -m -i "$PART" "$WORK/syslinux.cfg" ::syslinux.cfg
  "$WORK/x/usr/bin/syslinux" --install "$PART"              # mtools-based: no loop device, no mount
  dd if="$SL/mbr/mbr.bin" of="$OUT/disk.raw" bs=440 count=1 conv=notrunc status=none
fi
dd if="$PART" of="$OUT/disk.raw" bs=1M seek=1 conv=notrunc status=none
rm -f "$OUT/disk.qcow2"
qemu-img convert -f raw -O qcow2 "$OUT/disk.raw" "$OUT/disk.qcow2"

# ------------------------------------------------------ 4. example NoCloud seeds
S="$WORK/seed"; mkdir -p "$S"
cat > "$S/meta-data" <<'EOF'
instance-id: iid-otherix-0001
local-hostname: otherix-vm1
EOF
cat > "$S/user-data" <<'EOF'
#cloud-config
# otherix-message: hello from user-data
runcmd:
  - echo hi
EOF
cat > "$S/network-config" <<'EOF'
version: 2
ethernets:
  eth0:
    dhcp4: true
EOF
genisoimage -quiet -output "$OUT/seed-example.iso" -volid cidata -joliet -rock "$S/user-data" "$S/meta-data" "$S/network-config"
rm -f "$OUT/seed-example-vfat.img"
mkfs.vfat -C -n CIDATA "$OUT/seed-example-vfat.img" 1024 >/dev/null
mcopy -i "$OUT/seed-example-vfat.img" "$S/user-data" "$S/meta-data" "$S/network-config" ::

t1=$(date +%s.%N)
echo "built in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}")s:"
ls -l "$OUT"
echo "modules in initramfs: $(tr '\n' ' ' < "$R/etc/modules.list")"
qemu-img info "$OUT/disk.qcow2" | grep -E 'virtual size|disk size'
