"""The layers: guestos imports only hypervisor.public; the hypervisor never
imports guestos (it loads whatever kernel an image names); the toolstack sees
the hypervisor only through its control interface (hypervisor.domctl, as libxc
sees Xen through domctls and foreign mappings) and the public ABI; and no
package has an import cycle, function-local and type-checking imports counted.

The one cycle allowed is Xen's own: a domain owns its vcpus and a vcpu knows
its domain (xen/include/xen/sched.h declares both structs together)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Xen's struct domain <-> struct vcpu knot
ALLOWED_KNOTS = [{"hypervisor.domain", "hypervisor.cpu.vcpu"}]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module_name(path).split(".")
    keep = len(base) - node.level + (1 if path.name == "__init__.py" else 0)
    return ".".join(base[:keep] + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    rel = ROOT / name.replace(".", "/")
    return rel.with_suffix(".py").exists() or (rel / "__init__.py").exists()


def imports(package: str) -> list[tuple[Path, str]]:
    """Every module imported anywhere in a file of ``package``: at top level, in
    a function body or under TYPE_CHECKING; ``from m import x`` counts m.x if
    that is a module, else m."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(path, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(path, node)
                subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
                out += [(path, m) for m in subs] or [(path, mod)]
    return out


def graph(package: str) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path, mod in imports(package):
        src = module_name(path)
        g.setdefault(src, set())
        if mod.split(".")[0] == package.split("/")[0] and mod != src and _is_module(mod):
            g[src].add(mod)
    return g


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(scc)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_guestos_imports_only_the_public_abi():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("guestos")
           if m.split(".")[0] == "hypervisor" and not m.startswith("hypervisor.public")]
    assert bad == []


def test_hypervisor_never_imports_guestos():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor")
           if m.split(".")[0] == "guestos"]
    assert bad == []


def test_hypervisor_never_imports_the_labs():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor")
           if m.split(".")[0] == "labs"]
    assert bad == []


def test_labs_run_the_guest_kernel_only_through_pvlab():
    """A lab names guestos modules as text: importing them would load the
    reference into the grader, where a student's file could not replace it."""
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("labs")
           if m.split(".")[0] == "guestos"]
    assert bad == []


def test_public_abi_imports_nothing_else_of_the_hypervisor():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor/public")
           if m.split(".")[0] == "hypervisor" and not m.startswith("hypervisor.public")]
    assert bad == []


def test_toolstack_sees_the_hypervisor_only_through_its_control_interface():
    allowed = ("hypervisor.public", "hypervisor.domctl", "hypervisor.toolstack")
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor/toolstack")
           if m.split(".")[0] == "hypervisor" and not m.startswith(allowed)]
    assert bad == []


def test_devices_are_given_what_they_use():
    """A device model is given its domain's memory, the frame operations it
    uses, a function that sends its event and the host's timers by whoever
    creates it: it imports none of the hypervisor's higher layers."""
    higher = ("hypervisor.core", "hypervisor.domain", "hypervisor.toolstack",
              "hypervisor.domctl", "hypervisor.cpu", "hypervisor.evtchn", "hypervisor.scheduler",
              "hypervisor.machine", "hypervisor.native", "hypervisor.hypercalls")
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imports("hypervisor/devices")
           if m.startswith(higher)]
    assert bad == []


def test_guestos_has_no_import_cycle():
    assert cycles(graph("guestos")) == []


def test_hypervisor_has_no_import_cycle_but_xens_own():
    assert [c for c in cycles(graph("hypervisor")) if c not in ALLOWED_KNOTS] == []


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(g) == [{"a", "b", "c"}]


# what the toolstack keeps of a domain and of the machine (toolstack/context.py):
# the store, a domain's connection to it, its console daemon and sink, its image,
# where its p2m list is
TOOLSTACK_STATE = {"xenstore", "store", "console_backend", "console_sink", "image",
                   "p2m_frames", "p2m_size"}


def test_the_hypervisors_objects_hold_no_toolstack_state():
    """Xen's struct domain knows nothing of xenstored or xenconsoled, and the
    guest's p2m is the guest's and the toolstack's business: neither the
    domain nor the machine names any of it, not even to tear it down."""
    for rel in ("hypervisor/domain.py", "hypervisor/core.py"):
        tree = ast.parse((ROOT / rel).read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert sorted(names & TOOLSTACK_STATE) == [], rel
        assert [n for n in names if "xenstore" in n or "p2m" in n] == [], rel
