"""``pvlab xl VERB``: xl's verbs (Xen's tools/xl), each a client of ``pvlab daemon``.

Each verb connects to the daemon's socket, sends one or two QMP commands
(docs/protocol.md) and prints what xl prints, in xl's formats: ``list`` has
xl list's columns and state letters, ``vcpu-list`` xl vcpu-list's, ``info``
xl info's ``name : value`` lines. Data goes to stdout; what a verb did goes
to stderr, as xl writes it. A failure is one line on stderr and a non-zero
exit: no daemon (how to start one), a domain that does not exist (xl's
find_domain line), a bad size (xl's parse_mem_size_kb), the daemon's error.

``pvlab console DOM`` is the one verb that is also a top-level command,
the name other tools and docs use for it."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from hypervisor.toolstack import qmp, transport
from hypervisor.toolstack.precopy import Round, progress_line
from hypervisor.toolstack.savefile import XL_HDR, read_xl_header
from hypervisor.toolstack.stream import StreamError

EXIT_OK, EXIT_FAILED = 0, 1

# xl list: the name padded to 40, domid, memory in MiB, VCPUs, the six state
# letters (r b p s c d: running, blocked, paused, shutdown, crashed, dying)
LIST_HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
VCPU_HEADER = (f"{'Name':<32} {'ID':>5} {'VCPU':>5} {'CPU':>5} {'State':>5} {'Time(s)':>9} "
               "Affinity (Hard / Soft)")
# the events that end a domain's wait in ``xl shutdown -w`` (wait_for_domain_deaths)
END_EVENTS = ("SHUTDOWN", "CRASH", "DOMAIN_DESTROYED")
# how long a create, save or restore may take before the verb gives up on
# the daemon (a big guest's save on a busy host); other commands answer at once
LONG_WAIT_S = 3600.0
REMUS_WAIT_S = 30 * 24 * 3600.0   # xl remus lasts as long as the guest runs
# xl remus's flags ("Fbundi:s:N:ecp") pvlab does not build: each refused
REMUS_UNBUILT = {"unsafe": "-F", "blackhole": "-b", "no_netbuf": "-n", "no_diskbuf": "-d",
                 "netbuf_script": "-N", "colo": "-c", "colo_proxy": "-p"}


class DaemonClient(Protocol):
    """What a verb needs of the daemon: qmp.Client's two calls."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> Any: ...

    def next_event(self, timeout: float | None) -> dict[str, Any] | None: ...


class XlError(Exception):
    """A verb's failure, said in one line; the exit code is 1."""


class BadInput(XlError):
    """A bad argument (a size, a file): exit code 2, as pvlab's other verbs."""


# --- sizes -----------------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+)([bkmgt]?)", re.IGNORECASE)
_SIZE_SHIFT = {"b": -10, "k": 0, "": 10, "m": 10, "g": 20, "t": 30}


def parse_mem_size_kb(text: str) -> int:
    """KiB from a size as xl's parse_mem_size_kb reads it: a decimal number
    of MiB, or of bytes, KiB, MiB, GiB, TiB with a b k m g t suffix (either
    case). Unlike strtoll, a sign, spaces or an empty number are refused."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid memory size: {text!r} (a number of MiB, or with a suffix "
                         "b, k, m, g or t: 512k, 64m, 1g)")
    shift = _SIZE_SHIFT[m.group(2).lower()]
    n = int(m.group(1))
    return n << shift if shift >= 0 else n >> -shift


def domain_ref(text: str) -> int | str:
    """A domain as xl names one: all digits is a domid, anything else a name
    (libxl_domain_qualifier_to_domid)."""
    return int(text) if text.isdigit() else text


# --- output formats --------------------------------------------------------------------------

def format_list(rows: Sequence[dict[str, Any]]) -> str:
    """xl list's table (list_domains in tools/xl/xl_info.c)."""
    lines = [LIST_HEADER]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['domid']:5d} {r['memory_mib']:5d} {r['vcpus']:5d}"
                     f"     {r['state']:<6}  {float(r['cpu_time_s']):8.1f}")
    return "\n".join(lines)


def format_list_long(infos: Sequence[dict[str, Any]]) -> str:
    """xl list -l: one JSON array, an object per domain."""
    return json.dumps(list(infos), indent=4)


def format_vcpu_list(rows: Sequence[dict[str, Any]]) -> str:
    """xl vcpu-list's table (print_vcpuinfo in tools/xl/xl_vcpu.c); pvlab
    pins no VCPU, so every affinity is all CPUs."""
    lines = [VCPU_HEADER]
    for r in rows:
        cpu = "-" if r.get("cpu") is None else str(r["cpu"])
        lines.append(f"{r['name']:<32} {r['domid']:5d} {r['vcpu']:5d} {cpu:>5} "
                     f"{r['state']:>5} {float(r['time_s']):9.1f}  all / all")
    return "\n".join(lines)


def format_info(fields: dict[str, Any]) -> str:
    """xl info's ``name : value`` lines, names padded to 23 (output_xeninfo)."""
    return "\n".join(f"{name:<23}: {value}" for name, value in fields.items())


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):.1f} MiB"


# --- the verbs -------------------------------------------------------------------------------

def _existing_file(text: str, what: str) -> str:
    path = Path(text)
    if not path.is_file():
        raise BadInput(f"{text}: no such {what}" if not path.exists() else
                       f"{text} is not a file")
    return str(path.resolve())


