#!/usr/bin/env bash
# A virtual machine with a real verbs device, for the RDMA tests (docs/transports.md, "RDMA
# tests in a virtual machine"). Sourced by test-rdma.sh; runnable on its own:
#
#   bash scripts/rdma-vm.sh 'ibv_devinfo -v'      # runs a command in the guest, prints its output
#
# The guest is Debian's own kernel under qemu with TCG (KVM hangs on these machines), booted
# from an initramfs made of busybox-static and the kernel's modules. It mounts this machine's
# root read-only over 9p and chroots into it, so the host's binaries and libraries run there
# unchanged; then it makes a veth pair, puts a software RoCE device (rdma_rxe) named rxe0 on
# veth0 (10.77.0.1/24; the guest has no network card, so nothing leaves it) and runs the
# command. Everything is cached under build/rdma-vm (the kernel package, the initramfs); a
# second run only boots (about 5 s).
set -euo pipefail

SHARDPS_VM_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARDPS_VM_DIR="${SHARDPS_VM_DIR:-$SHARDPS_VM_REPO/build/rdma-vm}"
SHARDPS_VM_PACKAGES=(qemu-system-x86 busybox-static ibverbs-providers ibverbs-utils librdmacm-dev
  rdmacm-utils iproute2 cpio)
# In the order they must load (crc32_generic before rdma_rxe: without it adding a device fails
# with ENOENT; the rdma_cm modules give /dev/infiniband/rdma_cm).
SHARDPS_VM_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
  9pnet 9pnet_virtio netfs fscache 9p veth ib_core ib_uverbs udp_tunnel ip6_udp_tunnel
  crc32_generic rdma_rxe configfs iw_cm ib_cm rdma_cm rdma_ucm)

