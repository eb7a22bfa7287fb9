"""The ``pvlab`` command line (verbs named as xl names them where xl has one)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hypervisor import domctl
from hypervisor.domctl import Domain, Hypervisor
from hypervisor.toolstack import gdbsx, xl
from hypervisor.toolstack.builder import BuildError
from hypervisor.toolstack.config import ConfigError, load_config
from hypervisor.toolstack.context import audit
from hypervisor.toolstack.control import (
    MIGRATE,
    REMUS,
    SAVE,
    SAVE_LIVE,
    Request,
    parse_request,
)
from hypervisor.toolstack.elfimage import ImageError
from hypervisor.toolstack.gdbsx import GdbKill
from hypervisor.toolstack.precopy import (
    DEFAULT_BANDWIDTH,
    SPP_MAX_ITERATIONS,
    SPP_TARGET_DIRTY_COUNT,
    MigrationInfo,
    PrecopyOptions,
    progress_line,
)
from hypervisor.toolstack.restore import RestoreError
from hypervisor.toolstack.session import (
    RunResult,
    boot,
    check_parting,
    run_domain,
    run_to_parting,
)
from hypervisor.toolstack.stream import StreamError
from hypervisor.toolstack.timeparse import format_duration, parse_duration

EXIT_OK, EXIT_GUEST_FAILED, EXIT_USAGE = 0, 1, 2
ENDING = (SAVE, SAVE_LIVE, MIGRATE)  # requests after which the domain is gone from here


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _stream(dom: Domain, data: bytes) -> None:
    # called inside the guest's hypercall: a reader gone (``| head``) must not
    # crash the guest; the run goes on, its console discarded
    try:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()


def _note(msg: str) -> None:
    sys.stdout.write(f"[toolstack] {msg}\n")
    sys.stdout.flush()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _request(text: str) -> Request:
    try:
        return parse_request(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _make_dir(path: str) -> Path:
    """A directory for images, made if need be; a clear error if it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"{out} is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot make {out}: {e.strerror or e}") from None
    return out


def _checkpoint_dir(args: argparse.Namespace) -> None:
    if args.checkpoint_dir is not None:
        _make_dir(args.checkpoint_dir)


def _gdb_needs_counted_slices(args: argparse.Namespace, clock: str) -> None:
    if args.gdb is not None and clock == "fast":
        raise CliError("--gdb needs the deterministic clock: leave out --fast "
                       "(with --console, add --deterministic)")


def _clock(args: argparse.Namespace) -> str:
    """Fast with --fast, and with --console unless --deterministic."""
    if args.deterministic and args.fast:
        raise CliError("--fast and --deterministic: choose one clock")
    fast = args.fast or (args.console and not args.deterministic)
    return "fast" if fast else "deterministic"


def cmd_run(args: argparse.Namespace) -> int:
    _checkpoint_dir(args)
    cfg = load_config(args.config)
    requests = [*cfg.requests, *args.request]
    _save_request(requests, args.until)
    clock = _clock(args)
    _gdb_needs_counted_slices(args, clock)
    _check_parting_args(args.config, args.sched_from, args.until, "--sched-from")
    _check_inject_args(args.inject_every, args.inject_kind, args.inject_slices)
    if args.sched_from is not None and args.sched_seed is None:
        raise CliError("--sched-from needs --sched-seed: the schedule from that time on")
    if args.inject_phase and not args.inject_every:
        raise CliError("--inject-phase needs --inject-every")
    parting = args.sched_from is not None
    hv, dom = boot(cfg, seed=args.seed, clock=clock,
                   sched_seed=None if parting else args.sched_seed)
    try:
        return _run_booted(hv, dom, cfg.verdict, requests, args)
    finally:
        hv.close()  # the devices' host files and sockets, whatever the outcome


def _run_booted(hv: Hypervisor, dom: Domain, verdict: str, requests: list[Request],
                args: argparse.Namespace) -> int:
    """``pvlab run`` once the domain is built."""
    parting = args.sched_from is not None
    if args.trace:
        from hypervisor.toolstack.trace import Tracer
        Tracer(hv, dom, args.trace, sys.stdout).attach()
    injectors = (domctl.virtio_injectors(hv, dom, args.inject_every, 0, args.inject_kind,
                                         "slice" if args.inject_slices else "access")
                 if args.inject_every else [])
    if parting:
        # explore's forked runs: the configuration's schedule to the parting
        requests = run_to_parting(hv, dom, args.sched_from, requests, _stream, _note)
        domctl.reseed_schedule(hv, args.sched_seed)
    for inj in injectors:
        inj.phase = args.inject_phase
        inj.arm()
    return _run_or_save(hv, dom, requests, args, verdict)


def _gdb_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is no TCP port (0-65535; 0: any free one)")
    return port


def _attach_gdb(hv: Hypervisor, dom: Domain, port: int | None) -> gdbsx.GdbServer | None:
    """With --gdb: listen on 127.0.0.1, say where, wait for gdb and serve it
    until it lets the guest run (None without --gdb)."""
    if port is None:
        return None
    try:
        sock = gdbsx.listen(port)
    except OSError as e:
        raise CliError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
    print(f"pvlab: waiting for gdb on 127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr,
          flush=True)
    server = gdbsx.GdbServer(hv, dom, gdbsx.accept(sock))
    server.attach()
    return server


def _save_request(requests: list[Request], until: int | None) -> Request | None:
    """The one ``save PATH`` or ``migrate DEST`` request, checked before the
    guest boots: its directory exists (its target reads), no other shutdown
    or checkpoint is asked, and nothing after it (the domain is gone)."""
    saves = [r for r in requests if r.command in ENDING]
    if not saves:
        return None
    if len(saves) > 1:
        raise CliError("at most one save request (save, save-live or migrate): the domain is "
                       "gone after it")
    save = saves[0]
    if save.command == MIGRATE:
        _destination(save.value)
    else:
        _image_dest(save.value)
    later = [r for r in requests if r.at_ns >= save.at_ns and r is not save]
    if later:
        raise CliError(f"a request at {format_duration(later[0].at_ns)} comes after the "
                       f"{save.command} at {format_duration(save.at_ns)}: the domain is gone "
                       "by then")
    shutdown = [r for r in requests if r.shutdown]
    if shutdown:
        # suspend_and_save makes only requests that leave the guest running
        raise CliError(f"a {shutdown[0].command} request and a {save.command} request: the "
                       f"{save.command} is the run's one shutdown")
    if until is not None and until < save.at_ns:
        raise CliError(f"--until {format_duration(until)} stops the guest before its "
                       f"{save.command} at {format_duration(save.at_ns)}")
    return save


