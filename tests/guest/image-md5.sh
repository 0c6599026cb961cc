#!/bin/sh
# Guest script for tests/guest_kernel.rs (busybox sh in the nbd-guest VM): the Linux kernel NBD
# client attaches a read-only point-in-time image, mounts its ext4 read-only and prints
# "GUEST_MD5 <md5>" of /file.bin. Any failing step exits non-zero.
set -e
nbd-client -N "$NBD_EXPORT" -u "$NBD_SOCK" /dev/nbd0 -b 4096
echo "GUEST_RO $(blockdev --getro /dev/nbd0)"
mount -t ext4 -o ro,noload /dev/nbd0 /mnt
sum=$(md5sum /mnt/file.bin)
echo "GUEST_MD5 ${sum%% *}"
umount /mnt
nbd-client -d /dev/nbd0
echo "guest image-md5: OK"
