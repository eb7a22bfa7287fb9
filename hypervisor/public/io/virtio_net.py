"""The virtio network device (virtio 1.2, section 5.1; Linux's
include/uapi/linux/virtio_net.h): its feature bits, status bits, config
space, the header before every frame (VERSION_1: 12 bytes), and the control
queue's commands this machine uses. All little-endian.

Queues by position: receive 0 (buffers the driver posts, the device fills),
transmit 1 (frames the driver sends), control 2 (with CTRL_VQ).
"""

from __future__ import annotations

import struct

VIRTIO_ID_NET = 1

# --- feature bits ----------------------------------------------------------------
VIRTIO_NET_F_MAC = 5              # the config space holds the device's MAC
VIRTIO_NET_F_STATUS = 16          # the config space holds the link status
VIRTIO_NET_F_CTRL_VQ = 17         # a control queue
VIRTIO_NET_F_GUEST_ANNOUNCE = 21  # the device asks the driver to announce itself

# --- status (config) ------------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# --- config space: mac[6], status le16 (max_virtqueue_pairs and the rest
# follow only with features this device does not offer)
VIRTIO_NET_CFG_MAC = 0x0
VIRTIO_NET_CFG_STATUS = 0x6
VIRTIO_NET_CONFIG_SIZE = 8
VIRTIO_NET_ETH_ALEN = 6

# --- queues ------------------------------------------------------------------------
VIRTIO_NET_VQ_RX = 0
VIRTIO_NET_VQ_TX = 1
VIRTIO_NET_VQ_CTRL = 2

# --- the header before every frame (struct virtio_net_hdr_v1): flags u8,
# gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16,
# num_buffers le16: 12 bytes with VERSION_1
VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_MAX_FRAME = 1514       # an Ethernet frame without its FCS, no VLAN tag
VIRTIO_NET_MIN_FRAME = 14         # its header alone

# --- the control queue (struct virtio_net_ctrl_hdr: class u8, cmd u8; then the
# command's data; then the device-writable ack u8)
VIRTIO_NET_CTRL_HDR = struct.Struct("<BB")
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