def _destination(text: str) -> Any:
    from hypervisor.toolstack.transport import parse_destination
    try:
        return parse_destination(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def _run_or_save(hv: Hypervisor, dom: Domain, requests: list[Request],
                 args: argparse.Namespace, verdict: str = "") -> int:
    """What ``run`` and ``restore`` do once the domain exists: run it, or,
    with a save request, run it to the save as ``pvlab save`` does. A run whose
    configuration asks for a verdict exits with it."""
    save = _save_request(requests, args.until)
    if save is not None and args.console and save.command == MIGRATE:
        raise CliError("--console and a migrate request: the migration ends the run here; "
                       "the guest's console is the receiver's then")
    if save is not None and args.console:
        raise CliError("--console and a save request: the save ends the run; attach to "
                       "the restored domain instead (pvlab restore IMAGE --console)")
    remus = _remus_request(requests, save)
    if remus is not None and args.console:
        raise CliError("--console and a remus request: the console's output is held "
                       "for Remus's output commit; run without --console")
    gdb = _attach_gdb(hv, dom, args.gdb)
    reason = "running"
    try:
        if remus is not None:
            return _remus(hv, dom, remus, [r for r in requests if r is not remus], args.until)
        if save is None and args.console:
            return _run_attached(hv, dom, requests, args)
        if save is None:
            result = run_domain(hv, dom, args.until, _stream, requests, _note,
                                checkpoint_dir=args.checkpoint_dir)
            reason = result.reason
            code = _exit_for(result, dom, args.until)
            return _judge(result, dom) if verdict else code
        others = [r for r in requests if r is not save]
        if save.command == MIGRATE:
            return _migrate(hv, dom, save, others, args)
        if save.command == SAVE_LIVE:
            return _save_live(hv, dom, save.value, save.at_ns, others, PrecopyOptions(),
                              args.json)
        return _save(hv, dom, save.value, save.at_ns, others)
    finally:
        if gdb is not None:
            gdb.finish(reason)


def _remus_request(requests: list[Request], save: Request | None) -> Request | None:
    """The one ``remus`` request, checked before the guest boots: no save, no
    shutdown or checkpoint request after it (the guest is replicated then)."""
    from hypervisor.toolstack.transport import parse_remus_target
    reqs = [r for r in requests if r.command == REMUS]
    if not reqs:
        return None
    try:
        parse_remus_target(reqs[0].value)
    except ValueError as e:
        raise CliError(str(e)) from None
    if len(reqs) > 1:
        raise CliError("at most one remus request: the guest is replicated from then on")
    if save is not None:
        raise CliError("a remus request and a save request: choose one")
    later = [r for r in requests if r.at_ns >= reqs[0].at_ns and r is not reqs[0]]
    if later:
        raise CliError(f"a request at {format_duration(later[0].at_ns)} comes after the remus "
                       f"request at {format_duration(reqs[0].at_ns)}: Remus's epochs are "
                       "the run's only requests from then on")
    return reqs[0]


def _remus(hv: Hypervisor, dom: Domain, req: Request, others: list[Request],
           until: int | None) -> int:
    """xl remus in a scripted run: replicate from the request's time on; the
    guest's output reaches stdout only as the backup commits its epochs."""
    from hypervisor.toolstack import transport
    from hypervisor.toolstack.remus import DEFAULT_INTERVAL_NS, remus_run
    dest, interval = transport.parse_remus_target(req.value)
    out = remus_run(hv, dom, req.at_ns, lambda: transport.open_channel(dest), _stream,
                    interval or DEFAULT_INTERVAL_NS, until, _note, others)
    _note(f"remus: {out.epochs} epoch(s) committed on the backup at {dest.describe()}")
    assert out.result is not None
    return _exit_for(out.result, dom, until)


def _run_attached(hv: Hypervisor, dom: Domain, requests: list[Request],
                  args: argparse.Namespace) -> int:
    """The run with this terminal as the guest's console (xl create -c)."""
    from hypervisor.toolstack.console import ConsoleClient
    client = ConsoleClient()
    if client.raw:
        print(f"pvlab: attached to the console of domain {dom.name}; Ctrl-] ends the run",
              file=sys.stderr)
    try:
        result = run_domain(hv, dom, args.until, lambda _d, data: client.write(data),
                            requests, lambda msg: client.write(f"[toolstack] {msg}\n".encode()),
                            checkpoint_dir=args.checkpoint_dir, console=client)
    finally:
        client.close()
    if result.reason == "detached":
        print(f"\npvlab: detached from the console at {format_duration(result.virtual_ns)} of "
              f"virtual time; domain {dom.name} ends with the run (no daemon keeps it)",
              file=sys.stderr)
        return EXIT_OK
    return _exit_for(result, dom, args.until)


def _save(hv: Hypervisor, dom: Domain, image: str, at_ns: int,
          requests: list[Request]) -> int:
    """Suspend the domain at ``at_ns``, write ``image``, destroy it (xl save)."""
    from hypervisor.toolstack.session import suspend_and_save
    name = dom.name
    _, outcome = suspend_and_save(hv, dom, image, at_ns, sink=_stream, note=_note,
                                  progress=ProgressBar("saving"), requests=requests)
    if outcome.stats is None:
        print(f"pvlab: save failed: {outcome.error}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    stats = outcome.stats
    _note(f"saved domain {name} to {image}: {stats.bytes / (1 << 20):.1f} MiB, "
          f"{stats.pages} pages, {stats.tables} pagetables canonicalised in "
          f"{stats.canonicalise_s * 1e3:.1f} ms ({stats.pinned} pinned), in "
          f"{stats.total_s:.2f} s; the domain is destroyed")
    return EXIT_OK


class LiveProgress:
    """A live save's progress: libxc's "Frames iteration N" line per round
    (as the toolstack's notes, on stdout), or with ``as_json`` a JSON line
    of query-migrate's fields after each round on stderr, where the guest's
    console does not mix with it."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.shown = 0

    def __call__(self, info: MigrationInfo) -> None:
        if self.as_json:
            print(json.dumps(info.query_migrate(), sort_keys=True), file=sys.stderr,
                  flush=True)
            return
        for r in info.rounds[self.shown:]:
            _note(progress_line(r, info.total >> 12))
        self.shown = len(info.rounds)


def _save_live(hv: Hypervisor, dom: Domain, image: str, at_ns: int,
               requests: list[Request], opts: PrecopyOptions, as_json: bool = False) -> int:
    """The live save: pre-copy rounds from ``at_ns``, the suspend, the final
    round, the domain destroyed."""
    from hypervisor.toolstack.session import live_save
    name = dom.name
    _, outcome, info = live_save(hv, dom, image, at_ns, opts, sink=_stream, note=_note,
                                 report=LiveProgress(as_json), requests=requests)
    if outcome.stats is None:
        if as_json:
            print(json.dumps({"status": "failed", "error-desc": outcome.error}),
                  file=sys.stderr)
        print(f"pvlab: live save failed: {outcome.error}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    assert info is not None
    live = info.rounds[:-1]
    _note(f"saved domain {name} live to {image}: {outcome.stats.bytes / (1 << 20):.1f} MiB, "
          f"{len(live)} live round(s) of {sum(r.pages for r in live)} pages, then "
          f"{info.rounds[-1].pages} pages suspended; downtime "
          f"{format_duration(info.downtime_ns)} of virtual time; the domain is destroyed")
    return EXIT_OK


def _migrate(hv: Hypervisor, dom: Domain, req: Request, requests: list[Request],
             args: argparse.Namespace) -> int:
    """The ``migrate DEST`` request: xl migrate from this run (its lines on
    stderr, as xl's); if it fails before GO the guest runs on here to its
    end, and the exit status is 1 all the same."""
    from hypervisor.toolstack.migrate import RESUME_TRIES
    from hypervisor.toolstack.session import migrate_at
    from hypervisor.toolstack.transport import open_channel
    dest = _destination(req.value)
    name = dom.name
    say = _say_json if args.json else _say
    opts = PrecopyOptions(postcopy=dest.postcopy)
    if dest.precopy_iterations is not None:
        opts = dataclasses.replace(opts, max_iterations=dest.precopy_iterations)
    # a dropped post-copy is resumed at the same HOST:PORT (its receiver keeps
    # listening there); over ssh a new rune would be a new receiver: none
    resume = (lambda: open_channel(dest)) if dest.port is not None else None
    result, out = migrate_at(hv, dom, req.at_ns, lambda: open_channel(dest), opts,
                             args.until, sink=_stream, note=_note,
                             report=LiveProgress(args.json), say=say, requests=requests,
                             resume=resume)
    if out.ok:
        assert out.info is not None
        _note(f"domain {name} migrated live to {dest.describe()}: "
              f"{out.info.transferred / (1 << 20):.1f} MiB in {len(out.info.rounds)} rounds"
              f"{_postcopy_figures(out.info)}, downtime {format_duration(out.info.downtime_ns)} "
              "of virtual time; it runs there and is destroyed here")
        return EXIT_OK
    if args.json:
        print(json.dumps({"status": "failed", "error-desc": out.error}), file=sys.stderr)
    if out.runs_on:
        _exit_for(result, dom, args.until)
        print(f"pvlab: migration to {dest.describe()} failed; domain {name} ran on here",
              file=sys.stderr)
    elif out.postcopy is not None:
        tried = "" if dest.port is None else f" after {RESUME_TRIES} tries at a resume"
        print(f"pvlab: post-copy to {dest.describe()} paused{tried}: the guest is lost with "
              f"this process (its memory partly here, its state there)", file=sys.stderr)
    elif not out.undefined:
        print(f"pvlab: migration to {dest.describe()} failed", file=sys.stderr)
    return EXIT_GUEST_FAILED


def _postcopy_figures(info: MigrationInfo) -> str:
    """What a post-copy sent after the switch, for the run's last line."""
    if not info.postcopy:
        return ""
    return (f" then post-copy: {info.postcopy_pushed} pages pushed, "
            f"{info.postcopy_requests} fault requests answered with {info.postcopy_faulted} "
            "pages (a page already on its way is not sent again)")


def _say(line: str) -> None:
    # one write with its newline: over ssh the far side's lines share this
    # stderr, and print's two writes let one land between a line and its end
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _say_json(line: str) -> None:
    _say(json.dumps({"message": line}))


def _exit_for(result: RunResult, dom: Domain, until: int | None) -> int:
    """What ``run`` and ``restore`` exit with, and say, once the guest stops."""
    if result.reason == "poweroff":
        return EXIT_OK
    if result.reason == "running":
        print(f"pvlab: stopped at {format_duration(until or 0)} of virtual time; the guest "
              "was still running", file=sys.stderr)
        return EXIT_OK
    if result.reason == "crash":
        print(f"pvlab: {dom.crash_report}", file=sys.stderr)
    elif result.reason == "hung":
        print(f"pvlab: domain {dom.name} hung: {result.why}", file=sys.stderr)
    else:
        print(f"pvlab: domain {dom.name} shut down ({result.reason})", file=sys.stderr)
    return EXIT_GUEST_FAILED


def _judge(result: RunResult, dom: Domain) -> int:
    """The run judged as xtf-runner judges a test guest: its exit code, and a
    line saying so unless the test succeeded."""
    from hypervisor.toolstack.verdict import EXIT_CODES, xtf_result
    verdict = xtf_result(result.console, result.reason)
    if verdict != "SUCCESS":
        print(f"pvlab: domain {dom.name}: test result {verdict} (exit {EXIT_CODES[verdict]}, "
              "as xtf-runner)", file=sys.stderr)
    return EXIT_CODES[verdict]


class ProgressBar:
    """``label [#####.....]  45%  115/256 MiB`` on stderr, when it is a terminal
    and the guest is big enough for the wait to show."""

    WIDTH = 30
    MIN_PAGES = 32768  # 128 MiB

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = -1
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.MIN_PAGES:
            return
        pct = 100 * done // max(total, 1)
        if pct == self.shown:
            return
        self.shown = pct
        fill = self.WIDTH * done // max(total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (self.WIDTH - fill)}] {pct:3d}%  "
                         f"{done >> 8}/{total >> 8} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _image_dest(path: str) -> None:
    """Refuse an image path that cannot be written before the guest boots: a
    failed save would have suspended it for nothing."""
    dest = Path(path)
    if dest.is_dir():
        raise CliError(f"{dest} is a directory; name the image file")
    if not dest.parent.is_dir():
        raise CliError(f"{dest.parent} does not exist: cannot write {dest.name} there")


def cmd_save(args: argparse.Namespace) -> int:
    _image_dest(args.image)
    cfg = load_config(args.config)
    if any(r.command in (SAVE, SAVE_LIVE) for r in cfg.requests):
        raise CliError(f"{args.config}: a save request in the configuration and pvlab "
                       "save's IMAGE: give one (pvlab run makes the configuration's)")
    hv, dom = boot(cfg, seed=args.seed)
    if args.live:
        opts = PrecopyOptions(args.max_iterations, args.dirty_threshold, args.downtime_limit,
                              args.bandwidth << 20)
        return _save_live(hv, dom, args.image, args.at, list(cfg.requests), opts, args.json)
    if args.json:
        raise CliError("--json reports a live save's rounds: give --live too")
    return _save(hv, dom, args.image, args.at, list(cfg.requests))


def cmd_restore(args: argparse.Namespace) -> int:
    from hypervisor.toolstack.restore import restore_image
    _checkpoint_dir(args)
    _save_request(args.request, args.until)
    clock = "fast" if args.console and not args.deterministic else "deterministic"
    _gdb_needs_counted_slices(args, clock)
    if args.lazy:
        return _restore_lazy(args, clock)
    hv, dom, stats = restore_image(args.image, seed=args.seed, clock=clock,
                                   progress=ProgressBar("restoring"))
    _note(f"restored {args.image} as domain {dom.domid} ({dom.name}): {stats.pages} pages on "
          f"new frames, {stats.tables} pagetables localised in {stats.localise_s * 1e3:.1f} ms, "
          f"{stats.pinned} pinned again, in {stats.total_s:.2f} s; its suspend hypercall "
          "returns 0")
    try:
        return _run_or_save(hv, dom, args.request, args)
    finally:
        hv.close()  # the devices' host files and sockets, whatever the outcome


def _restore_lazy(args: argparse.Namespace, clock: str) -> int:
    """``pvlab restore --lazy``: the guest runs once its tables and contexts
    are in; its other pages come from the mapped image when touched."""
    from hypervisor.toolstack.lazyrestore import restore_image_lazy
    hv, dom, stats, image = restore_image_lazy(args.image, seed=args.seed, clock=clock)
    try:
        absent = domctl.mem_paging_stats(hv)[0]
        _note(f"restored {args.image} lazily as domain {dom.domid} ({dom.name}): "
              f"{stats.tables} pagetables localised and {stats.pages - stats.tables} pages "
              f"read, {absent} pages left in the image, in {stats.total_s * 1e3:.1f} ms; "
              "its suspend hypercall returns 0")
        code = _run_or_save(hv, dom, args.request, args)
        left, fetched, calls = domctl.mem_paging_stats(hv)
        _note(f"lazy restore: {fetched} pages read from the image in {calls} batches, "
              f"{left} never needed")
        return code
    finally:
        hv.close()
        image.close()


def cmd_migrate_receive(args: argparse.Namespace) -> int:
    """``xl migrate-receive``: the handshake on stdin and stdout (the ssh
    rune's end) or on one TCP connection, then the domain runs here as
    ``pvlab restore`` runs one, its console on stdout, or on stderr when
    stdout is the wire."""
    from hypervisor.toolstack import transport
    if args.debug:
        logging.getLogger("hypervisor.toolstack").setLevel(logging.INFO)
    if args.remus:
        return _remus_backup(args)
    daemon = xl.receiving_daemon(args.socket, args.in_process)
    hv = Hypervisor(args.memory, seed=args.seed or 0, clock=args.clock) \
        if args.memory is not None and daemon is None else None
    if daemon is not None:
        channel = transport.stdio_channel() if args.listen is None \
            else transport.accept_one(_listen(args.listen))
        return xl.receive_in_daemon(daemon, channel, args.paused,
                                    not args.no_postcopy)
    # the socket a paused post-copy's resume comes on: --recover's, else --listen's
    listening = _listen(args.listen) if args.listen is not None else None
    recovery = _listen(args.recover, "--recover") if args.recover is not None else listening
    try:
        return _receive_here(args, hv, listening, recovery)
    finally:
        for sock in {id(s): s for s in (listening, recovery) if s is not None}.values():
            sock.close()


def _receive_here(args: argparse.Namespace, hv: Hypervisor | None, listening: Any,
                  recovery: Any) -> int:
    """migrate-receive into this process, on --listen's first connection or
    stdin and stdout; a post-copy's drop waits for a resume on ``recovery``."""
    from hypervisor.toolstack import transport
    from hypervisor.toolstack.migrate import MigrateError, migrate_receive, postcopy_recovery
    channel = transport.stdio_channel() if listening is None else transport.accept_next(listening)
    if listening is not None and listening is not recovery:
        listening.close()
    refuse = "the target does not take post-copy (--no-postcopy)" if args.no_postcopy else ""
    try:
        got = migrate_receive(channel, hv, args.seed, args.clock, args.paused, say=_say,
                              refuse_postcopy=refuse)
    except MigrateError as e:
        channel.close()
        print(e, file=sys.stderr)
        return EXIT_GUEST_FAILED
    if got.postcopy is None:
        channel.close()  # a post-copy's is the pager's until its last page
    elif recovery is not None:
        where = "{}:{}".format(*recovery.getsockname()[:2])
        pager = got.postcopy
        pager.recover = postcopy_recovery(lambda t: transport.accept_next(recovery, t), where,
                                          _say)
        complete = pager.on_complete

        def done(p: Any) -> None:
            if complete is not None:
                complete(p)
            recovery.close()  # every page is in: nothing to resume any more
        pager.on_complete = done
    dom, stats = got.dom, got.stats
    _note(f"received domain {dom.name} as domain {dom.domid}: {stats.pages} pages on new "
          f"frames, {stats.tables} pagetables localised, {stats.pinned} pinned again; its "
          "suspend hypercall returns 0")
    if args.paused:
        _note(f"domain {dom.name} received and left paused (-p): nothing unpauses it in "
              "this process, and it ends with it")
        return _postcopy_end(got, None)
    from hypervisor.toolstack.postcopy import PostcopyPaused
    try:
        result = run_domain(got.hv, dom, args.until, _stream, note=_note)
    except PostcopyPaused:
        return _postcopy_end(got, None)
    return _postcopy_end(got, _exit_for(result, dom, args.until))


def _postcopy_end(got: Any, code: int | None) -> int:
    """A post-copy's pages still coming when the run ends are taken in;
    a domain paused by a dropped connection is said, and the exit is 1."""
    pager = got.postcopy
    if pager is not None:
        pager.drain()
        if pager.paused:
            print(f"pvlab: {pager.why}; nothing resumes it in this process (no --listen "
                  "or --recover address)", file=sys.stderr)
            return EXIT_GUEST_FAILED
        if pager.drops:
            _note(f"post-copy: resumed after {pager.drops} dropped connection(s)")
        _note(f"post-copy: {pager.pushed} pages pushed by the source, {pager.faulted} asked "
              f"for in {pager.requests} requests")
    return EXIT_OK if code is None else code


def _remus_backup(args: argparse.Namespace) -> int:
    """``migrate-receive -r``: the backup of a Remus primary (remus.remus_receive)
    on stdin and stdout (main_remus's ssh rune) or one --listen connection;
    after a failover the guest runs here, its console on stdout (on stderr
    when stdout was the wire)."""
    from hypervisor.toolstack import transport
    from hypervisor.toolstack.migrate import MigrateError
    from hypervisor.toolstack.remus import remus_receive
    if args.listen is None:
        ch = transport.stdio_channel()
    else:
        ch = transport.accept_one(_listen(args.listen))
    try:
        backup = remus_receive(ch, args.seed, args.clock, _say)
    except MigrateError as e:
        print(e, file=sys.stderr)
        return EXIT_GUEST_FAILED
    finally:
        ch.close()
    if backup is None:
        return EXIT_OK
    _stream(backup.dom, backup.output)
    result = run_domain(backup.hv, backup.dom, args.until, _stream, note=_note)
    return _exit_for(result, backup.dom, args.until)


def _listen(where: str, flag: str = "--listen") -> Any:
    """The listening socket of --listen HOST:PORT (or ``flag``'s), its port
    said on stderr."""
    from hypervisor.toolstack import transport
    try:
        host, port = transport.parse_hostport(where)
        sock = transport.listen_tcp(host, port)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None
    except OSError as e:
        raise CliError(f"cannot listen on {where}: {e.strerror or e}") from None
    what = "listening" if flag == "--listen" else "listening for a post-copy's resume"
    print(f"migration target: {what} on {host}:{sock.getsockname()[1]}", file=sys.stderr,
          flush=True)
    return sock


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from hypervisor.toolstack.checkpoint import CheckpointWriter
    if args.every <= 0:
        raise CliError("--every must be more than 0")
    if args.max < 1:
        raise CliError("--max must be at least 1")
    out = _make_dir(args.dir)
    cfg = load_config(args.config)
    hv, dom = boot(cfg, seed=args.seed)
    last = args.until if args.until is not None else args.every * args.max
    times = list(range(args.every, last + 1, args.every))[:args.max]
    writer = CheckpointWriter(out, progress=ProgressBar("checkpoint"),
                              incremental=not args.full)
    requests = [Request(t, command="checkpoint") for t in times]
    result = run_domain(hv, dom, args.until, _stream, requests, _note, checkpoints=writer)
    _note(f"{len(writer.taken)} checkpoints in {out}")
    return _exit_for(result, dom, args.until)


def cmd_image(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    with ExitStack() as chains:
        return _image(args, lambda p: _scan_through_chain(p, chains))


def _scan_through_chain(path: str, chains: Any) -> Any:
    """scan_image, an incremental checkpoint read as the whole image of its
    chain (kept in a temporary file while ``chains`` is open), named as its
    own file."""
    from dataclasses import replace

    from hypervisor.toolstack.image import scan_image
    from hypervisor.toolstack.incremental import materialised, parent_of
    try:
        parent = parent_of(Path(path))
    except (OSError, StreamError):
        parent = None  # not an image: the scan says so
    if parent is None:
        return scan_image(path)
    whole = chains.enter_context(materialised(Path(path)))
    info = scan_image(whole, wire=True)
    return replace(info, domain={**(info.domain or {}), "kind": "incremental checkpoint"}) \
        if info.domain is not None else info


def _image(args: argparse.Namespace, scan: Any) -> int:
    from hypervisor.toolstack.imagetool import describe, diff
    if args.action == "show":
        if len(args.images) != 1:
            raise CliError("image show takes one IMAGE")
        info = scan(args.images[0])
        print(describe(info, records=args.records).replace(str(info.path), args.images[0]))
        return EXIT_OK
    if args.action == "check":
        for path in args.images:
            info = scan(path)
            epochs = f", {len(info.epochs)} epochs" if info.checkpoint else ""
            print(f"{path}: a good image of {info.nr_pfns} pfns in {info.copies} page "
                  f"copies{epochs} ({(info.domain or {}).get('kind', 'not pvlab')})")
        return EXIT_OK
    if len(args.images) != 2:
        raise CliError("image diff takes two images: A B")
    a, b = (scan(p) for p in args.images)
    lines = diff(a, b)
    print("\n".join(lines) if lines else "the images hold the same guest state")
    return EXIT_OK if not lines else EXIT_GUEST_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from hypervisor.toolstack import demo
    if args.restore_side:
        image, out_json, pgd = args.restore_side
        return demo.restore_side(image, out_json, int(pgd))
    config = Path(args.config) if args.config else demo.EXAMPLE
    if not config.is_file():
        raise CliError(f"{config} does not exist: give the demo's configuration "
                       "(examples/save-restore.toml in pvlab's source)")
    return demo.run_demo(config)


def cmd_frames(args: argparse.Namespace) -> int:
    from hypervisor.toolstack.frames import format_summary, format_table, frame_table
    types = None
    if args.type:
        types = {t.strip() for t in args.type.split(",")}
        known = {"L1", "L2", "L3", "L4", "writable", "none"}
        if not types <= known:
            raise CliError(f"--type takes a comma-separated list of {', '.join(sorted(known))}")
    if args.plot:
        _plot_output(args.plot)
    cfg = load_config(args.config)
    hv, dom = boot(cfg, seed=args.seed)
    run_domain(hv, dom, args.at)
    rows = frame_table(hv, dom)
    state = "running" if dom.is_running else "shut down"
    print(f"at {format_duration(max(domctl.vcpu_clocks(dom)))} of virtual time ({state})")
    if args.plot:
        from hypervisor.toolstack import plotdata, plots
        _write_plot(plots.draw_frames(plotdata.frame_map(hv, dom)), args.plot)
    elif not args.summary:
        print(format_table(dom, rows, types))
    print(format_summary(rows))
    problems = audit(hv)
    print("invariants: " + ("all hold" if not problems else "; ".join(problems)))
    return EXIT_OK if not problems else EXIT_GUEST_FAILED


def _console_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--console", action="store_true",
                   help="attach this terminal to the guest's console, as xl create -c: "
                        "what is typed goes to the guest (it echoes and edits the line), "
                        "Ctrl-] detaches, which ends the run; stdin that is no terminal is "
                        "passed on as it comes. The clock is fast unless --deterministic")
    p.add_argument("--deterministic", action="store_true",
                   help="with --console: keep the deterministic clock (typed input then "
                        "comes at whatever virtual time the guest has reached)")


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request", metavar="'TIME WHAT'", type=_request, action="append",
                   default=[],
                   help="at TIME of virtual time the toolstack asks WHAT of the guest: "
                        "poweroff, halt, reboot, suspend (it writes control/shutdown; a "
                        "guest that suspends is resumed cancelled), checkpoint (a suspend "
                        "whose image is written, see --checkpoint-dir), mem-set MIB (the "
                        "guest's memory target, as xl mem-set), balloon-stats, "
                        "balloon-inhibit, balloon-uninhibit, save PATH (a suspend whose "
                        "image is written to PATH, the domain then destroyed, as pvlab "
                        "save does), save-live PATH (the same after pre-copy rounds, as "
                        "pvlab save --live), migrate [-s CMD] [-p] [--postcopy] "
                        "[--precopy-iterations N] DEST (a live migration, as xl "
                        "migrate: DEST is HOST:PORT for a pvlab migrate-receive --listen there, "
                        "or ssh:HOST to run pvlab migrate-receive on HOST over ssh, or over "
                        "CMD instead of ssh; an empty CMD runs HOST as the command; -p: the "
                        "target leaves it paused; --postcopy: the guest starts at the target "
                        "where the pre-copy rounds stop and its memory follows; "
                        "--precopy-iterations: at most N rounds, 0 with --postcopy for none), "
                        "remus [-s CMD] [-i MS] DEST (the guest "
                        "replicated from then on to a backup, pvlab migrate-receive -r, at "
                        "DEST as migrate's, an epoch every MS milliseconds of virtual time, "
                        "default 200; "
                        "docs/remus.md), type TEXT (TEXT typed on the guest's "
                        "console, with the escapes \\n \\r \\t \\e \\\\ \\xHH), or "
                        "PATH=VALUE (a xenstore write in the guest's home); repeatable (e.g. "
                        "--request '15ms suspend' --request '2ms mem-set 16')")
    p.add_argument("--json", action="store_true",
                   help="a save-live or migrate request's progress as JSON lines on stderr, "
                        "with QEMU's query-migrate fields, instead of the Frames iteration "
                        "lines (the migration's messages as {\"message\": ...})")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="keep the images of checkpoint requests here (default: they are "
                        "written to a temporary directory and removed)")


def _gdb_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gdb", metavar="PORT", type=_gdb_port,
                   help="serve gdb's remote protocol on 127.0.0.1:PORT (0: any free port, "
                        "printed on stderr) and wait for gdb to attach before the guest "
                        "runs: one thread per VCPU, registers, memory by virtual address, "
                        "breakpoints, single steps (docs/labs/debugging.md)")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="domain configuration (TOML)")