def _new_file(text: str) -> str:
    """The save file's absolute path, refused before the domain is touched
    if it cannot be written (xl opens it before the suspend)."""
    path = Path(text)
    if path.is_dir():
        raise BadInput(f"{text} is a directory; name the save file")
    if not path.parent.is_dir():
        raise BadInput(f"{path.parent} does not exist: cannot write {path.name} there")
    return str(path.resolve())


def _info(d: DaemonClient, dom: str) -> dict[str, Any]:
    return d.execute("domain-info", {"domain": domain_ref(dom)})


def xl_create(d: DaemonClient, args: argparse.Namespace) -> int:
    config = _existing_file(args.config, "configuration")
    _say(f"Parsing config from {args.config}")
    made = d.execute("domain-create", {"config": config, "paused": args.paused},
                     timeout=LONG_WAIT_S)
    return _started(d, args, f"Created domain {made['domid']} ({made['name']})", made)


def _started(d: DaemonClient, args: argparse.Namespace, line: str,
             made: dict[str, Any]) -> int:
    """After create or restore: say so, and attach the console with -c."""
    _say(line + (", paused (pvlab xl unpause starts it)" if args.paused else ""))
    if args.console:
        return _attach(d, str(made["domid"]))
    return EXIT_OK


def xl_list(d: DaemonClient, args: argparse.Namespace) -> int:
    if args.domain is not None:
        infos = [_info(d, args.domain)]
    elif args.long:
        infos = _infos(d, [r["domid"] for r in d.execute("domain-list")])
    else:
        infos = d.execute("domain-list")
    print(format_list_long(infos) if args.long else format_list(infos))
    return EXIT_OK


def _infos(d: DaemonClient, domids: list[int]) -> list[dict[str, Any]]:
    """Each domain's details; one destroyed meanwhile is left out, as xl's
    list_domains_details skips a domain whose configuration it cannot get."""
    infos = []
    for domid in domids:
        try:
            infos.append(d.execute("domain-info", {"domain": domid}))
        except qmp.QmpError as e:
            if e.klass != "DomainNotFound":
                raise
    return infos


def xl_console(d: DaemonClient, args: argparse.Namespace) -> int:
    if args.port is not None:
        return _attach_port(d, args.domain, args.port)
    return _attach(d, args.domain)


def _attach_port(d: DaemonClient, dom: str, port: str) -> int:
    """Bridge this terminal to a virtio-console port's socket (as socat
    would) until Ctrl-] or the device closes it."""
    from hypervisor.toolstack.xenconsole import CLOSED, AttachError, attach
    info = _info(d, dom)
    path = d.execute("domain-console", {"domain": info["domid"], "port": port})["path"]
    name = f"domain {info['domid']} ({info['name']}) port {port}"
    try:
        how = attach(Path(path), name, half_close=True)
    except AttachError as e:
        raise XlError(str(e)) from None
    _say(f"\npvlab: {name} closed" if how == CLOSED else
         f"\npvlab: detached from {name}; it runs on")
    return EXIT_OK


def _attach(d: DaemonClient, dom: str) -> int:
    """Bridge this terminal to the domain's console socket until Ctrl-]."""
    from hypervisor.toolstack.xenconsole import CLOSED, AttachError, attach
    info = _info(d, dom)
    path = d.execute("domain-console", {"domain": info["domid"]})["path"]
    try:
        how = attach(Path(path), info["name"])
    except AttachError as e:
        raise XlError(str(e)) from None
    name = f"domain {info['domid']} ({info['name']})"
    _say(f"\npvlab: the console of {name} closed" if how == CLOSED else
         f"\npvlab: detached from the console of {name}; it runs on")
    return EXIT_OK


def xl_save(d: DaemonClient, args: argparse.Namespace) -> int:
    if args.json and not args.live:
        raise BadInput("--json reports a live save's rounds: give --live too")
    file = _new_file(args.file)
    info = _info(d, args.domain)
    _say(f"Saving domain {info['domid']} ({info['name']}) to {args.file}")
    # -p keeps the domain as -c does, paused (xl's save_domain: leavepaused || checkpoint)
    try:
        done = d.execute("domain-save", {"domain": info["domid"], "file": file,
                                         "checkpoint": args.checkpoint or args.paused,
                                         "paused": args.paused, "live": args.live},
                         timeout=LONG_WAIT_S, on_event=live_progress(info["domid"], args))
    except KeyboardInterrupt:
        if not args.live:
            raise
        raise XlError(_cancel(d, info)) from None
    except qmp.QmpError as e:
        # xl's "Failed to save domain, resuming domain": the daemon resumes a
        # guest whose save failed (unless the failure is that it is gone)
        raise XlError(f"failed to save domain {info['domid']} ({info['name']}): "
                      f"{e.desc}") from None
    after = ("is paused" if args.paused else "runs on" if args.checkpoint
             else "is destroyed")
    rounds = f" in {done['rounds']} rounds" if args.live else ""
    _say(f"Saved domain {info['domid']} ({info['name']}) to {args.file}, new xl format "
         f"(info {xl_format_info(file)}): {done['pages']} pages{rounds}, "
         f"{_mib(done['bytes'])}; the domain {after}")
    if args.live and args.json:
        _json_line(d.execute("query-migrate", {"domain": info["name"]}))
    return EXIT_OK


