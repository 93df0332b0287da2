"""Reading a bundle: manifest schema, file hashes, parity status and the I/O contract are all
checked before any backend sees a file. Every refusal is a BundleError that names the problem.

Everything a backend will read is inside the bundle and hashed: no symlinks anywhere in the
bundle's files (a link would let a hashed name point at any file), and an ONNX graph's
external-data files must be relative paths inside the bundle, listed with a hash in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BundleError
from ..models.config import SAMPLES_PER_FRAME, ModelConfig
from ..models.constants import MODULES
from ..models.io_spec import ModuleIO, module_io

# 2: the decoder's photo-only work moved into the appearance stage (dec_* tensors in the contract)
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    cfg: ModelConfig
    target: str
    precision: str
    io: dict[str, ModuleIO]
    files: dict[str, str]  # role (module name, "weights", ...) -> file name in the bundle
    # module -> FLOPs of one call, as the exporter counted them (absent in older bundles)
    flops: dict[str, float] = field(default_factory=dict)

    def file(self, role: str) -> Path:
        return self.path / self.files[role]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: Path) -> str:
    """A file's hash, or for a directory artifact (.mlpackage) the hash of its sorted file hashes."""
    if path.is_file():
        return sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256(f).encode())
    return h.hexdigest()


def _refuse_links(root: Path, fname: str) -> None:
    """No symlink at any step from the bundle root to the file, nor inside a directory artifact."""
    p = root
    for part in Path(fname).parts:
        p = p / part
        if p.is_symlink():
            raise BundleError(
                f"{root}: {fname} goes through a symbolic link ({p.relative_to(root)}); a bundle's "
                "files must be regular files inside it"
            )
    if p.is_dir():
        link = next((q for q in p.rglob("*") if q.is_symlink()), None)
        if link is not None:
            raise BundleError(
                f"{root}: {link.relative_to(root)} is a symbolic link; a bundle's files must be "
                "regular files inside it"
            )


def _verify(root: Path, fname: str, hashes: dict[str, str]) -> None:
    p = root / fname
    if not p.exists():
        raise BundleError(f"{root}: {fname} is missing")
    if tree_sha256(p) != hashes.get(fname):
        raise BundleError(
            f"{root}: {fname} does not match its sha256 in the manifest "
            "(the file was changed or damaged); re-export the bundle"
        )


# The exporter's record of each ONNX file's external-data locations (export/pipeline.py), read
# instead of parsing the graph: the onnx package's import alone is 17 MB and 0.5 s of a runtime
# that needs only onnxruntime. Trusted only with the files' hashes checked (verify): the record
# then describes these very bytes. It is no weaker than a runtime without the onnx package,
# where onnxruntime (>= 1.32) confines the paths to the model's folder itself.
EXTERNAL_DATA = "external_data"


def _external_data(root: Path, m: dict, fname: str, verify: bool) -> list[str]:
    recorded = m.get(EXTERNAL_DATA)
    if not verify or not isinstance(recorded, dict) or fname not in recorded:
        return onnx_external_data(root / fname)
    locations = recorded[fname]
    if not isinstance(locations, list) or not all(isinstance(x, str) for x in locations):
        raise BundleError(
            f"{root}: the manifest's {EXTERNAL_DATA!r} entry for {fname} is malformed"
        )
    return locations


def onnx_external_data(path: Path) -> list[str]:
    """The external-data locations an ONNX file names (every tensor: initializers, constants,
    subgraphs). [] without the onnx package: recent onnxruntime releases confine the paths to the
    model's folder themselves (microsoft/onnxruntime#26776), and the bundle's files are hashed."""
    try:
        import onnx
    except ImportError:
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not parseable: the backend's loader reports it
        return []
    found: list[str] = []

    def tensor(t) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            found.append(loc)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)

    graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for a in node.attribute:
                if a.HasField("t"):
                    tensor(a.t)
    return sorted(set(found))


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(f"a bundle is a directory; {root} is a file")
    mf = root / MANIFEST
    if not mf.exists():
        raise BundleError(
            f"{root} has no {MANIFEST}: not a bundle, or an export that did not finish"
        )
    if mf.is_symlink():
        raise BundleError(f"{mf} is a symbolic link; a bundle's files must be regular files")
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf} is implausibly large ({mf.stat().st_size} bytes)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} does not hold a JSON object")
    return manifest


def _lookahead_samples(streaming: dict) -> int:
    """The manifest's lookahead in samples. Bundles exported before it was counted in samples say
    `lookahead` in whole frames (80 ms = 2); their config reads the same way (models/config.py),
    so they still open and run, with the 80 ms encoder they were exported with."""
    if "lookahead_samples" in streaming:
        return streaming["lookahead_samples"]
    frames = streaming["lookahead"]
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise ValueError(f"lookahead {frames!r} is not a number of frames")
    return frames * SAMPLES_PER_FRAME


def _flops(module: dict) -> float | None:
    """A module's recorded FLOPs per call (manifest `info.flops_per_call`), None when absent."""
    info = module.get("info") or {}
    if not isinstance(info, dict) or "flops_per_call" not in info:
        return None
    x = info["flops_per_call"]
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
        raise ValueError(f"flops_per_call {x!r} is not a count of FLOPs")
    return float(x)


def _block(root: Path, m: dict, key: str) -> tuple[dict, str]:
    """The manifest's optional block `key` ({} when absent) and the message that calls it
    malformed; refused when it is not a mapping."""
    block = m.get(key)
    bad = f"{root}: the manifest's {key!r} block is malformed"
    if block is not None and not isinstance(block, dict):
        raise BundleError(bad)
    return block or {}, bad


