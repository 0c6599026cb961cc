#!/bin/sh
# Guest script for tests/guest_kernel.rs (busybox sh in the nbd-guest VM): the Linux kernel NBD
# client attaches the export, makes ext4, writes /file.bin from /dev/urandom, prints
# "GUEST_MD5 <md5>", syncs, trims, unmounts and detaches. Any failing step exits non-zero.
set -e
nbd-client -N "$NBD_EXPORT" -u "$NBD_SOCK" /dev/nbd0 -b 4096
echo "GUEST_SIZE $(blockdev --getsize64 /dev/nbd0)"
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 -o discard /dev/nbd0 /mnt
dd if=/dev/urandom of=/mnt/file.bin bs=1M count=12 2>/dev/null
# Overwrite part of the file in place, so the device sees rewrites of written blocks.
dd if=/dev/urandom of=/mnt/file.bin bs=4096 seek=100 count=64 conv=notrunc 2>/dev/null
sum=$(md5sum /mnt/file.bin)
echo "GUEST_MD5 ${sum%% *}"
dd if=/dev/urandom of=/mnt/gone.bin bs=1M count=4 2>/dev/null
sync
rm /mnt/gone.bin
sync
fstrim /mnt
umount /mnt
nbd-client -d /dev/nbd0
echo "guest ext4-md5: OK"
