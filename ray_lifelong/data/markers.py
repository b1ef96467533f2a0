"""Completion markers for directories that Ray Data writes (replay memories, packed domains).

Such a directory counts only once its JSON marker exists, and the marker is written last: a directory
without one was cut short (the driver died while writing) and is written again from scratch. Works on any
pyarrow filesystem (local paths, ``s3://`` URIs).
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from ray_lifelong.data.sources import filesystem as _fs


def read_marker(uri: str, name: str) -> dict | None:
    """The record in ``uri/name`` if the directory was written completely, else ``None``."""
    fs, path = _fs(uri)
    if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{name}") as f:
        return json.loads(f.read().decode())


def write_marker(uri: str, name: str, record: dict) -> None:
    fs, path = _fs(uri)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(json.dumps(record).encode())


def reset_dir(uri: str) -> None:
    """Create ``uri`` or empty it (a partial write from an earlier attempt)."""
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path)


def count_rows(uri: str) -> int:
    """Rows of the Parquet files under ``uri``, from their footers (no data read, no Ray Data run)."""
    import pyarrow.dataset as pads

    fs, path = _fs(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."]).count_rows()


def remove_dir(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def move_dir(src: str, dst: str, name: str) -> bool:
    """Move a finished directory into place; ``False`` when ``dst`` already holds a complete one (marker
    ``name``). A rename on a local disk; on S3 a copy with the marker last (two writers racing there may
    both copy: each copy is complete, and the marker makes it count only once whole)."""
    fs, s = _fs(src)
    _, d = _fs(dst)
    info = fs.get_file_info(d)
    if info.type != pafs.FileType.NotFound:
        if read_marker(dst, name) is not None:
            return False
        fs.delete_dir(d)  # left by an older, cut-short write
    if not isinstance(fs, pafs.LocalFileSystem):  # object stores move no directory: copy, marker last
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(s, recursive=True))
                 if i.type == pafs.FileType.File]
        for f in sorted(files, key=lambda f: f.endswith(f"/{name}")):
            fs.copy_file(f, d + f[len(s):])
        fs.delete_dir(s)
        return True
    fs.create_dir(d.rsplit("/", 1)[0], recursive=True)
    try:
        fs.move(s, d)  # a rename: exactly one of two racing writers gets here first
    except OSError:
        if fs.get_file_info(d).type == pafs.FileType.NotFound:
            raise
        return False
    return True