def _seed_arg(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--seed", metavar="N", type=int,
                   help="override the configuration's seed" + extra)


def _sched_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sched-seed", metavar="N", type=int,
                   help="seed of the schedule alone (which VCPU runs next, slice lengths, "
                        "wake-up delays), the frames staying those of the seed (default: "
                        "the configuration's sched_seed, else the seed)")


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="boot a domain and stream its console",
                         description="Boot the domain CONFIG describes and stream its "
                                     "console to stdout until it shuts down.")
    _config_arg(run)
    run.add_argument("--until", metavar="TIME", type=_duration,
                     help="stop after TIME of virtual time (e.g. 20ms, 1.5s)")
    _seed_arg(run, " (frame shuffling, scheduling)")
    _sched_seed_arg(run)
    run.add_argument("--sched-from", metavar="TIME", type=_duration,
                     help="the configuration's schedule until TIME, --sched-seed's from then "
                          "on (how pvlab explore --fork-at runs; its replay lines use it)")
    _inject_arg(run)
    run.add_argument("--inject-phase", metavar="K", type=int, default=0,
                     help="with --inject-every N: throw after the accesses numbered K "
                          "modulo N (explore gives seed S the phase S mod N)")
    run.add_argument("--fast", action="store_true",
                     help="fast clock: host-time slices instead of deterministic "
                          "instruction-count slices (results stay the same, runs do not "
                          "repeat bit for bit)")
    run.add_argument("--trace", metavar="N", type=int, default=0,
                     help="print the first N instructions each VCPU executes, "
                          "disassembled, with symbols")
    _request_args(run)
    _gdb_arg(run)
    _console_args(run)
    run.set_defaults(func=cmd_run)


