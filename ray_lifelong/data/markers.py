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


def write_in_order(ds, uri: str, rows_per_file: int = 16384, each=None) -> int:
    """Write ``ds``'s rows to ``uri/part-NNNNNN.parquet`` in the order the stream yields them; returns the
    row count. Readers list the files sorted by name, so reading ``uri`` gives the same order back.
    ``each(table)``, if given, sees every table written (a caller's statistics in the same pass)."""
    import pyarrow.parquet as pq

    ds.context.execution_options.preserve_order = (
        True  # this dataset's blocks in order, whatever the caller set
    )
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)
    rows = 0
    for i, table in enumerate(ds.iter_batches(batch_size=rows_per_file, batch_format="pyarrow")):
        pq.write_table(table, f"{path}/part-{i:06d}.parquet", filesystem=fs)
        if each is not None:
            each(table)
        rows += table.num_rows
    return rows


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
        files = [
            i.path
            for i in fs.get_file_info(pafs.FileSelector(s, recursive=True))
            if i.type == pafs.FileType.File
        ]
        for f in sorted(files, key=lambda f: f.endswith(f"/{name}")):
            fs.copy_file(f, d + f[len(s) :])
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