def _check_splits(root: Path, m: dict, files: dict[str, str]) -> None:
    """The stored parts of split graphs (runtime/photo_split.py): each names a graph of the
    bundle, and files the bundle lists (so hashed) under that graph's roles."""
    from .photo_split import SPLITS, STORED_FIELDS, part_roles

    splits, bad = _block(root, m, SPLITS)
    for part, entry in splits.items():
        if part not in files or not isinstance(entry, dict) or set(entry) != set(STORED_FIELDS):
            raise BundleError(f"{bad} (entry {part!r})")
        names = [entry[k] for k in STORED_FIELDS[2:]]
        if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in names):
            raise BundleError(f"{bad} (entry {part!r})")
        for role, key in zip(part_roles(part), STORED_FIELDS[:2], strict=True):
            if files.get(role) != entry[key]:
                raise BundleError(f"{bad}: {part}'s {key} part is not the file listed as {role!r}")


def _check_composites(root: Path, m: dict, files: dict[str, str]) -> None:
    """The stored heads of decoder graphs (runtime/composite.py): each of a graph the bundle
    splits, its file listed (so hashed) under the head's role, its boundary names strings."""
    from .composite import COMPOSITES, ROLES, head_role
    from .photo_split import SPLITS

    cuts, bad = _block(root, m, COMPOSITES)
    for part, entry in cuts.items():
        ok = isinstance(entry, dict) and set(entry) == {"head", "table", "bands"}
        ok = ok and part in (m.get(SPLITS) or {}) and isinstance(entry["table"], str)
        bands = entry.get("bands") if ok else None
        ok = ok and isinstance(bands, list) and len(bands) > 0
        ok = ok and all(
            isinstance(b, list) and len(b) == len(ROLES) and all(isinstance(x, str) for x in b)
            for b in bands
        )
        if not ok:
            raise BundleError(f"{bad} (entry {part!r})")
        if files.get(head_role(part)) != entry["head"]:
            raise BundleError(f"{bad}: {part}'s head is not the file listed as {head_role(part)!r}")


def open_bundle(path: str | Path, expect_chunk: int | None = None, verify: bool = True) -> Bundle:
    root = Path(path)
    m = read_manifest(root)
    schema = m.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{root}: manifest schema version {schema!r} is not one this EdgeTalk reads "
            f"({SCHEMA_VERSION}); re-export the bundle with this version"
        )
    try:
        cfg = ModelConfig.from_dict(m["config"])
        target, precision = str(m["target"]), str(m["precision"])
        io = {name: ModuleIO.from_dict(m["modules"][name]["io"]) for name in MODULES}
        files = {str(k): str(v) for k, v in m["files"].items()}
        hashes = {str(k): str(v) for k, v in m["sha256"].items()}
        streaming = m["streaming"]
        declared = (streaming["chunk"], _lookahead_samples(streaming), streaming["cache_slots"])
        flops = {name: _flops(m["modules"][name]) for name in MODULES}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{root}: manifest is missing or has a malformed field ({e})") from None

    if declared != (
        cfg.chunk,
        cfg.lookahead_samples,
        cfg.cache_slots,
    ):
        raise BundleError(f"{root}: manifest streaming block disagrees with its model config")
    if expect_chunk is not None and expect_chunk != cfg.chunk:
        raise BundleError(
            f"{root} was exported for chunk {cfg.chunk}, not {expect_chunk}; "
            f"re-export with --chunk {expect_chunk} or drop --chunk"
        )
    expected_io = module_io(cfg)
    for name in MODULES:
        if io[name] != expected_io[name]:
            raise BundleError(
                f"{root}: the {name} I/O in the manifest does not match the {cfg.name} contract "
                f"for chunk {cfg.chunk} (shapes or names differ)"
            )
    missing = [name for name in MODULES if name not in files]
    if missing:
        raise BundleError(f"{root}: manifest lists no file for {', '.join(missing)}")
    for role, fname in files.items():
        p = root / fname
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise BundleError(f"{root}: file entry {fname!r} points outside the bundle")
        _refuse_links(root, fname)
        if not p.exists():
            raise BundleError(f"{root}: {role} file {fname} is missing")
        if verify:
            _verify(root, fname, hashes)
        if fname.endswith(".onnx"):
            for data in _external_data(root, m, fname, verify):
                rel = (Path(fname).parent / data).as_posix()
                if Path(data).is_absolute() or ".." in Path(data).parts or not data.strip():
                    raise BundleError(
                        f"{root}: {fname} reads external data from {data!r}, outside the bundle"
                    )
                _refuse_links(root, rel)
                if rel not in hashes:
                    raise BundleError(
                        f"{root}: {fname} reads external data {rel!r}, which the manifest does "
                        "not hash; re-export the bundle"
                    )
                if verify:
                    _verify(root, rel, hashes)
    parity = m.get("parity") or {}
    if not isinstance(parity, dict):
        raise BundleError(f"{root}: manifest parity block is malformed")
    failed = [
        name
        for name, res in parity.items()
        if isinstance(res, dict) and res.get("status") == "fail"
    ]
    if failed:
        raise BundleError(
            f"{root}: parity failed for {', '.join(failed)}; this bundle is not usable"
        )
    _check_splits(root, m, files)
    _check_composites(root, m, files)
    known = {name: f for name, f in flops.items() if f is not None}
    return Bundle(root, m, cfg, target, precision, io, files, known)