def xl_migrate(d: DaemonClient, args: argparse.Namespace) -> int:
    """xl migrate: the daemon runs xl's migrate_domain to the uri the flags
    make; xl's lines and, on a terminal, a progress line per round come as
    events; a failure is one line (the guest runs on here)."""
    uri = resume_uri(args) if args.resume else migrate_uri(args)
    info = _info(d, args.domain)
    try:
        d.execute("migrate", {"domain": info["domid"], "uri": uri,
                              **({"resume": True} if args.resume else {}),
                              **postcopy_args(args)},
                  timeout=LONG_WAIT_S, on_event=live_progress(info["domid"], args))
    except KeyboardInterrupt:
        raise XlError(_cancel(d, info)) from None
    except qmp.QmpError as e:
        if e.klass == "DomainNotFound":
            raise
        raise XlError(f"migrating domain {info['domid']} ({info['name']}) failed: "
                      f"{e.desc}") from None
    if args.json:
        _json_line(d.execute("query-migrate", {"domain": info["name"]}))
    return EXIT_OK


def postcopy_args(args: argparse.Namespace) -> dict[str, Any]:
    """migrate's arguments for Otto's --postcopy and --precopy-iterations."""
    out: dict[str, Any] = {}
    if args.postcopy:
        out["postcopy"] = True
    if args.precopy_iterations is not None:
        if args.precopy_iterations < 0 or (args.precopy_iterations == 0
                                           and not args.postcopy):
            raise BadInput(f"--precopy-iterations {args.precopy_iterations}: 1 or more "
                           "(0 only with --postcopy: a pure post-copy)")
        out["precopy-iterations"] = args.precopy_iterations
    return out


def xl_migrate_recover(d: DaemonClient, args: argparse.Namespace) -> int:
    """QEMU's migrate-recover for a domain of the daemon whose incoming
    post-copy a drop paused: listen on HOST:PORT for the source's resume
    (``pvlab migrate --resume`` there), then hand the connection to the
    daemon, which shakes hands and lets the domain run on."""
    info = _info(d, args.domain)
    name = f"domain {info['domid']} ({info['name']})"
    if d.execute("query-migrate", {"domain": info["name"]}).get("status") != "postcopy-paused":
        raise XlError(f"{name} has no paused post-copy coming in")
    try:
        host, port = transport.parse_hostport(args.address)
        sock = transport.listen_tcp(host, port)
    except ValueError as e:
        raise BadInput(f"migrate-recover {args.address}: {e}") from None
    except OSError as e:
        raise XlError(f"cannot listen on {args.address}: {e.strerror or e}") from None
    _say(f"migration target: waiting on {host}:{sock.getsockname()[1]} for the source to "
         f"resume the post-copy of {name}")
    ch = transport.accept_one(sock)
    try:
        d.send_fd("migrate-recover", ch.reader.fileno())  # type: ignore[attr-defined]
        done = d.execute("migrate-recover", {"domain": info["domid"],
                                             "uri": "fd:migrate-recover"})
    except qmp.QmpError as e:
        raise XlError(f"recovering the post-copy of {name} failed: {e.desc}") from None
    finally:
        ch.close(wait=False)
    _say(done["line"])
    return EXIT_OK


def _recover_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("address", metavar="HOST:PORT",
                   help="where to wait for the source's resume (its pvlab migrate --resume "
                        "DOM HOST:PORT)")


def _cancel(d: DaemonClient, info: dict[str, Any]) -> str:
    """Ctrl-C while a live job runs: the daemon is asked to cut it (QEMU's
    migrate_cancel); the line to say."""
    name = f"domain {info['domid']} ({info['name']})"
    try:
        d.execute("migrate_cancel", {"domain": info["domid"]})
    except (qmp.QmpError, OSError) as e:
        return f"interrupted; cancelling the job of {name} failed: {e}"
    return f"interrupted: the job of {name} is cancelled; the domain runs on"


def resume_uri(args: argparse.Namespace) -> str:
    """--resume's uri: the target's ``pvlab migrate-receive`` waits for it on
    TCP (its --listen or --recover address), given as HOST:PORT or --tcp."""
    where = args.tcp if args.tcp is not None else args.host
    if where is None or (args.tcp is not None and args.host is not None):
        raise BadInput("--resume: give the HOST:PORT the target waits on (once)")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--resume {where}: give HOST:PORT, where the target waits for the "
                       "resume")
    return f"tcp:{where}"


def migrate_uri(args: argparse.Namespace) -> str:
    """The daemon's uri for xl migrate's flags: ``tcp:HOST:PORT`` with --tcp,
    else xl's rune as exec: (``exec SSH HOST pvlab migrate-receive[ -e][ -p]``;
    ``-s CMD`` replaces ssh; an empty -s makes HOST the whole command, with
    no flags, as xl's)."""
    if args.config is not None:
        raise BadInput("-C: sending another configuration than the domain's is not built "
                       "in pvlab; migrate without it")
    if args.debug:
        raise BadInput("--debug: xl's verify pass is not built in pvlab; migrate without it")
    if args.tcp is not None:
        if args.host is not None or args.ssh is not None or args.no_monitor or args.paused:
            raise BadInput("--tcp HOST:PORT talks to `pvlab migrate-receive --listen`, "
                           "which takes -p and -e itself: give no HOST, -s, -e or -p")
        return tcp_uri(args.tcp)
    if args.host is None:
        raise BadInput("give the HOST to migrate to (or --tcp HOST:PORT)")
    if args.ssh == "":
        return f"exec:{args.host}"
    # main_migrate's rune, the receiver's flags in xl's order
    flags = (" -e" if args.no_monitor else "") + (" -p" if args.paused else "")
    return f"exec:exec {args.ssh or 'ssh'} {args.host} {transport.RECEIVER}{flags}"


