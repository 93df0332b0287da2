"""The package's shape, checked: layers import downward only, nothing imports in a cycle, and the
run path (scheduler, bundle reader, non-torch backends) loads without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `edgetalk`
SKIP_DIRS = {"tests", "runs", "examples", "docs", "bundles", "build"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP_DIRS or rel.parts[0].startswith(".") or "egg-info" in rel.parts[0]:
            continue
        parts = ["edgetalk", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported edgetalk module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = "", [a.name for a in node.names]
        else:
            continue
        module_level = id(node) in top and not _in_type_checking(tree, node)
        for cand in [*names, target]:
            if cand in MODULES:
                found.append((cand, module_level))
                break
            if cand.startswith("edgetalk.") and cand.rsplit(".", 1)[0] in MODULES:
                found.append((cand.rsplit(".", 1)[0], module_level))
                break
    return found


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        guarded = isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        if guarded and any(n is node for n in ast.walk(stmt)):
            return True
    return False


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_runtime_imports_neither_converters_nor_export():
    """Anywhere in the file, lazy imports included: the run path never reaches up."""
    bad = [
        f"{m} imports {t}"
        for m, deps in GRAPH.items()
        if _layer(m) in ("runtime", "runtime_cuda", "models")
        for t, _ in deps
        if _layer(t) in ("converters", "export", "serve", "benchmarks", "training", "integrations")
    ]
    assert not bad, "\n".join(bad)


def test_models_import_nothing_above_them():
    bad = [
        f"{m} imports {t}"
        for m, deps in GRAPH.items()
        if _layer(m) == "models"
        for t, _ in deps
        if _layer(t) not in ("models", "errors")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_module_level():
    """Module-level imports form no cycle (an import-time cycle is what breaks on reordering)."""
    edges = {m: sorted({t for t, top in deps if top and t != m}) for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, []):
            # a package's __init__ importing its own submodules is not a cycle of layers
            if t.startswith(m + "."):
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif not state.get(t):
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports():
    """The graph is not empty by accident: known edges are found."""
    assert ("edgetalk.runtime.backend", True) in GRAPH["edgetalk.runtime.scheduler"]
    assert any(t == "edgetalk.runtime.audio_io" for t, _ in GRAPH["edgetalk.runtime.session"])
    assert len(MODULES) > 80


TORCH_FREE = (
    "edgetalk.runtime.scheduler",
    "edgetalk.runtime.bundle",
    "edgetalk.runtime.loader",
    "edgetalk.runtime.session",
    "edgetalk.runtime.backend_onnxruntime",
    "edgetalk.runtime.backend_mlx",
    "edgetalk.runtime.backend_coreml",
)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_run_path_imports_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", f"importing {module} imported torch"


def test_onnx_bundle_opens_and_streams_without_torch(tmp_path):
    """Not only the imports: opening an ONNX bundle and streaming a chunk loads no torch."""
    from .conftest import need

    need("onnxruntime", "the onnx extra is not installed")
    from edgetalk.export.pipeline import export_bundle
    from edgetalk.models.checkpoint import save_checkpoint

    from .conftest import MICRO, seeded_model

    ck = tmp_path / "micro.safetensors"
    save_checkpoint(seeded_model(MICRO, seed=2), ck)
    out = tmp_path / "b"
    assert export_bundle("onnx", "fp32", checkpoint=ck, out=out, progress=False, e2e_frames=4).ok
    code = (
        "import sys, numpy as np\n"
        "from edgetalk.runtime.loader import open_backend\n"
        "from edgetalk.runtime.avatar import prepare_avatar\n"
        "from edgetalk.runtime.scheduler import StreamScheduler\n"
        f"be = open_backend(bundle={str(out)!r})\n"
        "r = be.cfg.render.resolution\n"
        "s = StreamScheduler(be, prepare_avatar(None, r))\n"
        "n = len(s.push_audio(np.zeros(16000, np.float32)))\n"
        "print(n, 'torch' in sys.modules)\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    frames, torch_loaded = got.stdout.split()
    assert int(frames) > 0 and torch_loaded == "False"


def test_backends_sharing_a_model_keep_their_own_streaming_settings():
    """No mutable config shared through the model: a second backend at another chunk size leaves
    the first one's settings and output alone, and the weights are shared, not copied."""
    import numpy as np

    from edgetalk.runtime.backend_torch import TorchBackend
    from edgetalk.runtime.scheduler import StreamScheduler

    from .conftest import MICRO, seeded_model, speechlike

    model = seeded_model(MICRO, seed=1)
    avatar = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pcm = speechlike(1.0, seed=4)

    def frames(backend):
        s = StreamScheduler(backend, avatar, seed=2)
        return np.stack([f.rgb for f in s.push_audio(pcm) + s.flush()])

    a = TorchBackend(model, MICRO.with_streaming(chunk=2))
    before = frames(a)
    b = TorchBackend(model, MICRO.with_streaming(chunk=5))
    frames(b)
    assert a.cfg.chunk == 2 and a.model.generator.cfg.chunk == 2
    assert b.model.generator.cfg.chunk == 5 and model.cfg.chunk == MICRO.chunk
    np.testing.assert_array_equal(frames(a), before)
    wa, wb = a.model.decoder.state_dict(), b.model.decoder.state_dict()
    assert all(wa[k].data_ptr() == wb[k].data_ptr() for k in wa)  # one copy of the weights
