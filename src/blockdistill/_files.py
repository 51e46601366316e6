"""Files: the atomic writers every saved folder goes through, and the format constants of
blockdistill's folders (no other module of the package is imported here)."""

import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

PathLike = str | os.PathLike
MODEL_FILE = "model.eqx"
CONFIG_FILE = "config.json"
FORMAT = "blockdistill"
SHIPPED_TEACHER = pathlib.Path(__file__).parent / "assets" / "teacher"


def write_folder_atomically(path: PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Run `write(tmp)` on a fresh folder next to `path`, then rename it to `path`.

    Readers see either the old folder or the complete new one, never a half-written one;
    a crash leaves at most a hidden `.NAME.tmp-*` folder, which is removed on error.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_text(path: PathLike, text: str) -> None:
    """Write text to `path` atomically (temporary file + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: PathLike, data: Any) -> None:
    """Write JSON to `path` atomically (temporary file + rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_files(files) -> str:
    """sha256 over files, each by name and content, in the order given."""
    import hashlib

    digest = hashlib.sha256()
    for file in files:
        file = pathlib.Path(file)
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()