def xl_remus(d: DaemonClient, args: argparse.Namespace) -> int:
    """xl remus: the daemon replicates the domain to the backup the flags
    name (a live job, epochs every -i MS) until the guest shuts down, the
    backup fails ("Backup failed? resuming domain at primary.", exit 1),
    the domain is destroyed ("Primary domain has been destroyed.") or
    Ctrl-C (migrate_cancel: the stream ended cleanly, the guest runs on)."""
    uri = remus_uri(args)
    info = _info(d, args.domain)
    try:
        done = d.execute("remus", {"domain": info["domid"], "uri": uri,
                                   "interval": args.interval},
                         timeout=REMUS_WAIT_S, on_event=live_progress(info["domid"], args))
    except KeyboardInterrupt:
        d.execute("migrate_cancel", {"domain": info["domid"]})
        raise XlError(f"interrupted: Remus of domain {info['domid']} ({info['name']}) is "
                      "ended; the backup destroys its copy, the domain runs on") from None
    except qmp.QmpError as e:
        if e.klass == "DomainNotFound":
            raise
        raise XlError(e.desc) from None
    _say(done["line"])
    return EXIT_OK


def tcp_uri(address: str) -> str:
    """--tcp HOST:PORT as the daemon's uri (BadInput if it is not that)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--tcp {address}: give HOST:PORT")
    return f"tcp:{address}"


def remus_uri(args: argparse.Namespace) -> str:
    """The daemon's uri for xl remus's flags: ``tcp:HOST:PORT`` with --tcp,
    else main_remus's rune as exec: (``exec SSH HOST pvlab migrate-receive
    -r[ -e]``; an empty -s makes HOST the whole command)."""
    for name, flag in REMUS_UNBUILT.items():
        if getattr(args, name):
            raise BadInput(f"remus {flag}: not built in pvlab (no network or disk buffering, "
                           "no COLO: the console is the output Remus holds)")
    if args.interval is not None and args.interval <= 0:
        raise BadInput(f"-i {args.interval}: the interval is a number of milliseconds, more "
                       "than 0")
    if args.tcp is not None:
        if args.host is not None or args.ssh is not None or args.no_monitor:
            raise BadInput("--tcp HOST:PORT talks to `pvlab migrate-receive -r --listen`: "
                           "give no HOST, -s or -e")
        return tcp_uri(args.tcp)
    if args.host is None:
        raise BadInput("give the backup's HOST (or --tcp HOST:PORT)")
    if args.ssh == "":
        return f"exec:{args.host}"
    flags = " -r" + (" -e" if args.no_monitor else "")
    return f"exec:exec {args.ssh or 'ssh'} {args.host} {transport.RECEIVER}{flags}"


def live_progress(domid: int, args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """What a verb shows of a live job's events for ``domid``: with --json
    each round's query-migrate fields as a JSON line on stdout; on a terminal
    libxc's progress line per round (precopy.progress_line) on stderr; xl's
    messages (MIGRATION_MESSAGE) on stderr."""
    tty = sys.stderr.isatty()

    def show(event: dict[str, Any]) -> None:
        data = dict(event.get("data") or {})
        if data.pop("domid", None) != domid:
            return
        data.pop("name", None)
        if event["event"] == "MIGRATION_MESSAGE":
            _say(str(data.get("text", "")))
        elif event["event"] == "MIGRATION_ROUND":
            done = data.pop("round")
            if getattr(args, "json", False):
                _json_line(data)
            elif tty:
                ram = data.get("ram") or {}
                total = ram.get("total", 0) // max(ram.get("page-size", 1), 1)
                _say(progress_line(Round(**done), total))
    return show


def _json_line(fields: dict[str, Any]) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


def xl_format_info(file: str) -> str:
    """The save file's header as xl's save and restore print it: mandatory
    flags / optional flags / length of the optional data
    (save_domain_core_writeconfig)."""
    try:
        with open(file, "rb") as f:
            hdr = read_xl_header(f)
    except (OSError, StreamError) as e:
        raise BadInput(f"{file}: {e}") from None
    return f"{hdr.mandatory_flags:#x}/{hdr.optional_flags:#x}/{hdr.end - XL_HDR.size}"


def xl_restore(d: DaemonClient, args: argparse.Namespace) -> int:
    file = _existing_file(args.file, "save file")
    _say(f"Loading new save file {args.file} (new xl fmt info {xl_format_info(file)})")
    made = d.execute("domain-restore", {"file": file, "paused": args.paused},
                     timeout=LONG_WAIT_S)
    return _started(d, args, f"Restored domain {made['domid']} ({made['name']}) from "
                    f"{args.file}", made)


def _size_kib(text: str) -> int:
    try:
        return parse_mem_size_kb(text)
    except ValueError as e:
        raise BadInput(str(e)) from None


def xl_mem_set(d: DaemonClient, args: argparse.Namespace) -> int:
    kib = _size_kib(args.size)
    d.execute("domain-mem-set", {"domain": domain_ref(args.domain), "kib": kib})
    return EXIT_OK


def xl_mem_max(d: DaemonClient, args: argparse.Namespace) -> int:
    kib = _size_kib(args.size)
    d.execute("domain-mem-max", {"domain": domain_ref(args.domain), "kib": kib})
    return EXIT_OK


def _simple(command: str) -> Callable[[DaemonClient, argparse.Namespace], int]:
    """A verb that is one command on one domain and prints nothing, as xl's."""
    def verb(d: DaemonClient, args: argparse.Namespace) -> int:
        d.execute(command, {"domain": domain_ref(args.domain)})
        return EXIT_OK
    return verb


