"""virtio-blk, device 2: its feature bits, config space, request header,
request types and status codes (the virtio 1.2 specification, section 5.2;
Linux's include/uapi/linux/virtio_blk.h). All little-endian. Shared by the
host's device model (hypervisor/devices/blk/) and the guest's driver
(guestos/drivers/virtio_blk.py).

A request is one descriptor chain: the 16-byte header (device-readable),
the data (device-readable for OUT, device-writable for IN and GET_ID, none
for FLUSH), then one status byte (device-writable, the chain's last). The
unit of ``sector`` and ``capacity`` is always 512 bytes, whatever blk_size.
"""

from __future__ import annotations

import struct

VIRTIO_ID_BLOCK = 2

# --- feature bits -----------------------------------------------------------------

VIRTIO_BLK_F_SIZE_MAX = 1    # size_max: the largest data segment
VIRTIO_BLK_F_SEG_MAX = 2     # seg_max: the most data segments in a request
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5          # the disk is read-only: OUT gets IOERR
VIRTIO_BLK_F_BLK_SIZE = 6    # blk_size: the disk's block size (a hint)
VIRTIO_BLK_F_FLUSH = 9       # FLUSH commands the device's cache to stable storage
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- config space (at 0x100 of the MMIO window) -----------------------------------

# struct virtio_blk_config up to blk_size: capacity le64 +0, size_max le32 +8,
# seg_max le32 +12, geometry {cylinders le16, heads u8, sectors u8} +16,
# blk_size le32 +20
VIRTIO_BLK_CONFIG = struct.Struct("<QIIHBBI")
VIRTIO_BLK_CFG_CAPACITY = 0
VIRTIO_BLK_CFG_SIZE_MAX = 8
VIRTIO_BLK_CFG_SEG_MAX = 12
VIRTIO_BLK_CFG_GEOMETRY = 16
VIRTIO_BLK_CFG_BLK_SIZE = 20
VIRTIO_BLK_CONFIG_SIZE = VIRTIO_BLK_CONFIG.size  # 24

SECTOR_SIZE = 512            # the protocol's unit (SECTOR_SHIFT 9)
SECTOR_SHIFT = 9

# --- requests ---------------------------------------------------------------------

# struct virtio_blk_outhdr: type le32, reserved le32 (legacy ioprio), sector le64
VIRTIO_BLK_OUTHDR = struct.Struct("<IIQ")  # 16 bytes

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20     # GET_ID's serial: ASCII, NUL-padded, no NUL if 20 long
