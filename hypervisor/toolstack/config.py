"""Domain configuration: a TOML file, checked key by key.

    name = "smp"
    memory = 64          # MiB
    vcpus = 2
    image = "../firmware/guest.elf"   # relative to this file
    cmdline = "run=hashchain,counter"
    seed = 1             # frame shuffling and scheduling
    sched_seed = 7       # optional: another schedule on the same frames (default: seed)
    kernel = "guestos"   # optional: boot another Python kernel than the image names
    maxmem = 128         # optional: MiB the domain may grow to (balloon up); default memory
    requests = ["15ms suspend"]   # optional: what the toolstack asks of the guest, and when
                                  # (poweroff, halt, reboot, suspend, checkpoint, mem-set MIB,
                                  # balloon-stats, balloon-inhibit, balloon-uninhibit, or
                                  # PATH=VALUE in xenstore)
    verdict = "xtf"      # optional: judge the run as xtf-runner does (a test guest): the
                         # console's last line "Test result: X" sets the exit status,
                         # SUCCESS 0, SKIP 3, ERROR 4, FAILURE 5, and CRASH 6 (no such
                         # line, or the domain did not power off); default: not judged

    vif = ["mac=00:16:3e:00:00:01, type=user"]   # optional: virtio-net devices, xl's
                         # spelling: type=user (the user-mode network, gateway 10.0.2.2),
                         # or type=socket with listen=ADDRESS or connect=ADDRESS, an
                         # ADDRESS being HOST:PORT or unix:PATH (a path relative to the
                         # working directory); mac defaults to 00:16:3e:00:00:N, N the
                         # vif's place from 1

    [balloon]            # optional: a virtio-mmio balloon device
    stats_interval = "50ms"   # the host polls the guest's memory statistics (default: never)
    deflate_on_oom = false    # offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (default: no)
    postcopy = "drop"         # the guest's requests while post-copy runs: "drop" them
                              # (QEMU's, the default) or "reconcile" them at its end

    channel = ["name=org.pvlab.echo, connection=socket, path=echo.sock",
               "name=log, connection=file, path=guest-log.txt"]
                         # optional: a virtio-console with these ports (xl's channel
                         # spelling; relative paths are relative to this file): a
                         # Unix socket the host connects to (pvlab console DOM --port
                         # NAME, or socat), or a file the guest's output is appended to

    disk = ["target=disk.img, vdev=xvda, access=rw, format=raw"]
                         # optional: virtio-blk disks, xl's disk spelling (also its
                         # positional "disk.img,raw,xvda,rw"): a raw image file
                         # (relative to this file), access rw or ro; the guest
                         # names them vda, vdb, ... in this order; pvlab's
                         # queue-size=N (QEMU's): the request queue's entries,
                         # a power of two from 4 to 256 (default 256)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from hypervisor.domctl import (
    BLK_QUEUE_SIZE,
    POSTCOPY_POLICIES,
    check_blk_queue_size,
    check_console_ports,
    new_balloon_state,
    new_blk_state,
    new_console_state,
    new_net_state,
    parse_net_address,
)
from hypervisor.public.io.inet import mac_aton
from hypervisor.toolstack.control import Request, parse_request
from hypervisor.toolstack.timeparse import parse_duration
from hypervisor.toolstack.verdict import VERDICTS

MAX_VCPUS = 32  # XEN_LEGACY_MAX_VCPUS: vcpu_info lives in shared_info
MAX_MEMORY_MIB = 1536  # the kernel maps all its memory below the top 2 GiB
MAX_CMDLINE = 1023


class ConfigError(Exception):
    """A domain configuration is wrong; the message names the key."""


@dataclass
class DomainConfig:
    name: str
    memory: int
    vcpus: int
    image: Path
    cmdline: str = ""
    seed: int = 0
    path: Path | None = None
    kernel: str = ""          # a Python module overriding the image's kernel note
    maxmem: int = 0           # MiB the domain may grow to (xl's maxmem); 0: = memory
    requests: tuple[Request, ...] = ()  # the toolstack's requests to the running guest
    balloon: BalloonConfig | None = None  # a balloon device, if any
    verdict: str = ""         # "xtf": the toolstack judges the console as xtf-runner does
    sched_seed: int | None = None  # the schedule's seed; None: the seed's
    channels: tuple[ChannelConfig, ...] = ()  # the virtio-console's ports, if any
    disks: tuple[DiskConfig, ...] = ()  # virtio-blk disks, in the guest's order
    vifs: tuple[VifConfig, ...] = ()  # virtio-net devices, in order

    def device_states(self) -> list[dict]:
        """Each virtio device the configuration asks for, as the state its
        kind makes a new device from (hypervisor/devices/kinds.py), in the
        order they go on the bus and the command line."""
        out: list[dict] = []
        if self.balloon is not None:
            out.append(new_balloon_state(self.balloon.stats_interval_ns,
                                         self.balloon.deflate_on_oom, self.balloon.postcopy))
        if self.channels:
            out.append(new_console_state([(c.name, c.connection, c.path)
                                          for c in self.channels]))
        for disk in self.disks:
            out.append(new_blk_state(str(disk.target), disk.read_only,
                                     queue_size=disk.queue_size))
        for vif in self.vifs:
            out.append(new_net_state(vif.mac, vif.backend()))
        return out


@dataclass(frozen=True)
class ChannelConfig:
    """One port of the virtio-console (xl's channel): its name, its host end
    (connection "socket" or "file") and that end's path."""

    name: str
    connection: str
    path: str


@dataclass(frozen=True)
class DiskConfig:
    """One entry of ``disk``, as xl's disk specification reads it."""

    target: Path           # the raw image, absolute
    vdev: str              # xl's virtual device name (xvda); the guest says vda
    read_only: bool = False
    format: str = "raw"
    queue_size: int = BLK_QUEUE_SIZE  # pvlab's queue-size= (QEMU's property of that name)


@dataclass(frozen=True)
class BalloonConfig:
    stats_interval_ns: int = 0  # 0: the host never polls the statistics
    deflate_on_oom: bool = False
    postcopy: str = "drop"      # what the guest's requests do while post-copy runs


@dataclass(frozen=True)
class VifConfig:
    """One network device (xl's vif spec): its MAC and backend."""

    mac: str
    type: str = "user"        # "user" or "socket"
    listen: str = ""          # socket: HOST:PORT or unix:PATH to listen on
    connect: str = ""         # socket: ... or to connect to

    def backend(self) -> dict:
        if self.type == "user":
            return {"type": "user"}
        return {"type": "socket", **({"listen": self.listen} if self.listen
                                     else {"connect": self.connect})}


_VIF_KEYS = ("mac", "type", "listen", "connect")


def parse_vif(spec: str, index: int, src: str = "config", where: Path | None = None
              ) -> VifConfig:
    """``"mac=00:16:3e:00:00:01, type=socket, listen=unix:/tmp/n.sock"``
    (xl's vif spelling: KEY=VALUE items split by commas); a ``unix:`` path
    relative to the configuration file, made absolute."""
    items: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _VIF_KEYS:
            raise ConfigError(f"{src}: vif {spec!r}: {item!r} is not one of "
                              f"{', '.join(k + '=...' for k in _VIF_KEYS)}")
        items[key] = value.strip()
    mac = items.get("mac", f"00:16:3e:00:00:{index + 1:02x}")
    try:
        mac_aton(mac)
    except ValueError as e:
        raise ConfigError(f"{src}: vif {spec!r}: {e}") from None
    if int(mac[:2], 16) & 1:
        raise ConfigError(f"{src}: vif {spec!r}: mac {mac} is a multicast address")
    kind = items.get("type", "user")
    if kind not in ("user", "socket"):
        raise ConfigError(f"{src}: vif {spec!r}: type must be user or socket, not {kind!r}")
    listen, connect = items.get("listen", ""), items.get("connect", "")
    if kind == "socket":
        if bool(listen) == bool(connect):
            raise ConfigError(f"{src}: vif {spec!r}: a socket vif needs one of "
                              "listen=ADDRESS or connect=ADDRESS (HOST:PORT or unix:PATH)")
        try:
            parse_net_address(listen or connect)
        except ValueError as e:
            raise ConfigError(f"{src}: vif {spec!r}: {e}") from None
        if listen.startswith("unix:"):
            listen = "unix:" + _host_path(listen[5:], where)
        if connect.startswith("unix:"):
            connect = "unix:" + _host_path(connect[5:], where)
    elif listen or connect:
        raise ConfigError(f"{src}: vif {spec!r}: listen and connect are for type=socket")
    return VifConfig(mac.lower(), kind, listen, connect)


_KEYS = {"name": str, "memory": int, "vcpus": int, "image": str, "cmdline": str, "seed": int,
         "sched_seed": int, "kernel": str, "maxmem": int, "requests": list, "balloon": dict,
         "verdict": str, "channel": list, "disk": list, "vif": list}
_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list of strings",
               dict: "a table ([balloon])"}