def _shutdown(reason: str) -> Callable[[DaemonClient, argparse.Namespace], int]:
    """xl shutdown / reboot: write the request; with -w wait for the domain's
    SHUTDOWN (or its crash or destruction) as wait_for_domain_deaths does."""
    def verb(d: DaemonClient, args: argparse.Namespace) -> int:
        info = _info(d, args.domain)
        what = "Rebooting" if reason == "reboot" else "Shutting down"
        _say(f"{what} domain {info['domid']} ({info['name']})")
        d.execute("domain-shutdown", {"domain": info["domid"], "reason": reason})
        if args.wait:
            _say(_wait_for_end(d, info["domid"]))
        return EXIT_OK
    return verb


def _wait_for_end(d: DaemonClient, domid: int) -> str:
    """The line that says how the domain ended, once an event says it did."""
    while True:
        event = d.next_event(None)
        if event is None:
            raise XlError(f"the daemon went away before domain {domid} shut down")
        data = event.get("data") or {}
        if event.get("event") not in END_EVENTS or data.get("domid") != domid:
            continue
        if event["event"] == "SHUTDOWN":
            return f"Domain {domid} has been shut down ({data.get('reason', 'unknown')})"
        if event["event"] == "CRASH":
            return f"Domain {domid} has crashed"
        return f"Domain {domid} has been destroyed"


def xl_vcpu_list(d: DaemonClient, args: argparse.Namespace) -> int:
    if not args.domains:
        rows = d.execute("domain-vcpu-list", {})
    else:
        rows = [row for dom in args.domains for row in _vcpus_of(d, dom)]
    print(format_vcpu_list(rows))
    return EXIT_OK


def _vcpus_of(d: DaemonClient, dom: str) -> list[dict[str, Any]]:
    try:
        return d.execute("domain-vcpu-list", {"domain": domain_ref(dom)})
    except qmp.QmpError as e:
        if e.klass == "DomainNotFound":
            raise XlError(invalid_domain(dom)) from None
        raise


def xl_info(d: DaemonClient, args: argparse.Namespace) -> int:
    print(format_info(d.execute("host-info")))
    return EXIT_OK


def xl_dmesg(d: DaemonClient, args: argparse.Namespace) -> int:
    text = d.execute("host-dmesg", {"clear": args.clear})["text"]
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    return EXIT_OK


