"""The import graph of the project: one-way (no circles), and the library never imports its scripts.

Every `import` statement counts, also those inside functions (a lazy import is still a dependency).
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("phi3v", "convert", "bench")


def modules() -> dict[str, Path]:
    """Dotted name -> file for phi3v/, convert/, bench/ and train.py."""
    out = {"train": REPO / "train.py"}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports. `from pkg import x` is an edge to pkg.x when that is a module,
    else to pkg itself; relative imports are resolved against the module's package."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            # bench scripts import each other as top-level modules (they run as `python bench/x.py`)
            for cand in (t, f"bench.{t}"):
                while cand and cand not in known:
                    cand = cand.rpartition(".")[0]
                if cand and cand != name:
                    found.add(cand)
                    break
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_parsed():
    g = graph()
    # a few edges that exist, so a broken parser cannot pass the tests below by finding nothing
    assert "phi3v.hf" in g["phi3v.model"] and "phi3v.nf4" in g["phi3v.lora"]
    assert "phi3v.schema" in g["convert.common"] and "phi3v.dist" in g["phi3v.checkpoint"]
    assert {"phi3v", "phi3v.checkpoint", "phi3v.optim"} <= g["train"]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_never_imports_its_scripts():
    bad = {m: sorted(t for t in deps if t == "train" or t.split(".")[0] in ("convert", "bench"))
           for m, deps in graph().items() if m.split(".")[0] == "phi3v"}
    assert {m: d for m, d in bad.items() if d} == {}
