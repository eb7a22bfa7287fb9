"""The ``pvlab`` command line (verbs named as xl names them where xl has one)."""

from __future__ import annotations

import argparse
import logging
import sys

from hypervisor.domain import Domain
from hypervisor.toolstack.builder import BuildError
from hypervisor.toolstack.config import ConfigError, load_config
from hypervisor.toolstack.control import Request, parse_request
from hypervisor.toolstack.elfimage import ImageError
from hypervisor.toolstack.session import boot, run_domain
from hypervisor.toolstack.timeparse import format_duration, parse_duration

EXIT_OK, EXIT_GUEST_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _stream(dom: Domain, data: bytes) -> None:
    sys.stdout.write(data.decode(errors="replace"))
    sys.stdout.flush()


def _note(msg: str) -> None:
    sys.stdout.write(f"[toolstack] {msg}\n")
    sys.stdout.flush()


def _request(text: str) -> Request:
    try:
        return parse_request(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    hv, dom = boot(cfg, seed=args.seed, clock="fast" if args.fast else "deterministic")
    if args.trace:
        from hypervisor.toolstack.trace import Tracer
        Tracer(dom, args.trace, sys.stdout).attach()
    requests = [*cfg.requests, *args.request]
    result = run_domain(hv, dom, args.until, _stream, requests, _note)
    if result.reason == "poweroff":
        return EXIT_OK
    if result.reason == "running":
        print(f"pvlab: stopped at {format_duration(args.until)} of virtual time; the guest "
              "was still running", file=sys.stderr)
        return EXIT_OK
    if result.reason == "crash":
        print(f"pvlab: {dom.crash_report}", file=sys.stderr)
    elif result.reason == "hung":
        print(f"pvlab: domain {dom.name} hung: every VCPU blocked with no timer set",
              file=sys.stderr)
    else:
        print(f"pvlab: domain {dom.name} shut down ({result.reason})", file=sys.stderr)
    return EXIT_GUEST_FAILED


def cmd_frames(args: argparse.Namespace) -> int:
    from hypervisor.mm.audit import audit
    from hypervisor.toolstack.frames import format_summary, format_table, frame_table
    cfg = load_config(args.config)
    hv, dom = boot(cfg, seed=args.seed)
    run_domain(hv, dom, args.at)
    rows = frame_table(hv, dom)
    types = None
    if args.type:
        types = {t.strip() for t in args.type.split(",")}
        known = {"L1", "L2", "L3", "L4", "writable", "none"}
        if not types <= known:
            raise CliError(f"--type takes a comma-separated list of {', '.join(sorted(known))}")
    state = "running" if dom.is_running else "shut down"
    print(f"at {format_duration(max(v.clock for v in dom.vcpus))} of virtual time ({state})")
    if not args.summary:
        print(format_table(dom, rows, types))
    print(format_summary(rows))
    problems = audit(hv)
    print("invariants: " + ("all hold" if not problems else "; ".join(problems)))
    return EXIT_OK if not problems else EXIT_GUEST_FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pvlab",
        description="A paravirtual machine lab: a Python hypervisor running a pure-Python "
                    "Xen-PV guest kernel on Unicorn x86-64 VCPUs.",
        epilog="Exit codes: 0 the guest powered off cleanly (or ran until --until), "
               "1 the guest crashed or hung, 2 bad input.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log hypervisor events (-vv: every hypercall)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = sub.add_parser("run", help="boot a domain and stream its console",
                         description="Boot the domain CONFIG describes and stream its "
                                     "console to stdout until it shuts down.")
    run.add_argument("config", metavar="CONFIG", help="domain configuration (TOML)")
    run.add_argument("--until", metavar="TIME", type=_duration,
                     help="stop after TIME of virtual time (e.g. 20ms, 1.5s)")
    run.add_argument("--seed", metavar="N", type=int,
                     help="override the configuration's seed (frame shuffling, scheduling)")
    run.add_argument("--fast", action="store_true",
                     help="fast clock: host-time slices instead of deterministic "
                          "instruction-count slices (results stay the same, runs do not "
                          "repeat bit for bit)")
    run.add_argument("--trace", metavar="N", type=int, default=0,
                     help="print the first N instructions each VCPU executes, "
                          "disassembled, with symbols")
    run.add_argument("--request", metavar="'TIME WHAT'", type=_request, action="append",
                     default=[],
                     help="at TIME of virtual time the toolstack asks the guest WHAT: "
                          "poweroff, halt, reboot, suspend (it writes control/shutdown), "
                          "or PATH=VALUE (a xenstore write in the guest's home); a guest "
                          "that suspends is resumed cancelled; repeatable "
                          "(e.g. --request '15ms suspend')")
    run.set_defaults(func=cmd_run)

    frames = sub.add_parser("frames", help="show a domain's frame table at a point in time",
                            description="Boot the domain CONFIG describes, run it to virtual "
                                        "time --at, and print its frame table: per frame its "
                                        "pfn, mfn, type, type and reference counts and pinned "
                                        "bit, a summary per type, and whether the "
                                        "frame-accounting invariants hold.")
    frames.add_argument("config", metavar="CONFIG", help="domain configuration (TOML)")
    frames.add_argument("--at", metavar="TIME", type=_duration, default=parse_duration("5ms"),
                        help="virtual time to stop at (default 5ms)")
    frames.add_argument("--seed", metavar="N", type=int, help="override the configuration's seed")
    frames.add_argument("--type", metavar="TYPES",
                        help="only frames of these types, e.g. L1,L2,L3,L4")
    frames.add_argument("--summary", action="store_true", help="print only the summary")
    frames.set_defaults(func=cmd_frames)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="pvlab: %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ImageError, BuildError, CliError) as e:
        print(f"pvlab: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