def _add_frames(sub: Any) -> None:
    frames = sub.add_parser("frames", help="show a domain's frame table at a point in time",
                            description="Boot the domain CONFIG describes, run it to virtual "
                                        "time --at, and print its frame table: per frame its "
                                        "pfn, mfn, type, type and reference counts and pinned "
                                        "bit, a summary per type, and whether the "
                                        "frame-accounting invariants hold.")
    _config_arg(frames)
    frames.add_argument("--at", metavar="TIME", type=_duration, default=parse_duration("5ms"),
                        help="virtual time to stop at (default 5ms)")
    _seed_arg(frames)
    frames.add_argument("--type", metavar="TYPES",
                        help="only frames of these types, e.g. L1,L2,L3,L4")
    frames.add_argument("--summary", action="store_true", help="print only the summary")
    frames.add_argument("--plot", metavar="FILE",
                        help="draw every machine frame into FILE (.png or .svg) by owner, "
                             "type and pin state, instead of listing the domain's")
    frames.set_defaults(func=cmd_frames)



def _add_save(sub: Any) -> None:
    save = sub.add_parser("save", help="boot a domain, run it to a time, save it to a file",
                          description="Boot the domain CONFIG describes, run it to virtual "
                                      "time --at, ask it to suspend (control/shutdown = "
                                      "suspend), and write its image to IMAGE: an xl save "
                                      "file (xl's header and config, libxl's stream around "
                                      "Xen's libxc migration stream), pagetables "
                                      "canonicalised. The "
                                      "domain is gone afterwards, as with xl save; "
                                      "`pvlab restore IMAGE` brings it back.")
    _config_arg(save)
    save.add_argument("image", metavar="IMAGE", help="the image file to write")
    save.add_argument("--at", metavar="TIME", type=_duration, required=True,
                      help="virtual time of the suspend request (e.g. 12ms); with --live, "
                           "of the first round")
    _seed_arg(save)
    live = save.add_argument_group("live save (pre-copy, as xl migrate's loop)")
    live.add_argument("--live", action="store_true",
                      help="save while the guest runs: log-dirty on, a first round of every "
                           "page, rounds of the pages dirtied meanwhile, then the suspend "
                           "and a final round (docs/image.md)")
    live.add_argument("--max-iterations", metavar="N", type=_positive,
                      default=SPP_MAX_ITERATIONS,
                      help=f"stop after N rounds (default {SPP_MAX_ITERATIONS}, Xen's)")
    live.add_argument("--dirty-threshold", metavar="PAGES", type=_positive,
                      default=SPP_TARGET_DIRTY_COUNT,
                      help="stop when fewer pages than this are dirty (default "
                           f"{SPP_TARGET_DIRTY_COUNT}, Xen's)")
    live.add_argument("--downtime-limit", metavar="TIME", type=_duration,
                      help="also stop when the dirty pages could be sent within TIME at the "
                           "bandwidth measured so far (QEMU's downtime-limit; default: none)")
    live.add_argument("--bandwidth", metavar="MIB", type=_positive,
                      default=DEFAULT_BANDWIDTH >> 20,
                      help="the modelled link, in MiB per second of virtual time: the guest "
                           f"runs while a round is sent (default {DEFAULT_BANDWIDTH >> 20})")
    live.add_argument("--json", action="store_true",
                      help="after each round a JSON line on stderr with QEMU's query-migrate "
                           "fields (status, ram.total, ram.transferred, ram.remaining, "
                           "ram.dirty-pages-rate, ram.dirty-sync-count, setup-time, "
                           "expected-downtime, downtime, total-time; times in ms of virtual "
                           "time) instead of the Frames iteration lines")
    save.set_defaults(func=cmd_save)



