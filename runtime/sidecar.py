"""The JSON sidecar that travels with every ``engine.plan``: what the engine is, how it was built, and how to
feed it. Schema ``eet-trt/engine/1``; :func:`read` validates what later stages rely on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eet.errors import EetError

SCHEMA = "eet-trt/engine/1"
FILENAME = "engine.json"
REQUIRED = ("schema", "family", "model", "dtype", "io", "profiles", "plugins", "tensorrt", "build", "files",
            "plan_sha256")


def write(out_dir: str | Path, data: dict) -> Path:
    """Write ``data`` (with ``schema`` set) to ``out_dir/engine.json``."""
    path = Path(out_dir) / FILENAME
    data = {"schema": SCHEMA, **data}
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"sidecar lacks {missing}")
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def read(out_dir: str | Path, verify_plan: bool = True) -> dict:
    """Read and validate ``out_dir/engine.json``.

    Args:
        out_dir: a directory written by ``eet build``.
        verify_plan: also check that ``engine.plan`` exists and matches the recorded sha256.

    Raises:
        EetError: missing or unreadable sidecar, another schema, missing keys, plan missing or altered.
    """
    folder = Path(out_dir)
    path = folder / FILENAME
    if not path.is_file():
        raise EetError(f"{folder} has no {FILENAME}: point to a directory written by `eet build`")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EetError(f"{path} is not valid JSON ({exc}); rebuild with `eet build`") from exc
    if data.get("schema") != SCHEMA:
        raise EetError(f"{path} has schema {data.get('schema')!r}, this EET reads {SCHEMA!r}; rebuild the engine")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise EetError(f"{path} lacks {missing}; rebuild with `eet build`")
    if verify_plan and data["files"].get("plan"):
        plan = folder / data["files"]["plan"]
        if not plan.is_file():
            raise EetError(f"{plan} is missing; rebuild with `eet build`")
        digest = sha256_file(plan)
        if digest != data["plan_sha256"]:
            raise EetError(f"{plan} does not match its sidecar (sha256 {digest[:12]}..., recorded "
                           f"{data['plan_sha256'][:12]}...): the plan or the sidecar was altered; rebuild")
    return data


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
