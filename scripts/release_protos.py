"""Record a release of the API: the protos as released, kept as a buf image in protos/releases/.

    python scripts/release_protos.py 0.2.0   # protos/releases/0.2.0.json, from protos/ as it is

`scripts/check` runs `buf breaking` against the latest image here, so every change to protos/
is checked against what clients of the last release were built on. The images are committed:
a clone of the repository checks against them with no tags fetched and no network. An image
holds the compiled descriptors (with the well-known types they import), not the comments, as
buf's JSON, indented so that a release reads in a diff.

Cut a release when the version of the API's distributions changes (`version` in
pyproject.toml and clients/pyproject.toml), after the check passes: versions only grow, and a
released image is never rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["latest", "releases", "releases_folder"]

root = Path(__file__).resolve().parent.parent
protos = root / "protos"
releases_folder = protos / "releases"
_version_pattern = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def _version(text: str) -> tuple[int, int, int]:
    match = _version_pattern.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a version MAJOR.MINOR.PATCH")
    return int(match[1]), int(match[2]), int(match[3])


def releases() -> list[Path]:
    """The released images, oldest first."""
    found = [path for path in releases_folder.glob("*.json") if _version_pattern.match(path.stem)]
    return sorted(found, key=lambda path: _version(path.stem))


def latest() -> Path | None:
    """The image of the latest release, or None before the first."""
    found = releases()
    return found[-1] if found else None


def _build(image: Path) -> None:
    buf = Path(sys.executable).parent / "buf"
    if not buf.exists():
        raise SystemExit(f"no buf next to {sys.executable}: pip install buf-bin")
    with tempfile.TemporaryDirectory(prefix="buf-cache-") as cache:
        subprocess.run(
            [str(buf), "build", "--exclude-source-info", "-o", str(image)],
            cwd=protos,
            check=True,
            env={**os.environ, "BUF_CACHE_DIR": cache},
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("version", help="the version released, MAJOR.MINOR.PATCH")
    arguments = parser.parse_args()
    try:
        version = _version(arguments.version)
    except ValueError as error:
        parser.error(str(error))
    previous = latest()
    if previous is not None and version <= _version(previous.stem):
        parser.error(f"{arguments.version} is not after the latest release, {previous.stem}")
    releases_folder.mkdir(exist_ok=True)
    target = releases_folder / f"{arguments.version}.json"
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch) / "image.json"
        _build(built)
        image = json.loads(built.read_text())
    target.write_text(json.dumps(image, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {target.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