def _add_restore(sub: Any) -> None:
    restore = sub.add_parser("restore", help="restore a saved image and run it",
                             description="Check IMAGE whole, restore it into a new domain on "
                                         "new machine frames (pagetables localised, what was "
                                         "pinned pinned again) and run it, its console on "
                                         "stdout: the guest resumes from its suspend "
                                         "hypercall with 0 and goes the RESTORE way.")
    restore.add_argument("image", metavar="IMAGE", help="an image pvlab save or checkpoint wrote")
    restore.add_argument("--until", metavar="TIME", type=_duration,
                         help="stop at this virtual time (counted from the guest's boot)")
    restore.add_argument("--seed", metavar="N", type=int,
                         help="seed of the new machine's frame shuffle (default: the saved "
                              "seed plus one, so that the frames differ)")
    restore.add_argument("--lazy", action="store_true",
                         help="start the guest once its pagetables, contexts and "
                              "start_info are in, and read each other page from the image "
                              "(mapped, held open) when it is first touched, a background "
                              "pass filling the rest between slices; the image's structure is "
                              "checked first, each block of pages against its digest when first "
                              "read; an image that changes meanwhile, or a block that does not "
                              "match, ends the guest (exit 1)")
    _request_args(restore)
    _gdb_arg(restore)
    _console_args(restore)
    restore.set_defaults(func=cmd_restore)