_BALLOON_KEYS = ("stats_interval", "deflate_on_oom", "postcopy")
# xl's disk specification: its keys, and the order of its positional parameters
_DISK_POSITIONAL = ("target", "format", "vdev", "access")
_DISK_PVLAB = ("queue-size",)  # pvlab's keys beyond xl's (QEMU's property of that name)
_DISK_ACCESS = {"rw": False, "w": False, "ro": True, "r": True}
_REQUIRED = ("name", "memory", "image")


def parse_config(data: dict, where: Path | None = None) -> DomainConfig:
    src = str(where) if where else "config"
    for key in data:
        if key not in _KEYS:
            raise ConfigError(f"{src}: unknown key {key!r} (known: {', '.join(_KEYS)})")
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(f"{src}: missing key {key!r}")
    for key, value in data.items():
        want = _KEYS[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{src}: {key} must be {_TYPE_NAMES[want]}, not {value!r}")
    memory, vcpus = data["memory"], data.get("vcpus", 1)
    if not 4 <= memory <= MAX_MEMORY_MIB:
        raise ConfigError(f"{src}: memory is {memory} MiB; it must be 4 to {MAX_MEMORY_MIB}")
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError(f"{src}: vcpus is {vcpus}; it must be 1 to {MAX_VCPUS}")
    if len(data.get("cmdline", "")) > MAX_CMDLINE:
        raise ConfigError(f"{src}: cmdline is longer than {MAX_CMDLINE} characters")
    image = Path(data["image"])
    if where is not None and not image.is_absolute():
        image = where.parent / image
    if not image.exists():
        raise ConfigError(f"{src}: image {str(image)!r} does not exist")
    seed = data.get("seed", 0)
    for key in ("seed", "sched_seed"):
        if data.get(key, 0) < 0:
            raise ConfigError(f"{src}: {key} must not be negative")
    maxmem = data.get("maxmem", memory)
    if not memory <= maxmem <= MAX_MEMORY_MIB:
        raise ConfigError(f"{src}: maxmem is {maxmem} MiB; it must be at least memory "
                          f"({memory} MiB) and at most {MAX_MEMORY_MIB}")
    kernel = data.get("kernel", "")
    if kernel and not all(part.isidentifier() for part in kernel.split(".")):
        raise ConfigError(f"{src}: kernel {kernel!r} is not a Python module name")
    requests = []
    for text in data.get("requests", []):
        if not isinstance(text, str):
            raise ConfigError(f"{src}: requests must be a list of strings, not {text!r}")
        try:
            requests.append(parse_request(text))
        except ValueError as e:
            raise ConfigError(f"{src}: {e}") from None
    balloon = _balloon_config(data["balloon"], src) if "balloon" in data else None
    vifs = []
    for i, spec in enumerate(data.get("vif", [])):
        if not isinstance(spec, str):
            raise ConfigError(f"{src}: vif must be a list of strings, not {spec!r}")
        vifs.append(parse_vif(spec, i, src, where))
    verdict = data.get("verdict", "")
    if verdict and verdict not in VERDICTS:
        raise ConfigError(f"{src}: verdict is {verdict!r}; the one known is \"xtf\"")
    channels = _channels(data.get("channel", []), where, src)
    disks = _disks(data.get("disk", []), src, where)
    return DomainConfig(data["name"], memory, vcpus, image, data.get("cmdline", ""), seed,
                        where, kernel, maxmem, tuple(requests), balloon, verdict,
                        data.get("sched_seed"), channels, disks, tuple(vifs))


_CHANNEL_KEYS = ("name", "connection", "path")
MAX_CHANNELS = 5  # the guest's virtio_console drives ports 0 to 5; port 0 is never a channel


def _channels(specs: list, where: Path | None, src: str) -> tuple[ChannelConfig, ...]:
    """xl's ``channel = ["name=N, connection=socket, path=P", ...]`` (xl.cfg's
    CHANNEL_SPEC_STRING; connection=file is pvlab's: the output to a file).
    At most MAX_CHANNELS: the guest drives ports 0 to 5."""
    if isinstance(specs, list) and len(specs) > MAX_CHANNELS:
        raise ConfigError(f"{src}: channel: {len(specs)} channels; the guest drives at most "
                          f"{MAX_CHANNELS} (ports 1 to {MAX_CHANNELS})")
    out = []
    for spec in specs:
        if not isinstance(spec, str):
            raise ConfigError(f"{src}: channel must be a list of strings such as "
                              f"\"name=NAME, connection=socket, path=PATH\", not {spec!r}")
        fields: dict[str, str] = {}
        for item in spec.split(","):
            key, eq, value = item.strip().partition("=")
            if not eq or key not in _CHANNEL_KEYS:
                raise ConfigError(f"{src}: channel {spec!r}: {item.strip()!r} is not one of "
                                  f"{', '.join(k + '=...' for k in _CHANNEL_KEYS)}")
            fields[key] = value.strip()
        missing = [k for k in _CHANNEL_KEYS if not fields.get(k)]
        if missing:
            raise ConfigError(f"{src}: channel {spec!r}: no {', '.join(missing)}")
        fields["path"] = _host_path(fields["path"], where)
        out.append(ChannelConfig(fields["name"], fields["connection"], fields["path"]))
    why = check_console_ports([{"name": c.name, "connection": c.connection, "path": c.path}
                               for c in out])
    if why:
        raise ConfigError(f"{src}: channel: {why}")
    return tuple(out)


def _host_path(text: str, where: Path | None) -> str:
    """A host file's path, relative to the configuration file, resolved (as
    a disk's target): what a restore elsewhere, in another directory, finds."""
    path = Path(text)
    if where is not None and not path.is_absolute():
        path = where.parent / path
    return str(path.resolve())


def _disks(specs: list, src: str, where: Path | None) -> tuple[DiskConfig, ...]:
    """The ``disk`` list; an image named twice is refused (two devices on one
    file would be two writers)."""
    disks = tuple(parse_disk(spec, src, where) for spec in specs)
    targets = [d.target for d in disks]
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice is not None:
        raise ConfigError(f"{src}: disk: the image {str(twice)!r} is given twice (one image "
                          "is one disk)")
    return disks


def parse_disk(spec: object, src: str = "config", where: Path | None = None) -> DiskConfig:
    """One of xl's disk specifications: comma-separated ``key=value`` items
    and positional ones (target, format, vdev, access, in that order); the
    target relative to the configuration file."""
    if not isinstance(spec, str):
        raise ConfigError(f"{src}: disk must be a list of strings, not {spec!r}")
    values: dict[str, str] = {}
    unknown: list[str] = []
    position = 0
    for item in (part.strip() for part in spec.split(",")):
        key, eq, value = item.partition("=")
        if eq:
            key = key.strip()
            if key not in _DISK_POSITIONAL + _DISK_PVLAB:
                unknown.append(key)
            values[key] = value.strip()
            continue
        if position >= len(_DISK_POSITIONAL):
            raise ConfigError(f"{src}: disk {spec!r}: {item!r} is a fifth positional "
                              f"parameter; xl's are {', '.join(_DISK_POSITIONAL)}")
        if item:
            values.setdefault(_DISK_POSITIONAL[position], item)
        position += 1
    if unknown:
        raise ConfigError(f"{src}: disk {spec!r}: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(_DISK_POSITIONAL + _DISK_PVLAB)})")
    for key in ("target", "vdev"):
        if not values.get(key):
            raise ConfigError(f"{src}: disk {spec!r}: no {key}")
    fmt = values.get("format", "raw")
    if fmt != "raw":
        raise ConfigError(f"{src}: disk {spec!r}: format {fmt!r}; only raw images are known")
    access = values.get("access", "rw")
    if access not in _DISK_ACCESS:
        raise ConfigError(f"{src}: disk {spec!r}: access {access!r}; one of rw, ro")
    target = Path(values["target"])
    if where is not None and not target.is_absolute():
        target = where.parent / target
    if not target.is_file():
        raise ConfigError(f"{src}: disk {spec!r}: the image {str(target)!r} does not exist "
                          "(make one, e.g. truncate -s 1M disk.img)")
    size_text = values.get("queue-size", str(BLK_QUEUE_SIZE))
    queue_size = int(size_text) if size_text.isdigit() else -1
    if (why := check_blk_queue_size(queue_size)) is not None:
        raise ConfigError(f"{src}: disk {spec!r}: queue-size {size_text!r}: "
                          f"{why.split(': ', 1)[1]}")
    return DiskConfig(target.resolve(), values["vdev"], _DISK_ACCESS[access], fmt, queue_size)


def _balloon_config(table: dict, src: str) -> BalloonConfig:
    for key in table:
        if key not in _BALLOON_KEYS:
            raise ConfigError(f"{src}: unknown key balloon.{key} (known: "
                              f"{', '.join(_BALLOON_KEYS)})")
    interval = table.get("stats_interval", "0ms")
    if not isinstance(interval, str):
        raise ConfigError(f"{src}: balloon.stats_interval must be a duration such as "
                          f"\"50ms\", not {interval!r}")
    try:
        ns = parse_duration(interval)
    except ValueError as e:
        raise ConfigError(f"{src}: balloon.stats_interval: {e}") from None
    if 0 < ns < 1_000_000:
        raise ConfigError(f"{src}: balloon.stats_interval is {interval}; make it 0 (never) "
                          "or at least 1ms")
    oom = table.get("deflate_on_oom", False)
    if not isinstance(oom, bool):
        raise ConfigError(f"{src}: balloon.deflate_on_oom must be true or false, not {oom!r}")
    postcopy = table.get("postcopy", "drop")
    if postcopy not in POSTCOPY_POLICIES:
        raise ConfigError(f"{src}: balloon.postcopy must be \"drop\" or \"reconcile\", "
                          f"not {postcopy!r}")
    return BalloonConfig(ns, oom, postcopy)


def load_config(path: str | Path) -> DomainConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it: {e.strerror}") from None
    if raw.startswith(b"\x7fELF"):
        raise ConfigError(f"{p}: this is a guest image, not a domain configuration; name it "
                          f"as `image` in a TOML file (see examples/, e.g. examples/xsa.toml)")
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a TOML text file (it is not UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, p)
