#!/bin/sh
# Stage 1 of `cargo xtask vm`, run by busybox as PID 1 from the initramfs. It builds the VM's
# root: the host's own root, shared read-only over 9p, under an overlay whose upper layer is
# tmpfs so the tests can write (/etc/netns, cgroups, ...) without touching the host. Then it
# hands over to stage 2, a script the host wrote into the shared results directory.
export PATH=/bin

fail() {
    echo "egressfw-vm: stage 1 failed: $*"
    poweroff -f
}

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r module; do
    insmod "/modules/$module" || fail "insmod $module"
done < /modules/order

# msize: the largest a 6.1 virtio transport accepts; bigger messages make 9p reads far faster.
opts=trans=virtio,version=9p2000.L,msize=512000
# cache=loose: the host root does not change under the VM in ways the tests care about, and
# caching makes executing the large test binaries over 9p quick.
mount -t 9p -o "$opts,ro,cache=loose" hostroot /lower || fail "mounting the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "stacking the overlay on the host root"

# A fresh /run (the host's holds its own namespaces and pid files), with the results share in it.
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/egressfw-vm
mount -t 9p -o "$opts,cache=none" results /newroot/run/egressfw-vm || fail "mounting the results share"
mount --move /dev /newroot/dev
umount /proc /sys

echo "egressfw-vm: root ready"
exec switch_root /newroot /bin/sh /run/egressfw-vm/stage2.sh
