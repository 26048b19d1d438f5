"""What the benchmark scripts share: the machine's description and their JSON-lines files.

Imported by the scripts of this folder as ``from _results import ...`` (they run as
``python benchmarks/NAME.py``, so this folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path


def machine() -> str:
    """Host, JAX backend and device kind, processor: the "machine" of a results line."""
    import jax

    device = jax.devices()[0]
    return f"{platform.node()} {device.platform} ({device.device_kind}), {platform.processor()}"


def read_lines(path: Path) -> list[dict]:
    """Every JSON line of ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def append_line(path: Path, line: dict) -> None:
    """Append ``line`` to ``path`` as one JSON line, creating its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
