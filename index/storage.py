"""The on-disk file set of an index: a folder of raw `.npy` arrays plus `header.json` (format, version, sizes,
SHA-256 checksums, metadata), written atomically and memory-mapped on load.

    kb/
      header.json    {"format": "constrain.trie", "version": 1, "build_id", "arrays": {...}, "meta": {...}}
      labels.npy     one plain .npy file per array (no pickle), mapped with np.load(mmap_mode="r")
      ...

Writing (`FileSetWriter`): arrays go into a hidden temporary sibling folder `.kb.tmp-<id>/`; `commit()` fsyncs
them, writes the header (last), and renames the folder to `kb/`. An exception before `commit()` removes the
temporary folder, and a folder without a header never loads, so an interrupted build leaves nothing loadable.

Loading (`load_file_set`): the header is parsed and checked (format, version, array list); every file's size
must equal the size the header records and its `.npy` header must give the recorded dtype and shape -- this is
always done and costs O(number of files). Full SHA-256 checksums (reading every byte) are checked when
`verify=True`, or by default (`verify=None`) when the whole file set is at most `VERIFY_ON_LOAD_BYTES`
(64 MiB, about 50 ms to hash here), so small indexes are always fully checked and large ones open in
milliseconds. Every problem raises `IndexFormatError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from constrain.errors import ConstraintError, IndexFormatError

HEADER_NAME = "header.json"
VERIFY_ON_LOAD_BYTES = 64 << 20
_HASH_BLOCK = 8 << 20


@dataclass
class FileSet:
    """A loaded file set: its folder, parsed header and arrays (read-only memory maps or in-memory copies)."""

    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Any]:
        """The free-form metadata stored at build time (tokenizer, template, counts ...)."""
        return self.header.get("meta", {})

    @property
    def build_id(self) -> str:
        """A random id written at build time: equal only for the same build."""
        return str(self.header["build_id"])

    @property
    def nbytes(self) -> int:
        """Total size of the array files in bytes (the header excluded)."""
        return sum(int(spec["bytes"]) for spec in self.header["arrays"].values())


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 8 MiB blocks (hex digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class FileSetWriter:
    """Write a file set atomically into `out` (see the module docstring).

    Use as a context manager: leaving the block by an exception, or without calling `commit()`, deletes the
    temporary folder. Raises `ConstraintError` if `out` exists and `overwrite` is False.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        kind: str,
        version: int,
        overwrite: bool = False,
        durable: bool = True,
    ):
        self.out = Path(out)
        self.durable = durable  # fsync before the rename (off only for throw-away folders)
        self.kind = kind
        self.version = version
        self.overwrite = overwrite
        self._check_target()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        self._arrays: dict[str, str] = {}
        self._committed = False

    def _check_target(self) -> None:
        if self.out.exists() and not self.overwrite:
            raise ConstraintError(f"{self.out} already exists (pass overwrite=True / --force to replace it)")

    def __enter__(self) -> FileSetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def abort(self) -> None:
        """Delete the temporary folder (nothing is left that loads)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def scratch(self, name: str) -> Path:
        """A scratch folder inside the temporary folder, deleted at commit (for spill files)."""
        path = self.tmp / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _file(self, name: str) -> Path:
        if not name.isidentifier():
            raise ConstraintError(f"array name {name!r} must be an identifier")
        if name in self._arrays:
            raise ConstraintError(f"array {name!r} written twice")
        self._arrays[name] = f"{name}.npy"
        return self.tmp / f"{name}.npy"

    def save(self, name: str, array: np.ndarray) -> None:
        """Write `array` as `<name>.npy` (plain .npy, no pickle)."""
        np.save(self._file(name), np.ascontiguousarray(array), allow_pickle=False)

    def open_array(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A writable memory map for `<name>.npy` of this dtype and shape, to fill in place (large arrays)."""
        return np.lib.format.open_memmap(self._file(name), mode="w+", dtype=dtype, shape=shape)

    def commit(self, meta: Mapping[str, Any]) -> FileSet:
        """Checksum and fsync the arrays, write the header, and rename the folder into place.

        Returns the file set's header (arrays are not loaded). Raises `ConstraintError` if `out` appeared in
        the meantime and `overwrite` is False.
        """
        shutil.rmtree(self.tmp / "scratch", ignore_errors=True)
        arrays: dict[str, Any] = {}
        for name, filename in self._arrays.items():
            path = self.tmp / filename
            if self.durable:
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            descr, shape = npy_header(path)
            arrays[name] = {
                "file": filename,
                "dtype": descr,
                "shape": list(shape),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        header = {
            "format": self.kind,
            "version": self.version,
            "build_id": uuid.uuid4().hex,
            "arrays": arrays,
            "meta": dict(meta),
        }
        header_path = self.tmp / HEADER_NAME
        header_path.write_text(json.dumps(header, indent=1, sort_keys=True))
        if self.durable:
            with open(header_path, "rb+") as f:
                os.fsync(f.fileno())
        self._check_target()
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:12]}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return FileSet(self.out, header)