# Why the VM cannot run here (empty when it can). Installs the packages it needs first.
shardps_vm_prepare() {
  local missing=() p
  for p in "${SHARDPS_VM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "rdma-vm: installing ${missing[*]}" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >&2; then
      echo "cannot install ${missing[*]} (apt-get failed)"
      return 0
    fi
  fi
  local dir="$SHARDPS_VM_DIR" kpkg kver
  mkdir -p "$dir"
  kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [ -z "$kpkg" ]; then
    # No package lists: use the kernel already unpacked, if any.
    kpkg=$(ls "$dir"/kernel 2>/dev/null | head -1 || true)
    [ -n "$kpkg" ] || { echo "no Debian kernel package found (apt-cache depends linux-image-amd64)"; return 0; }
  fi
  kver=${kpkg#linux-image-}
  local kdir="$dir/kernel/$kpkg"
  if [ ! -f "$kdir/boot/vmlinuz-$kver" ]; then
    echo "rdma-vm: fetching $kpkg" >&2
    rm -rf "$dir/deb" "$kdir" && mkdir -p "$dir/deb"
    if ! (cd "$dir/deb" && apt-get download "$kpkg" >&2 2>/dev/null); then
      echo "cannot download $kpkg (apt-get download failed)"
      return 0
    fi
    mkdir -p "$kdir" && dpkg-deb -x "$dir"/deb/*.deb "$kdir" && rm -rf "$dir/deb"
  fi
  local initrd="$dir/initrd-$kver.img"
  if [ ! -f "$initrd" ] || [ "${BASH_SOURCE[0]}" -nt "$initrd" ]; then
    local root="$dir/initramfs" m f
    rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,mnt,modules}
    cp /bin/busybox "$root/bin/busybox"
    for m in "${SHARDPS_VM_MODULES[@]}"; do
      f=$(find "$kdir/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
      [ -n "$f" ] || { echo "kernel $kver has no module $m"; return 0; }
      cp "$f" "$root/modules/"
    done
    printf '%s\n' "${SHARDPS_VM_MODULES[@]}" > "$root/modules/order"
    shardps_vm_init > "$root/init"
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$initrd.tmp") && mv "$initrd.tmp" "$initrd"
  fi
  ln -sf "kernel/$kpkg/boot/vmlinuz-$kver" "$dir/vmlinuz"
  ln -sf "$(basename "$initrd")" "$dir/initrd.img"
  if [ ! -r "$dir/vmlinuz" ]; then echo "kernel image missing under $kdir"; return 0; fi
}

# The guest's /init (busybox sh).
shardps_vm_init() {
  cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
out=$(sed -n 's/.*shardps.out=\([^ ]*\).*/\1/p' /proc/cmdline)
repo=$(sed -n 's/.*shardps.repo=\([^ ]*\).*/\1/p' /proc/cmdline)
for m in $(cat /modules/order); do
  insmod /modules/$m.ko* || echo "rdma-vm: insmod $m failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /mnt ||
  echo "rdma-vm: cannot mount the host's root"
for d in proc sys dev; do mount --bind /$d /mnt/$d; done
mkdir -p /dev/shm
mount -t tmpfs tmp /mnt/tmp; mount -t tmpfs shm /mnt/dev/shm; mount -t tmpfs run /mnt/run
# The repository gets a mount of its own: a checkout under /tmp is hidden by the tmpfs above.
mkdir -p "/mnt$repo" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose repo "/mnt$repo" ||
  echo "rdma-vm: cannot mount the repository"
mkdir -p "/mnt$out" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 out "/mnt$out" ||
  echo "rdma-vm: cannot mount the output folder"
chroot /mnt /bin/bash "$out/guest.sh"
echo "SHARDPS-VM-RC=$?"
sync
poweroff -f
EOF
}

# Runs the command `$*` (a bash script; SHARDPS_VM_OUT names a folder it may write, which is
# $SHARDPS_VM_DIR/out on this side) in the guest within `$SHARDPS_VM_TIMEOUT` seconds (default 1200), with
# rxe0 up; prints its output and returns its exit code (124 on timeout, 125 when the guest
# did not report one).
shardps_vm_run() {
  local dir="$SHARDPS_VM_DIR" out rc
  out="$dir/out"
  rm -rf "$out" && mkdir -p "$out"
  printf '%s\n' "$*" > "$out/job.sh"
  cat > "$out/guest.sh" <<EOF
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
export SHARDPS_VM_OUT="$out"
ulimit -l unlimited
ip link set lo up
ip link add veth0 type veth peer name veth1
ip addr add 10.77.0.1/24 dev veth0
ip link set veth0 up; ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0 || echo "rdma-vm: rdma link add failed"
for i in \$(seq 50); do ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE && break; sleep 0.1; done
cd "$(pwd)"
bash "$out/job.sh"
EOF
  set +e
  timeout --kill-after=10 "${SHARDPS_VM_TIMEOUT:-1200}" qemu-system-x86_64 -accel tcg -cpu max \
    -m "${SHARDPS_VM_MEMORY:-4096}" -smp 2 -nographic -no-reboot -nic none \
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
        -append "console=ttyS0 quiet panic=-1 shardps.out=$out shardps.repo=$SHARDPS_VM_REPO" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$SHARDPS_VM_REPO",mount_tag=repo,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$out",mount_tag=out,security_model=none </dev/null > "$out/console.log" 2>&1
  rc=$?
  set -e
  tr -d '\r' < "$out/console.log" | grep -v '^SHARDPS-VM-RC=' || true
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "rdma-vm: the guest did not finish within ${SHARDPS_VM_TIMEOUT:-1200} s" >&2
    return 124
  fi
  rc=$(tr -d '\r' < "$out/console.log" | sed -n 's/^SHARDPS-VM-RC=\([0-9]*\)$/\1/p' | tail -1)
  [ -n "$rc" ] || { echo "rdma-vm: the guest reported no exit code" >&2; return 125; }
  return "$rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  why=$(shardps_vm_prepare)
  if [ -n "$why" ]; then echo "rdma-vm: cannot run: $why" >&2; exit 1; fi
  shardps_vm_run "$@"
fi
