#!/bin/bash
# PID 1 of a new pid namespace, in new mount, cgroup, network, uts and ipc
# namespaces (tests/tests/deploy.rs): a root that is the host's, read-only,
# with its own /etc (an overlay), /run, /tmp, /var, /usr/local/bin, /proc,
# /sys, cgroup2 (rooted at the test's cgroup) and bpffs; then systemd.
# Nothing mounted here is seen outside, and all of it goes when the
# namespace's last process ends.
set -euo pipefail
dir=$1
root=$dir/root
mkdir -p "$root" "$dir/up"
mount --make-rprivate /
mount --rbind / "$root"
mount -o remount,bind,ro "$root"
for d in run tmp var usr/local/bin; do mount -t tmpfs -o mode=755 tmpfs "$root/$d"; done
mount -t tmpfs tmpfs "$dir/up"
mkdir -p "$dir/up/etc" "$dir/up/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$dir/up/etc,workdir=$dir/up/work" "$root/etc"
# Only the test's units: none of the host's enabled ones. Masked: the
# early-boot units that would act on the kernel or on devices, which are
# the host's (modules, sysctls, binfmt, device nodes, the random seed).
rm -rf "$root"/etc/systemd/system/*
cp -a "$dir/units/." "$root/etc/systemd/system/"
for unit in systemd-modules-load.service systemd-sysctl.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount kmod-static-nodes.service systemd-tmpfiles-setup-dev.service \
    systemd-tmpfiles-setup.service systemd-random-seed.service systemd-firstboot.service \
    systemd-sysusers.service systemd-udevd.service systemd-udev-trigger.service \
    systemd-journald-audit.socket; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
mkdir -p "$root/etc/enforcer"
cp -a "$dir/etc-enforcer/." "$root/etc/enforcer/"
mkdir -p "$root/var/lib" "$root/var/log" "$root/var/tmp"
cp "$dir/enforcer" "$root/usr/local/bin/enforcer"
cp "$dir/client.py" "$dir/server.py" "$root/usr/local/bin/"
umount -R "$root/proc" "$root/sys"
mount -t proc proc "$root/proc"
# As in a container: kernel settings read-only.
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
# A /dev of its own: the few nodes a service uses, no host device.
umount -R "$root/dev"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir -p "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t sysfs sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t bpf bpf "$root/sys/fs/bpf"
cd "$root"
exec chroot "$root" /usr/bin/env -i container=enforcer-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=enforcer-test.target --log-target=journal
