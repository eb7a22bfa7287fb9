"""virtio over MMIO, version 2, with split virtqueues, and the balloon device:
the register map, status and feature bits, ring layouts and the balloon's
config and statistics (virtio 1.2 sections 2, 4.2 and 5.5; Linux's
include/uapi/linux/virtio_{mmio,config,ring,balloon}.h). All little-endian.

In this paravirtual machine a bus address is a *machine* address, as DMA is
for a Xen PV guest: the driver hands the device the machine addresses of its
rings and buffers, and the balloon's page numbers are machine frame numbers.
"""

from __future__ import annotations

import struct

# --- the MMIO register map (offsets in the device's window) -----------------------

VIRTIO_MMIO_MAGIC_VALUE = 0x000          # R: 0x74726976, "virt"
VIRTIO_MMIO_VERSION = 0x004              # R: 2
VIRTIO_MMIO_DEVICE_ID = 0x008            # R: 0 = no device here
VIRTIO_MMIO_VENDOR_ID = 0x00C            # R
VIRTIO_MMIO_DEVICE_FEATURES = 0x010      # R: 32 bits of features, word DEVICE_FEATURES_SEL
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014  # W
VIRTIO_MMIO_DRIVER_FEATURES = 0x020      # W: 32 bits of accepted features
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024  # W
VIRTIO_MMIO_QUEUE_SEL = 0x030            # W: the queue the next registers are about
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034        # R: 0 = no such queue
VIRTIO_MMIO_QUEUE_NUM = 0x038            # W: the queue size the driver uses
VIRTIO_MMIO_QUEUE_READY = 0x044          # RW
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050         # W: a queue index: buffers are available
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060     # R
VIRTIO_MMIO_INTERRUPT_ACK = 0x064        # W
VIRTIO_MMIO_STATUS = 0x070               # RW: writing 0 resets the device
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080       # W: the descriptor table
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090      # W: the driver area (available ring)
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0       # W: the device area (used ring)
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC    # R
VIRTIO_MMIO_CONFIG = 0x100               # RW: the device's own config space

VIRTIO_MMIO_MAGIC = 0x74726976
VIRTIO_MMIO_VERSION_2 = 2
VIRTIO_MMIO_WINDOW = 0x200               # bytes of registers (Linux: 0x200@base)

# InterruptStatus / InterruptACK bits
VIRTIO_MMIO_INT_VRING = 1                # a used buffer, on any queue
VIRTIO_MMIO_INT_CONFIG = 2               # the config space changed

# --- device status (virtio 1.2, 2.1) ----------------------------------------------

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# --- transport feature bits (virtio 1.2, 6) ---------------------------------------

VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# --- split virtqueues (virtio 1.2, 2.7) -------------------------------------------

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VRING_DESC = struct.Struct("<QIHH")      # addr, len, flags, next: 16 bytes
VRING_USED_ELEM = struct.Struct("<II")   # id, len: 8 bytes
VRING_DESC_ALIGN = 16
VRING_AVAIL_ALIGN = 2
VRING_USED_ALIGN = 4
VIRTQUEUE_MAX_SIZE = 32768


def vring_avail_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def vring_used_size(num: int) -> int:
    """flags, idx, ring[num] of (id, len), avail_event."""
    return 6 + VRING_USED_ELEM.size * num


# offsets inside the rings
VRING_FLAGS_OFF = 0
VRING_IDX_OFF = 2
VRING_RING_OFF = 4

# --- device ids -------------------------------------------------------------------

VIRTIO_ID_BALLOON = 5

# --- the traditional memory balloon (virtio 1.2, 5.5) -----------------------------

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0  # tell (and wait for the ack) before reusing pages
VIRTIO_BALLOON_F_STATS_VQ = 1        # the stats queue exists
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2  # the driver may deflate when the guest is short

# queues are numbered by their position among the ones the device offers
VIRTIO_BALLOON_VQ_INFLATE = 0
VIRTIO_BALLOON_VQ_DEFLATE = 1
VIRTIO_BALLOON_VQ_STATS = 2          # only with STATS_VQ

# config space: both le32, in 4 KiB pages
VIRTIO_BALLOON_CFG_NUM_PAGES = 0x0   # the device's target
VIRTIO_BALLOON_CFG_ACTUAL = 0x4      # the driver's balloon size
VIRTIO_BALLOON_CONFIG_SIZE = 8

VIRTIO_BALLOON_PFN_SHIFT = 12
VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256  # page numbers in one inflate or deflate request
VIRTIO_BALLOON_PFN = struct.Struct("<I")

# statistics: packed {le16 tag; le64 val;} entries
VIRTIO_BALLOON_STAT = struct.Struct("<HQ")  # 10 bytes
VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
VIRTIO_BALLOON_S_NR = 10
VIRTIO_BALLOON_S_NAMES = ("swap-in", "swap-out", "major-faults", "minor-faults", "free-memory",
                          "total-memory", "available-memory", "disk-caches",
                          "hugetlb-allocations", "hugetlb-failures")
