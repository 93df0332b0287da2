"""Reading a bundle: manifest schema, file hashes, parity status and the I/O contract are all
checked before any backend sees a file. Every refusal is a BundleError that names the problem."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from ..models.config import ModelConfig
from ..models.edgetalk import MODULES
from ..models.io_spec import ModuleIO, module_io

SCHEMA_VERSION = 1
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
    if mf.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf} is implausibly large ({mf.stat().st_size} bytes)")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} does not hold a JSON object")
    return manifest


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
        declared = (streaming["chunk"], streaming["lookahead"], streaming["cache_slots"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"{root}: manifest is missing or has a malformed field ({e})") from None

    if declared != (
        cfg.chunk,
        cfg.lookahead,
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
        if not p.exists():
            raise BundleError(f"{root}: {role} file {fname} is missing")
        if verify:
            got = tree_sha256(p)
            if got != hashes.get(fname):
                raise BundleError(
                    f"{root}: {fname} does not match its sha256 in the manifest "
                    "(the file was changed or damaged); re-export the bundle"
                )
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
    return Bundle(root, m, cfg, target, precision, io, files)
