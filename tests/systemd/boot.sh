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
# Only the test's units: none of the host's enabled ones.
rm -rf "$root"/etc/systemd/system/*
cp -a "$dir/units/." "$root/etc/systemd/system/"
mkdir -p "$root/etc/enforcer"
cp -a "$dir/etc-enforcer/." "$root/etc/enforcer/"
mkdir -p "$root/var/lib" "$root/var/log" "$root/var/tmp"
cp "$dir/enforcer" "$root/usr/local/bin/enforcer"
cp "$dir/client.py" "$dir/server.py" "$root/usr/local/bin/"
umount -R "$root/proc" "$root/sys"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t bpf bpf "$root/sys/fs/bpf"
cd "$root"
exec chroot "$root" /usr/bin/env -i container=enforcer-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=enforcer-test.target --log-target=journal