def _add_migrate_receive(sub: Any) -> None:
    rx = sub.add_parser("migrate-receive", help="receive a domain migrating live (xl's)",
                        description="The receiving end of a migration, as xl migrate-receive: "
                                    "say xl's banner, take the domain's stream (xl's header "
                                    "and config, libxl's stream), build it paused as "
                                    "NAME--incoming, then at the sender's word rename it NAME "
                                    "and unpause it, and run it here as pvlab restore does. "
                                    "The wire is stdin and stdout (what ssh connects; the "
                                    "guest's console then goes to stderr), or with --listen "
                                    "one TCP connection (the console on stdout). Whatever "
                                    "fails before the domain starts here leaves nothing of "
                                    "it here, and the sender resumes its copy. A post-copy "
                                    "migration (migrate --postcopy) starts the domain at the "
                                    "switch and takes its pages while it runs; if the "
                                    "connection drops then, the domain is paused and this "
                                    "process waits on the --listen (or --recover) address "
                                    "for the source to resume the post-copy (without either "
                                    "the exit status is 1).")
    rx.add_argument("--listen", metavar="HOST:PORT",
                    help="accept one migration on this TCP address (port 0: any free one; "
                         "the port is said on stderr), instead of stdin and stdout")
    rx.add_argument("--recover", metavar="HOST:PORT",
                    help="where a post-copy whose connection dropped waits for the source's "
                         "resume (QEMU's migrate-recover URI; default: the --listen address, "
                         "kept listening until the last page is in)")
    rx.add_argument("-r", dest="remus", action="store_true",
                    help="be a Remus backup (xl's -r): each epoch of the checkpointed "
                         "stream buffered, committed when whole and acknowledged; when the "
                         "primary dies, \"Remus Failover for domain N\" and the guest runs "
                         "on here from the last committed epoch (on stdin and stdout, ssh's "
                         "end, or one --listen connection; docs/remus.md)")
    rx.add_argument("-p", dest="paused", action="store_true",
                    help="leave the domain paused once it is here (xl's -p)")
    rx.add_argument("-e", dest="no_daemon", action="store_true",
                    help="xl's: do not daemonise; pvlab's receiver never does (the domain "
                         "runs in this process), so it changes nothing")
    rx.add_argument("-d", dest="debug", action="store_true",
                    help="debug: the toolstack's steps logged on stderr")
    rx.add_argument("--until", metavar="TIME", type=_duration,
                    help="stop the received guest at this virtual time (counted from its "
                         "boot)")
    rx.add_argument("--clock", choices=domctl.CLOCKS, default="deterministic",
                    help="the received guest's clock: deterministic (the default) or fast")
    rx.add_argument("--memory", metavar="MIB", type=_positive,
                    help="this machine's memory in MiB (default: sized for the domain); a "
                         "domain that does not fit is refused")
    rx.add_argument("--seed", metavar="N", type=int,
                    help="seed of this machine's frame shuffle (default: the sender's seed "
                         "plus one; 0 with --memory)")
    rx.add_argument("--socket", metavar="PATH",
                    help="hand the wire to the pvlab daemon at PATH, where the domain then "
                         "lives (by default to the daemon at its default socket when one "
                         "answers there; --until, --clock, --memory and --seed are then the "
                         "daemon's)")
    rx.add_argument("--in-process", action="store_true",
                    help="receive into this process even when a daemon answers")
    rx.add_argument("--no-postcopy", action="store_true",
                    help="refuse a post-copy migration (at its switch, before the domain "
                         "could run here: the sender resumes its copy)")
    rx.set_defaults(func=cmd_migrate_receive)


def _add_checkpoint(sub: Any) -> None:
    ckpt = sub.add_parser("checkpoint", help="run a domain, saving a checkpoint at intervals",
                          description="Boot the domain CONFIG describes and run it; every "
                                      "--every of virtual time save a checkpoint into "
                                      "DIR (NAME-checkpoint-001.img, ..., NAME the domain's: "
                                      "the first a whole image, then increments) "
                                      "and let the guest go on "
                                      "(its suspend hypercall returns 1: THAW), as Remus "
                                      "and xl save -c do.")
    _config_arg(ckpt)
    ckpt.add_argument("dir", metavar="DIR", help="directory for the images (made if need be)")
    ckpt.add_argument("--every", metavar="TIME", type=_duration, required=True,
                      help="virtual time between checkpoints (e.g. 5ms)")
    ckpt.add_argument("--until", metavar="TIME", type=_duration,
                      help="stop at this virtual time (default: when the guest shuts down)")
    ckpt.add_argument("--max", metavar="N", type=int, default=100,
                      help="at most N checkpoints (default 100)")
    ckpt.add_argument("--full", action="store_true",
                      help="every checkpoint a whole image (default: the first whole, each "
                           "later one only the pages dirtied since the one before, restorable "
                           "through its chain of parents in DIR)")
    _seed_arg(ckpt)
    ckpt.set_defaults(func=cmd_checkpoint)