def receive_into_daemon(client: qmp.Client, reader_fd: int, writer_fd: int,
                        paused: bool = False,
                        say: Callable[[str], None] | None = None,
                        postcopy: bool = True) -> dict[str, Any]:
    """``pvlab migrate-receive`` when a daemon runs here: the wire's
    descriptors handed to it (QEMU's getfd: SCM_RIGHTS over its socket), then
    migrate-incoming, so that the domain lives in the daemon. One
    descriptor for a socket, two for ssh's pipes. ``say`` gets the
    receiver's lines as they come; ``postcopy`` False refuses a post-copy
    stream. Returns the answer (domid, name, the receiver's lines; for a
    post-copy, once the domain runs there while its pages come); QmpError
    says why not."""
    client.send_fd("migrate-in", reader_fd)
    names = "migrate-in"
    if writer_fd != reader_fd:
        client.send_fd("migrate-out", writer_fd)
        names += ",migrate-out"
    def tell(event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("event") == "MIGRATION_MESSAGE" and data.get("domid") is None and say:
            say(str(data.get("text", "")))
    return client.execute("migrate-incoming", {"uri": f"fd:{names}", "paused": paused,
                                               "postcopy": postcopy},
                          timeout=LONG_WAIT_S, on_event=tell)


def receiving_daemon(socket: str | None, in_process: bool) -> qmp.Client | None:
    """The daemon ``pvlab migrate-receive`` hands its wire to: the one at
    ``socket`` (BadInput if none answers there), else the one at the default
    socket if it answers; None with ``in_process`` or when none runs."""
    if in_process:
        return None
    path = Path(socket) if socket else qmp.default_socket()
    try:
        return qmp.Client(path, timeout=None)
    except (qmp.DaemonNotRunning, OSError, qmp.QmpError) as e:
        if socket:
            raise BadInput(f"--socket {socket}: {e}") from None
        return None


def receive_in_daemon(client: qmp.Client, channel: Any, paused: bool,
                      postcopy: bool = True) -> int:
    """The wire handed to the daemon; its receiver's lines said here, on
    stderr, which ssh relays to the sender (xl's "migration target: ..."
    lines). 0 once the domain runs there, 1 if not (the one line why)."""
    try:
        done = receive_into_daemon(client, channel.reader.fileno(), channel.writer.fileno(),
                                   paused, _say, postcopy)
    except (qmp.QmpError, OSError) as e:
        _say(f"migration target: {e}")
        return EXIT_FAILED
    finally:
        channel.close(wait=False)
        client.close()
    pages = "; its pages follow it there (post-copy)" if done.get("postcopy") else ""
    _say(f"migration target: domain {done['domid']} ({done['name']}) runs in the daemon at "
         f"{client.path}{pages}")
    return EXIT_OK


# --- connecting, and the one-line failures ---------------------------------------------------

def connect(socket: str | None) -> DaemonClient:
    """A client of the daemon at ``socket`` (default: qmp.default_socket())."""
    return qmp.Client(Path(socket) if socket else qmp.default_socket())


class _Connection:
    """The daemon, connected to on a verb's first command: a verb checks its
    own arguments first, so a bad size is said as such with no daemon."""

    def __init__(self, socket: str | None) -> None:
        self.socket = socket
        self.client: Any = None

    def _client(self) -> Any:
        if self.client is None:
            self.client = connect(self.socket)
        return self.client

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> Any:
        return self._client().execute(command, arguments, timeout=timeout, on_event=on_event)

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        return self._client().next_event(timeout)

    def send_fd(self, name: str, fd: int) -> None:
        """QMP's getfd: ``fd`` passed to the daemon under ``name``."""
        self._client().send_fd(name, fd)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def run_verb(args: argparse.Namespace) -> int:
    """Run the verb ``args`` names; every failure is one line on stderr."""
    daemon = _Connection(args.socket)
    try:
        return args.xl_verb(daemon, args)
    except qmp.DaemonNotRunning as e:
        _say(f"pvlab: {e}")
    except qmp.QmpError as e:
        _say(f"pvlab: {_qmp_error_line(e, args)}")
    except BadInput as e:
        _say(f"pvlab: {e}")
        return 2
    except XlError as e:
        _say(f"pvlab: {e}")
    except OSError as e:
        _say(f"pvlab: {_lost_line(e, args.socket or str(qmp.default_socket()))}")
    finally:
        daemon.close()
    return EXIT_FAILED


def _lost_line(e: OSError, socket: str) -> str:
    """The connection's failure as one line that names the daemon once."""
    if isinstance(e, TimeoutError):
        return f"the daemon at {socket} did not answer in time"
    text = str(e) if e.strerror is None else e.strerror
    if text.startswith("the daemon at "):  # the Client's own line
        return text
    return f"the daemon at {socket}: {text}"


def _qmp_error_line(e: Any, args: argparse.Namespace) -> str:
    """The daemon's error as one line; a missing domain as xl's find_domain
    says it."""
    if e.klass == "DomainNotFound" and getattr(args, "domain", None) is not None:
        return invalid_domain(args.domain)
    return e.desc


def invalid_domain(dom: str) -> str:
    """xl's line for a name or domid no domain has (find_domain)."""
    return f"{dom} is an invalid domain identifier (no domain has that name or domid)"


# --- the command line ------------------------------------------------------------------------

SIZE_HELP = ("a number of MiB, or of bytes, KiB, MiB, GiB or TiB with the suffix b, k, m, g "
             "or t (as xl: 512k, 64m, 1g)")


def _dom(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOM", help="the domain: its name or its domid")


def _console_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("--port", metavar="NAME",
                   help="a virtio-console port of the domain (a channel of its "
                        "configuration whose connection is a socket) instead of its console: "
                        "the bytes go both ways untouched, and the guest's read of the port "
                        "ends (end of file) when you detach")


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="the domain's configuration (TOML)")
    p.add_argument("-c", dest="console", action="store_true",
                   help="attach to the domain's console once it is created (Ctrl-] detaches)")
    p.add_argument("-p", dest="paused", action="store_true",
                   help="leave the domain paused once built (xl unpause DOM starts it)")


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-l", "--long", action="store_true",
                   help="every detail of each domain, as one JSON array")
    p.add_argument("domain", metavar="DOM", nargs="?", help="only this domain")


def _save_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("file", metavar="FILE", help="the save file to write")
    p.add_argument("-c", dest="checkpoint", action="store_true",
                   help="leave the domain running once saved (a checkpoint)")
    p.add_argument("-p", dest="paused", action="store_true",
                   help="leave the domain paused once saved")
    p.add_argument("--live", action="store_true",
                   help="save while the domain runs: pre-copy rounds of the pages it "
                        "dirties, then a short suspend for the last (xl migrate's loop, "
                        "into a file); on a terminal a progress line per round")
    p.add_argument("--json", action="store_true",
                   help="with --live: each round's query-migrate fields as a JSON line "
                        "on stdout, then the final ones")


def _restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a save file (xl save's or pvlab save's)")
    p.add_argument("-p", dest="paused", action="store_true",
                   help="leave the restored domain paused (xl unpause DOM starts it)")
    p.add_argument("-c", dest="console", action="store_true",
                   help="attach to the domain's console once it is restored")


