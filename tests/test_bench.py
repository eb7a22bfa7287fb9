"""The benchmarks still run (tiny sizes: figures come from `make bench`, never
from timed asserts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, checkout_env


def test_vcpu_bench_runs():
    r = subprocess.run([sys.executable, "bench/vcpu.py", "--rounds", "2", "--pages", "2",
                        "--calls", "2000", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "x bare" in r.stdout and "x the empty hook" in r.stdout


def test_saverestore_bench_runs():
    r = subprocess.run([sys.executable, "bench/saverestore.py", "--sizes", "16",
                        "--repeat", "1"], capture_output=True, text=True, cwd=ROOT,
                       env=checkout_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "save MiB/s" in r.stdout and "x " in r.stdout


def test_schedule_bench_runs():
    r = subprocess.run([sys.executable, "bench/schedule.py", "--rounds", "1", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "seeded / before" in r.stdout and "slices/s" in r.stdout


def test_debugger_bench_runs():
    r = subprocess.run([sys.executable, "bench/debugger.py", "--rounds", "1", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "a breakpoint set" in r.stdout and "x" in r.stdout


def test_daemon_bench_runs():
    r = subprocess.run([sys.executable, "bench/daemon.py", "--seconds", "0.3"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "blocked guest / busy" in r.stdout


def test_logdirty_bench_runs():
    r = subprocess.run([sys.executable, "bench/logdirty.py", "--pages", "4", "--span-ms", "2",
                        "--period-ms", "1", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "x off" in r.stdout and "wp" in r.stdout


def test_migrate_bench_runs():
    r = subprocess.run([sys.executable, "bench/migrate.py", "--sizes", "16", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "downtime" in r.stdout and "x\n" in r.stdout


def test_receive_bench_runs():
    r = subprocess.run([sys.executable, "bench/receive.py", "--sizes", "16", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "streaming" in r.stdout and "x " in r.stdout


def test_remus_bench_runs():
    r = subprocess.run([sys.executable, "bench/remus.py", "--mem", "16", "--span-ms", "30"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epochs/s of wall time" in r.stdout and "x (" in r.stdout


def test_daemon_live_bench_runs():
    r = subprocess.run([sys.executable, "bench/daemon_live.py", "--memory", "16",
                        "--repeat", "1"], capture_output=True, text=True, cwd=ROOT,
                       env=checkout_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "plain median" in r.stdout and "x " in r.stdout


def test_lazyrestore_bench_runs():
    r = subprocess.run([sys.executable, "bench/lazyrestore.py", "--sizes", "16", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "lazy's parts" in r.stdout and "mem_protect per frame" in r.stdout


@pytest.mark.slow
def test_postcopy_bench_runs():
    r = subprocess.run([sys.executable, "bench/postcopy.py", "--mib", "8", "--run", "1ms"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pure / pre-copy: downtime" in r.stdout and "faults/s" in r.stdout


def test_console_bench_runs():
    r = subprocess.run([sys.executable, "bench/console.py", "--kib", "8", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pvlab KiB/s" in r.stdout and "x\n" in r.stdout


@pytest.mark.parametrize("arg", ["--kib", "--repeat"])
def test_console_bench_refuses_nothing_to_do_in_one_line(arg):
    r = subprocess.run([sys.executable, "bench/console.py", arg, "0"], capture_output=True,
                       text=True, cwd=ROOT, env=checkout_env(), timeout=300)
    assert r.returncode == 1 and r.stderr == f"bench/console.py: {arg} 0: give 1 or more\n"


def test_blk_bench_runs():
    r = subprocess.run([sys.executable, "bench/blk.py", "--blocks", "4", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "guest / host" in r.stdout and "MiB/s" in r.stdout


def test_net_bench_runs():
    r = subprocess.run([sys.executable, "bench/net.py", "--pings", "3", "--repeat", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "packets/s" in r.stdout and "guests / wire alone" in r.stdout