def _plot_output(path: str) -> None:
    """Refuse a picture's file before any run: its name ends .png or .svg and
    its directory can be written."""
    from hypervisor.toolstack.plots import PlotError, check_output
    try:
        check_output(path)
    except PlotError as e:
        raise CliError(str(e)) from None


def _write_plot(fig: Any, path: str) -> None:
    from hypervisor.toolstack.plots import PlotError, save_figure
    try:
        save_figure(fig, path)
    except PlotError as e:
        raise CliError(str(e)) from None
    _note(f"picture written to {path}")


def _plot_p2m(args: argparse.Namespace, cfg: Any) -> Any:
    from hypervisor.toolstack import plotdata, plots
    return plots.draw_p2m(plotdata.p2m_across_restore(cfg, args.at, args.seed,
                                                      args.restore_seed))


def _plot_timeline(args: argparse.Namespace, cfg: Any) -> Any:
    from hypervisor.toolstack import plots, timeline
    trace = timeline.trace_checkpoint if args.checkpoint else timeline.trace_save_restore
    return plots.draw_timeline(trace(cfg, args.at, args.seed, args.sched_seed))


def _plot_balloon(args: argparse.Namespace, cfg: Any) -> Any:
    from hypervisor.toolstack import plotdata, plots
    if args.every <= 0:
        raise CliError("--every must be more than 0")
    if cfg.balloon is None:
        raise CliError(f"{args.config}: the domain has no balloon (add a [balloon] table)")
    if args.save_at is not None and args.save_at >= args.until:
        raise CliError(f"--save-at {format_duration(args.save_at)} is not before --until "
                       f"{format_duration(args.until)}")
    if any(r.command == SAVE for r in [*cfg.requests, *args.request]):
        raise CliError("plot balloon saves with --save-at, not a save request")
    before = [r for r in args.request if args.save_at is None or r.at_ns < args.save_at]
    after = [r for r in args.request if r not in before]
    cfg.requests = (*cfg.requests, *before)
    return plots.draw_balloon(plotdata.balloon_run(cfg, args.until, args.every, args.seed,
                                                   args.save_at, after))


def _plot_migration(args: argparse.Namespace, cfg: Any) -> Any:
    from hypervisor.toolstack import plotdata, plots
    return plots.draw_migration(plotdata.migration_run(cfg, args.at, args.seed))


def cmd_plot(args: argparse.Namespace) -> int:
    from hypervisor.toolstack.plotdata import PlotDataError
    from hypervisor.toolstack.timeline import TimelineError
    _plot_output(args.output)
    cfg = load_config(args.config)
    try:
        fig = args.draw(args, cfg)
    except (PlotDataError, TimelineError) as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    _write_plot(fig, args.output)
    return EXIT_OK


def cmd_explore(args: argparse.Namespace) -> int:
    from hypervisor.toolstack import explore
    cfg = load_config(args.config)  # a bad configuration is one line, before any worker starts
    try:
        explore.check_config(cfg)
    except explore.ExploreError as e:
        raise CliError(str(e)) from None
    if args.jobs < 0:
        raise CliError("-j must be 0 (one worker per core) or more")
    if args.frames and args.seed is not None:
        raise CliError("--seed is the frames' seed: with --frames each run's seed is")
    try:
        seeds = explore.parse_seeds(args.seeds)
        re.compile(args.results)
    except explore.ExploreError as e:
        raise CliError(str(e)) from None
    except re.error as e:
        raise CliError(f"--results {args.results!r} is no regular expression: {e}") from None
    _check_parting_args(args.config, args.fork_at, args.until, "--fork-at")
    if args.fork_at is not None and args.frames:
        raise CliError("--fork-at and --frames: forked runs share their frames")
    _check_inject_args(args.inject_every, args.inject_kind, args.inject_slices)
    scenario = explore.Scenario(args.config, args.until, args.frames, args.seed, args.results,
                                args.fork_at, args.inject_every, args.inject_kind,
                                "slice" if args.inject_slices else "access")
    groups = explore.explore(scenario, seeds, args.jobs, explore.progress_on_stderr())
    explore.report(scenario, groups, print)
    if args.json:
        explore.write_json(scenario, groups, args.json)
    return explore.verdict(groups)


def _check_parting_args(config: str, at_ns: int | None, until: int | None, flag: str) -> None:
    """A parting time before --until and before any suspend, shutdown or save."""
    if at_ns is None:
        return
    if until is not None and until <= at_ns:
        raise CliError(f"{flag} {format_duration(at_ns)} is not before --until "
                       f"{format_duration(until)}")
    try:
        check_parting(load_config(config).requests, at_ns)
    except ValueError as e:
        raise CliError(f"{flag}: {e}") from None


def _check_inject_args(every: int, kind: str | None, slices: bool) -> None:
    if every < 0:
        raise CliError("--inject-every must be 1 or more (0: no injector)")
    if (kind is not None or slices) and not every:
        raise CliError(f"{'--inject-kind' if kind is not None else '--inject-slices'} "
                       "needs --inject-every")
    if kind is not None and kind not in domctl.device_kind_names():
        raise CliError(f"--inject-kind {kind!r}: no such device kind (the kinds: "
                       f"{', '.join(domctl.device_kind_names())})")


def _inject_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inject-every", metavar="N", type=int, default=0,
                   help="throw each virtio device's events (a used buffer, a config change, "
                        "its interrupt) after every N-th register access of the guest, from "
                        "the parting on (docs/virtio.md, 'The injector')")
    p.add_argument("--inject-kind", metavar="KIND",
                   help="only at the devices of this kind (balloon, ...)")
    p.add_argument("--inject-slices", action="store_true",
                   help="count the scheduler's slices from the parting instead of the "
                        "guest's register accesses in the freeze, reset and restore")


def _add_explore(sub: Any) -> None:
    from hypervisor.toolstack.explore import DEFAULT_RESULTS
    ex = sub.add_parser(
        "explore", help="run a domain under many schedules and group the outcomes",
        description="Run the domain CONFIG describes once per seed, each run with that seed "
                    "as its schedule seed (which VCPU runs next, slice lengths, wake-up "
                    "delays) on the frames of the configuration's seed, in worker processes; "
                    "group the runs by outcome (how they ended, a crash report or why they "
                    "hung, their result lines) and print each group with its seeds, its "
                    "console's tail and the pvlab run command that replays it. Exit 0 if "
                    "every run ended alike and well, 1 if the outcomes differ or a run "
                    "crashed or hung (a race found), 2 for bad input.")
    _config_arg(ex)
    ex.add_argument("--seeds", metavar="SEEDS", default="1-100",
                    help="the seeds: N, A-B or a comma-separated list (default 1-100)")
    ex.add_argument("-j", "--jobs", metavar="N", type=int, default=0,
                    help="worker processes (default 0: one per core)")
    ex.add_argument("--until", metavar="TIME", type=_duration,
                    help="stop each run at TIME of virtual time (default: when the guest "
                         "shuts down)")
    ex.add_argument("--frames", action="store_true",
                    help="each seed is the machine's seed: the frames move with the schedule")
    _seed_arg(ex, " (the frames' seed; not with --frames)")
    ex.add_argument("--results", metavar="REGEX", default=DEFAULT_RESULTS,
                    help="console lines that are a run's results, compared across runs "
                         f"(default {DEFAULT_RESULTS!r})")
    ex.add_argument("--fork-at", metavar="TIME", type=_duration,
                    help="the runs share their start: one run on the configuration's "
                         "schedule to TIME (before any suspend, shutdown or save), then each "
                         "seed's run is a fork of it with that seed's schedule from there on")
    _inject_arg(ex)
    ex.add_argument("--json", metavar="FILE", help="also write the groups to FILE as JSON")
    ex.set_defaults(func=cmd_explore)


