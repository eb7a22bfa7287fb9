"""Migration over a real ssh, as xl migrates: the test starts an sshd on
loopback (a free port, a host key and a user key made for it, its config in
a temporary directory, as this user) and ``pvlab run`` migrates its guest
through ``ssh 127.0.0.1 pvlab migrate-receive``, -s naming a small wrapper
that gives ssh the port and key and the far side this checkout. The guest
ends over there with the results of an uninterrupted run, its console
coming back on ssh's stderr. Remus takes the same rune with ``-r``, and
its backup fails over when the primary is killed. Nothing is skipped:
without a working sshd the test fails and says why."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.toolstack.config import load_config
from hypervisor.toolstack.session import run_domain
from tests.conftest import ROOT, booting, checkout_env, make_config
from tests.test_migrate import AT_NS, GUEST, LIMIT_NS, outcome, toml

SSHD = "/usr/sbin/sshd"
SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {tmp}/host_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel INFO
"""
# the -s command: ssh with the test's port and key; the far side finds this
# checkout's pvlab (a shim on PATH) and keeps its temporary files in rx/
WRAPPER = """\
#!/bin/sh
host=$1; shift
exec ssh -F /dev/null -p {port} -i {tmp}/user_key -o BatchMode=yes \\
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \\
    "$host" "PATH={tmp}/bin:\\$PATH PYTHONPATH={root} TMPDIR={tmp}/rx $*"
"""
PVLAB_SHIM = "#!/bin/sh\nexec {python} -m hypervisor \"$@\"\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """A running sshd on 127.0.0.1; yields (the -s wrapper, the far side's TMPDIR)."""
    assert os.path.exists(SSHD), (f"{SSHD} is missing: apt-get install openssh-server "
                                  "(.ci/run installs it)")
    assert shutil.which("ssh") and shutil.which("ssh-keygen"), "the ssh client is missing"
    if os.geteuid() == 0:
        # sshd run by root wants its privilege separation directory, which the
        # package's service would have made
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    tmp = tmp_path_factory.mktemp("sshd")
    (tmp / "rx").mkdir()
    (tmp / "bin").mkdir()
    _keygen(tmp / "host_key")
    _keygen(tmp / "user_key")
    (tmp / "authorized_keys").write_text((tmp / "user_key.pub").read_text())
    port = _free_port()
    (tmp / "sshd_config").write_text(SSHD_CONFIG.format(port=port, tmp=tmp))
    for name, text in (("wrap", WRAPPER.format(port=port, tmp=tmp, root=ROOT)),
                       ("bin/pvlab", PVLAB_SHIM.format(python=sys.executable))):
        (tmp / name).write_text(text)
        (tmp / name).chmod(0o755)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")],
                            stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    if "Server listening" not in first:
        proc.kill()
        rest = proc.communicate()[1]
        pytest.fail(f"sshd did not start: {(first + rest).strip()}")
    try:
        yield tmp / "wrap", tmp / "rx"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("how", ["", "--postcopy "], ids=["pre-copy", "post-copy"])
def test_a_guest_migrates_over_ssh_to_pvlab_migrate_receive(sshd, tmp_path, how):
    """Pre-copy, and post-copy (its pages and faults on ssh's pipes)."""
    wrap, rx_tmp = sshd
    with booting() as boot:
        ref = run_domain(*boot(make_config(GUEST, vcpus=2, name="mig")), LIMIT_NS)
    config = toml(tmp_path / "mig.toml")
    p = subprocess.run([sys.executable, "-m", "hypervisor", "run", str(config), "--request",
                        f"{AT_NS // 1_000_000}ms migrate {how}-s {wrap} ssh:127.0.0.1"],
                       capture_output=True, text=True, env=checkout_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # the far side's console comes back on ssh's stderr (its stdout is the wire)
    assert outcome(p.stdout + p.stderr) == outcome(ref.console.decode())
    err = p.stderr.splitlines()
    assert "migration target: Domain started successfully." in err
    assert "Migration successful." in err
    assert "[cpu0] suspend hypercall returned 0 (resumed in a new domain)" in err
    assert f"migrated live to `exec {wrap} 127.0.0.1 pvlab migrate-receive`" in p.stdout
    assert os.listdir(rx_tmp) == []


REMUS_EXAMPLE = ROOT / "examples" / "live-save.toml"
PROGRAMS = ("dirtier", "hashchain", "counter")


def _programs(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(PROGRAMS))


def test_remus_over_ssh_fails_over_with_every_line_once(sshd):
    """``xl remus``'s rune: ``ssh 127.0.0.1 pvlab migrate-receive -r``, one
    connection carrying the stream, the output channel's records and the
    acknowledgements. The primary is killed (SIGKILL) once it has let out
    three lines of the programs' output; the backup fails over, and what
    the primary let out plus what the backup shows (on ssh's stderr: its
    stdout was the wire) is the uninterrupted run's output, each line once."""
    wrap, rx_tmp = sshd
    with booting() as boot:
        ref = run_domain(*boot(load_config(REMUS_EXAMPLE)))
    p = subprocess.Popen([sys.executable, "-m", "hypervisor", "run", str(REMUS_EXAMPLE),
                          "--request", f"3ms remus -i 2 -s {wrap} ssh:127.0.0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=checkout_env())
    out, started, seen = bytearray(), False, 0
    while seen < 3:
        line = p.stdout.readline()
        assert line, "the primary ended before it was killed"
        out += line
        started = started or b"Remus to the backup" in line
        seen += started and line.decode().startswith(PROGRAMS)
    os.kill(p.pid, signal.SIGKILL)
    rest = p.stdout.read()   # what readline has buffered, and the rest
    err_text = p.stderr.read().decode()  # it ends when ssh's session does
    p.wait()
    assert "Remus Failover for domain" in err_text, err_text[-3000:]
    assert _programs((bytes(out) + rest).decode() + err_text) == _programs(ref.console.decode())
    assert os.listdir(rx_tmp) == []