def read_header(path: str | os.PathLike, *, kind: str, version: int) -> dict[str, Any]:
    """Parse and check `path/header.json`; raises `IndexFormatError` naming the file and the problem."""
    folder = Path(path)
    header_path = folder / HEADER_NAME
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: no index here (not a folder)")
    if not header_path.is_file():
        raise IndexFormatError(f"{header_path}: missing (not an index, or an interrupted build)")
    try:
        header = json.loads(header_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{header_path}: unreadable header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != kind:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise IndexFormatError(f"{header_path}: format {found!r}, expected {kind!r}")
    if header.get("version") != version:
        raise IndexFormatError(
            f"{header_path}: format version {header.get('version')!r} is not supported (this build reads "
            f"version {version}; rebuild the index)"
        )
    arrays = header.get("arrays")
    if not isinstance(arrays, dict) or not isinstance(header.get("build_id"), str):
        raise IndexFormatError(f"{header_path}: header lacks its 'arrays' table or 'build_id'")
    for name, spec in arrays.items():
        keys = ("file", "dtype", "shape", "bytes", "sha256")
        if not isinstance(spec, dict) or any(k not in spec for k in keys):
            raise IndexFormatError(f"{header_path}: entry for array {name!r} lacks one of {keys}")
        if Path(spec["file"]).name != spec["file"]:
            raise IndexFormatError(f"{header_path}: array {name!r} names a file outside the folder")
    return header


def load_file_set(
    path: str | os.PathLike,
    *,
    kind: str,
    version: int,
    required: tuple[str, ...] = (),
    verify: bool | None = None,
    mmap: bool = True,
) -> FileSet:
    """Open a file set: check the header and every file's size, dtype and shape; map the arrays read-only.

    `verify=True` also checks every SHA-256 checksum; `None` does so when the file set is at most
    `VERIFY_ON_LOAD_BYTES`; `False` never. `mmap=False` reads the arrays into memory instead.
    Raises `IndexFormatError` (corrupt, truncated, wrong version, missing array) naming the file.
    """
    folder = Path(path)
    header = read_header(folder, kind=kind, version=version)
    specs = header["arrays"]
    missing = [name for name in required if name not in specs]
    if missing:
        raise IndexFormatError(f"{folder / HEADER_NAME}: arrays {missing} missing from the header")
    total = 0
    for spec in specs.values():
        file = folder / spec["file"]
        if not file.is_file():
            raise IndexFormatError(f"{file}: missing")
        size = file.stat().st_size
        if size != spec["bytes"]:
            raise IndexFormatError(
                f"{file}: {size} bytes, the header records {spec['bytes']} (truncated or replaced)"
            )
        total += size
    if verify or (verify is None and total <= VERIFY_ON_LOAD_BYTES):
        verify_checksums(folder, header)
    arrays = {name: _open_array(folder / spec["file"], spec, mmap) for name, spec in specs.items()}
    return FileSet(folder, header, arrays)


def verify_checksums(path: str | os.PathLike, header: dict[str, Any]) -> None:
    """Hash every array file and compare with the header; raises `IndexFormatError` on the first mismatch."""
    folder = Path(path)
    for spec in header["arrays"].values():
        file = folder / spec["file"]
        try:
            digest = file_sha256(file)
        except OSError as exc:
            raise IndexFormatError(f"{file}: unreadable ({exc})") from exc
        if digest != spec["sha256"]:
            raise IndexFormatError(
                f"{file}: checksum mismatch (sha256 {digest[:16]}..., header {spec['sha256'][:16]}...)"
            )


def npy_header(file: Path) -> tuple[str, tuple[int, ...]]:
    """The dtype descriptor and shape recorded in a `.npy` file's own header (C order only).

    Raises `IndexFormatError` if the file is not a plain, C-ordered `.npy` array.
    """
    try:
        with open(file, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise IndexFormatError(f"{file}: not a readable .npy array ({exc})") from exc
    if fortran or dtype.hasobject:
        raise IndexFormatError(f"{file}: Fortran-ordered or object arrays are not index arrays")
    return np.lib.format.dtype_to_descr(dtype), tuple(int(n) for n in shape)


def _open_array(file: Path, spec: dict[str, Any], mmap: bool) -> np.ndarray:
    descr, shape = npy_header(file)
    if descr != spec["dtype"] or list(shape) != list(spec["shape"]):
        raise IndexFormatError(
            f"{file}: holds {descr} {list(shape)}, the header records {spec['dtype']} {spec['shape']}"
        )
    expected = np.dtype(descr).itemsize * int(np.prod(shape, dtype=np.int64))
    try:
        array = np.load(file, mmap_mode="r" if mmap and expected else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise IndexFormatError(f"{file}: not a readable .npy array ({exc})") from exc
    if array.nbytes != expected:
        raise IndexFormatError(f"{file}: holds {array.nbytes} data bytes, its header implies {expected}")
    return array