def _plot_common(p: argparse.ArgumentParser, draw: Any) -> None:
    _config_arg(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the picture: FILE.png or FILE.svg")
    _seed_arg(p)
    p.set_defaults(func=cmd_plot, draw=draw)


def _add_plot(sub: Any) -> None:
    plot = sub.add_parser("plot", help="draw a picture from a real run (PNG or SVG)",
                          description="Run the domain CONFIG describes and draw what it did: "
                                      "p2m (its pfn -> mfn map before a save and after the "
                                      "restore), timeline (the suspend path on each VCPU), "
                                      "balloon (the balloon's pages over time), migration "
                                      "(a live save's rounds and its downtime). `pvlab frames "
                                      "CONFIG --plot FILE` draws the machine's frames.")
    kinds = plot.add_subparsers(dest="kind", metavar="KIND", required=True)
    p2m = kinds.add_parser("p2m", help="pfn -> mfn before a save and after its restore",
                           description="Save the domain at --at, restore the image on a "
                                       "machine with another frame shuffle, and draw both "
                                       "maps, pfn on x and mfn on y, pagetables marked.")
    _plot_common(p2m, _plot_p2m)
    p2m.add_argument("--at", metavar="TIME", type=_duration, required=True,
                     help="virtual time of the save (e.g. 12ms)")
    p2m.add_argument("--restore-seed", metavar="N", type=int,
                     help="seed of the restoring machine's frame shuffle (default: the "
                          "saved seed plus one)")
    tl = kinds.add_parser("timeline", help="the suspend path on each VCPU",
                          description="Ask the domain to suspend at --at and draw each "
                                      "VCPU's way through it over virtual time: the freeze, "
                                      "stop_machine's states, the suspend hypercall, and "
                                      "the resume: RESTORE after a save and its restore "
                                      "(the default), THAW after a checkpoint.")
    _plot_common(tl, _plot_timeline)
    tl.add_argument("--at", metavar="TIME", type=_duration, required=True,
                    help="virtual time of the suspend request (e.g. 12ms)")
    tl.add_argument("--checkpoint", action="store_true",
                    help="a checkpoint: the guest goes on (THAW) instead of being restored")
    _sched_seed_arg(tl)
    bal = kinds.add_parser("balloon", help="the balloon's pages over virtual time",
                           description="Run the domain (it needs a [balloon] table) to "
                                       "--until, making its requests, and draw the "
                                       "balloon's target and actual size, the domain's "
                                       "pages and the guest's free pages over time; with "
                                       "--save-at, save it then and go on in the restored "
                                       "guest.")
    _plot_common(bal, _plot_balloon)
    bal.add_argument("--until", metavar="TIME", type=_duration, required=True,
                     help="virtual time to stop at (e.g. 24ms)")
    bal.add_argument("--every", metavar="TIME", type=_duration, default=parse_duration("100us"),
                     help="time between samples (default 100us)")
    bal.add_argument("--save-at", metavar="TIME", type=_duration,
                     help="save the guest at TIME and restore it on other frames")
    bal.add_argument("--request", metavar="'TIME WHAT'", type=_request, action="append",
                     default=[], help="a request as pvlab run takes it (e.g. '14ms mem-set "
                                      "32'), made of the restored guest if after --save-at")
    mig = kinds.add_parser("migration", help="a live save's rounds and where its downtime went",
                           description="Live-save the domain at --at (the pre-copy rounds "
                                       "while it runs, its suspend, the final round) and "
                                       "restore the image on other frames; draw the pages "
                                       "sent per round, the dirty rate between rounds, and "
                                       "the downtime: the final round and the tail records "
                                       "on the source (virtual time), the receiver's restore "
                                       "after the stream's end (host time).")
    _plot_common(mig, _plot_migration)
    mig.add_argument("--at", metavar="TIME", type=_duration, required=True,
                     help="virtual time the live save starts (e.g. 2ms)")


def _add_image(sub: Any) -> None:
    image = sub.add_parser("image", help="show or check a saved image, or diff two",
                           description="image show IMAGE: its records, page types, pinned "
                                       "tables, VCPUs and xenstore nodes. image check IMAGE...: "
                                       "the whole check a restore makes first, nothing built "
                                       "(exit 2 at the first bad one). image diff A B: what "
                                       "differs between two images (exit 1 if anything).")
    image.add_argument("action", choices=("show", "check", "diff"),
                       help="show IMAGE, check IMAGE..., or diff A B")
    image.add_argument("images", metavar="IMAGE", nargs="+", help="image file(s)")
    image.add_argument("--records", action="store_true",
                       help="show: list every record with its offset and length")
    image.set_defaults(func=cmd_image)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the save/restore demo (make demo)",
                          description="An SMP guest saved mid-run and restored in a new "
                                      "process on other machine frames: pfn -> mfn on both "
                                      "sides, a pgd's entries as mfns, pfns and new mfns, "
                                      "the PM steps of each side, the results beside an "
                                      "uninterrupted run's; then a checkpoint. Exit 1 if "
                                      "anything differs.")
    demo.add_argument("config", metavar="CONFIG", nargs="?",
                      help="the guest (default: examples/save-restore.toml)")
    # the restoring side, run by the demo itself in a new process
    demo.add_argument("--restore-side", nargs=3, metavar=("IMAGE", "JSON", "PGD"),
                      help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pvlab",
        description="A paravirtual machine lab: a Python hypervisor running a pure-Python "
                    "Xen-PV guest kernel on Unicorn x86-64 VCPUs.",
        epilog="Exit codes: 0 the guest powered off cleanly (or ran until --until), "
               "1 the guest crashed or hung, 2 bad input; a configuration with "
               "verdict = \"xtf\" exits as xtf-runner does: 0 SUCCESS, 3 SKIP, 4 ERROR, "
               "5 FAILURE, 6 CRASH.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log hypervisor events (-vv: every hypercall)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_run(sub)
    _add_frames(sub)
    _add_save(sub)
    _add_restore(sub)
    _add_migrate_receive(sub)
    _add_checkpoint(sub)
    _add_image(sub)
    _add_demo(sub)
    _add_explore(sub)
    _add_plot(sub)
    _add_daemon(sub)
    xl.add_parsers(sub)
    _add_registered(sub)
    return p


def _add_daemon(sub: Any) -> None:
    from hypervisor.toolstack.daemon import add_parser
    add_parser(sub)


def _add_registered(sub: argparse._SubParsersAction) -> None:
    """Verbs that other packages register (entry point group ``pvlab.verbs``,
    setup.cfg): each is given the subparsers to add itself to."""
    for ep in entry_points(group="pvlab.verbs"):
        try:
            ep.load()(sub)
        except ImportError as e:
            logging.getLogger(__name__).warning("verb %s not loaded: %s", ep.name, e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="pvlab: %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ImageError, BuildError, CliError, StreamError) as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RestoreError as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return EXIT_GUEST_FAILED
    except GdbKill:
        print("pvlab: the domain was killed from gdb", file=sys.stderr)
        return EXIT_GUEST_FAILED
    except KeyboardInterrupt:
        print("pvlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, as cat and grep do
        _quiet_stdout()
        return EXIT_OK


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush finds
    no closed pipe to complain about."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is no file (a test's capture): nothing will be flushed


if __name__ == "__main__":
    sys.exit(main())