def _migrate_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("host", metavar="HOST", nargs="?",
                   help="the host to migrate to: `ssh HOST pvlab migrate-receive` is run "
                        "there, its stdin and stdout the wire (xl's way)")
    p.add_argument("-s", dest="ssh", metavar="CMD",
                   help="run CMD instead of ssh; an empty CMD runs HOST itself as the "
                        "command")
    p.add_argument("-e", dest="no_monitor", action="store_true",
                   help="passed on to migrate-receive (xl's: it does not daemonise; "
                        "pvlab's receiver never does)")
    p.add_argument("-p", dest="paused", action="store_true",
                   help="leave the domain paused on the target")
    p.add_argument("-C", dest="config", metavar="CFG",
                   help="xl's: send CFG instead of the domain's configuration (not built: "
                        "refused)")
    p.add_argument("--debug", action="store_true",
                   help="xl's verify pass (not built: refused)")
    p.add_argument("--live", action="store_true",
                   help="accepted and ignored, as xl does (migration is always live)")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="connect to `pvlab migrate-receive --listen HOST:PORT` there "
                        "instead of running it over ssh")
    p.add_argument("--json", action="store_true",
                   help="each round's query-migrate fields as a JSON line on stdout, then "
                        "the final ones")
    p.add_argument("--postcopy", action="store_true",
                   help="post-copy where the pre-copy rounds would stop (Otto's xl "
                        "migrate --postcopy): the guest suspends once, starts at the target, "
                        "and its pages follow, each sent once")
    p.add_argument("--precopy-iterations", metavar="N", type=int,
                   help="at most N pre-copy rounds (Xen's 5 by default; 0 with --postcopy: "
                        "a pure post-copy, no round)")
    p.add_argument("--resume", action="store_true",
                   help="go on with the domain's post-copy migration that a dropped "
                        "connection paused (QEMU's migrate resume=true): HOST is then the "
                        "HOST:PORT where the target's migrate-receive waits (its --listen "
                        "or --recover address)")


def _remus_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("host", metavar="HOST", nargs="?",
                   help="the backup's host: `ssh HOST pvlab migrate-receive -r` is run there, "
                        "its stdin and stdout the wire (xl's way)")
    p.add_argument("-i", dest="interval", metavar="MS", type=int,
                   help="an epoch every MS milliseconds (default 200, as xl's)")
    p.add_argument("-s", dest="ssh", metavar="CMD",
                   help="run CMD instead of ssh; an empty CMD runs HOST itself as the command")
    p.add_argument("-e", dest="no_monitor", action="store_true",
                   help="passed on to migrate-receive (xl's: it does not daemonise)")
    p.add_argument("-u", dest="uncompressed", action="store_true",
                   help="accepted and ignored: xl's checkpoint compression is not built in "
                        "Xen either")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="connect to `pvlab migrate-receive -r --listen HOST:PORT` there "
                        "instead of running it over ssh")
    for name, flag in REMUS_UNBUILT.items():
        if flag == "-N":   # xl's netbuf script
            p.add_argument(flag, dest=name, metavar="SCRIPT", help="xl's; not built: refused")
        else:
            p.add_argument(flag, dest=name, action="store_true", help="xl's; not built: refused")
    p.add_argument("--json", action="store_true",
                   help="each epoch's query-migrate fields as a JSON line on stdout")


def _size_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("size", metavar="SIZE", help=SIZE_HELP)


def _wait_args(p: argparse.ArgumentParser) -> None:
    _dom(p)
    p.add_argument("-w", "--wait", action="store_true",
                   help="wait until the domain has shut down (or crashed, or is destroyed)")


def _vcpu_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domains", metavar="DOM", nargs="*",
                   help="only these domains (default: every domain)")


def _dmesg_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", dest="clear", action="store_true",
                   help="clear the log after printing it")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


CONSOLE_HELP = ("Attach this terminal to the domain's console: what you type goes to the "
                "guest (its tty echoes and edits the line), its output comes here; Ctrl-] "
                "detaches and the domain runs on. Input that is no terminal is passed on as "
                "it comes, and its end is typed as Ctrl-D. Several people may attach to one "
                "domain at once. With --port NAME the terminal goes to that virtio-console "
                "port's socket instead (one client at a time; `socat - UNIX-CONNECT:PATH` "
                "does the same).")

MIGRATE_HELP = ("Move the running domain to HOST, as xl migrate: the daemon sends it live "
                "(pre-copy rounds while it runs, then a short suspend) to `pvlab "
                "migrate-receive` run over ssh on HOST (or, with --tcp, listening there); "
                "once the target has started it, it is gone from here. If anything fails "
                "the domain runs on here and the verb says why (exit 1). With --postcopy "
                "the guest suspends where the rounds would stop, starts at the target and "
                "its pages follow it there; a failure after that switch keeps the copy here "
                "suspended as NAME--postcopy-inconsistent, and a dropped connection pauses "
                "the migration: --resume DOM HOST:PORT goes on with it.")

RECOVER_HELP = ("A post-copy migration into the daemon whose connection dropped leaves its "
                "domain paused with its missing pages. Wait on HOST:PORT for the source's "
                "resume (pvlab migrate --resume DOM HOST:PORT on the source's host), hand "
                "the connection to the daemon: the pages lost in flight come again and the "
                "domain runs on. One line and exit 1 if the domain has no paused post-copy "
                "or the resume is refused.")

REMUS_HELP = ("Keep a copy of the running domain on a backup, as xl remus: the daemon "
              "sends it live to `pvlab migrate-receive -r` run over ssh on HOST (or, with "
              "--tcp, listening there), then every -i MS an epoch of what changed; the "
              "domain's console shows an epoch's output only once the backup has it. If "
              "this host dies the backup runs the domain on from the last epoch; if the "
              "backup dies the domain runs on here (exit 1). Ctrl-C ends the copy.")

# name, verb, one line for the verb list, the description, its arguments
VERBS: list[tuple[str, Callable[[DaemonClient, argparse.Namespace], int], str, str,
                  Callable[[argparse.ArgumentParser], None]]] = [
    ("create", xl_create, "build a domain from a configuration and start it",
     "Build the domain CONFIG describes in the daemon and start it.", _create_args),
    ("list", xl_list, "list the domains",
     "One line per domain: name, domid, memory (MiB), VCPUs, state and CPU time. The "
     "state letters: r running, b blocked, p paused, s shut down, c crashed, d dying.",
     _list_args),
    ("console", xl_console, "attach to a domain's console, or to a virtio-console port",
     CONSOLE_HELP, _console_args),
    ("save", xl_save, "save a domain to a file, to restore later",
     "Suspend the domain and write its state to FILE (an xl save file); the domain is "
     "then destroyed, unless -c or -p keeps it.", _save_args),
    ("migrate", xl_migrate, "move a running domain to another host",
     MIGRATE_HELP, _migrate_args),
    ("remus", xl_remus, "keep a running domain's copy on a backup host (Remus)",
     REMUS_HELP, _remus_args),
    ("restore", xl_restore, "build a domain from a save file",
     "Build a new domain from FILE and let it run on from where it was saved.",
     _restore_args),
    ("mem-set", xl_mem_set, "set a domain's memory target",
     "Ask the domain's balloon driver to bring its memory to SIZE; the driver may not get "
     "there (xl list shows the memory it has).", _size_args),
    ("mem-max", xl_mem_max, "set the most memory a domain may have",
     "Set the ceiling of the domain's memory to SIZE.", _size_args),
    ("pause", _simple("domain-pause"), "stop running a domain's VCPUs",
     "Stop scheduling the domain's VCPUs until xl unpause.", _dom),
    ("unpause", _simple("domain-unpause"), "let a paused domain run",
     "Let the domain's VCPUs run again.", _dom),
    ("shutdown", _shutdown("poweroff"), "ask a domain to power off",
     "Ask the domain's kernel to power off (control/shutdown = poweroff).", _wait_args),
    ("reboot", _shutdown("reboot"), "ask a domain to reboot",
     "Ask the domain's kernel to reboot (control/shutdown = reboot).", _wait_args),
    ("destroy", _simple("domain-destroy"), "end a domain at once",
     "End the domain now, without asking its kernel, and free its memory.", _dom),
    ("vcpu-list", xl_vcpu_list, "list the VCPUs of the domains",
     "One line per VCPU: its domain, number, CPU, state (r running, b blocked, p offline) "
     "and CPU time.", _vcpu_list_args),
    ("info", xl_info, "facts about the host",
     "The daemon's hypervisor, its version and its memory, as xl info's lines.", _no_args),
    ("dmesg", xl_dmesg, "print the hypervisor's log",
     "Print what the daemon's hypervisor has logged.", _dmesg_args),
]


def _add_verb(sub: Any, name: str, verb: Callable[[DaemonClient, argparse.Namespace], int],
              summary: str, description: str,
              arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(name, help=summary, description=description)
    arguments(p)
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's socket (default: $XDG_RUNTIME_DIR/pvlab/pvlab.sock, "
                        "else /tmp/pvlab-UID/pvlab.sock)")
    p.set_defaults(func=run_verb, xl_verb=verb)


def add_parsers(sub: Any) -> None:
    """``pvlab xl VERB`` for each verb, and ``pvlab console``."""
    xl = sub.add_parser("xl", help="xl's verbs on the domains of a running pvlab daemon",
                        description="xl's verbs, each a client of a running `pvlab daemon` "
                                    "(start one with `pvlab daemon --detach`). DOM is a "
                                    "domain's name or its domid. Exit 0 when the verb did "
                                    "what it says, 1 when it failed, 2 for bad input.")
    verbs = xl.add_subparsers(dest="xl_name", metavar="VERB", required=True)
    for spec in VERBS:
        _add_verb(verbs, *spec)
    _add_verb(sub, "console", xl_console, "attach to the console of a domain in the daemon, "
              "or to one of its virtio-console ports (pvlab xl console)", CONSOLE_HELP,
              _console_args)
    _add_verb(sub, "migrate", xl_migrate, "move a running domain of the daemon to another "
              "host (pvlab xl migrate)", MIGRATE_HELP, _migrate_args)
    _add_verb(sub, "migrate-recover", xl_migrate_recover, "let a post-copy migration into "
              "the daemon that a dropped connection paused go on (QEMU's migrate-recover)",
              RECOVER_HELP, _recover_args)
    _add_verb(sub, "remus", xl_remus, "keep a copy of a running domain of the daemon on a "
              "backup host (pvlab xl remus)", REMUS_HELP, _remus_args)
