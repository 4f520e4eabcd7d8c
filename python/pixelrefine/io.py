"""HDF5 input (shoeboxes) and output (results), format version 1 (``shoebox-hdf5.md``).

Readers accept any float dtype for a float column and any integer dtype for an integer one,
chunked and compressed datasets (gzip, lzf and the hdf5plugin filters such as
bitshuffle-LZ4), and ignore extra datasets and attributes. Anything else is refused with a
``ShoeboxFileError`` naming the file, the dataset and, where it applies, the first bad row.
Nothing is ever written into an input file, and no existing file is overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
import os
import re
import secrets
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers bitshuffle-LZ4 and the other filters with HDF5)
import numpy as np

from .refine import FLAGS, STATUS, Results
from .shoeboxes import Detector, Images, Pixels, Reflections, ShoeboxSet, group_fields

__all__ = ["ShoeboxFileError", "read_shoeboxes", "write_shoeboxes", "read_results",
           "write_results", "read_tables", "ShoeboxTables", "check_output_path",
           "remove_stale_partials", "COMPRESSION"]

SHOEBOX_FORMAT = "pixelrefine.shoeboxes"
RESULTS_FORMAT = "pixelrefine.results"
FORMAT_VERSION = 1


class ShoeboxFileError(ValueError):
    """A file that does not follow the format; the message names file, dataset and row."""


# (name, kind, shape with the group's row symbol, required). kind: "f" float, "i" integer.
INPUT_LAYOUT: dict[str, list[tuple[str, str, tuple, bool]]] = {
    "detector": [("origin", "f", ("P", 3), True), ("fast_axis", "f", ("P", 3), True),
                 ("slow_axis", "f", ("P", 3), True), ("pixel_size", "f", ("P",), True),
                 ("size", "i", ("P", 2), True), ("read_noise", "f", ("P",), False)],
    "images": [("wavelength", "f", ("N",), True), ("bandwidth", "f", ("N",), True),
               ("A_matrix", "f", ("N", 3, 3), True),
               ("polarization_fraction", "f", ("N",), True), ("crystal_id", "i", ("N",), False)],
    "reflections": [("image_id", "i", ("M",), True), ("panel", "i", ("M",), False),
                    ("miller_index", "i", ("M", 3), True), ("intensity_ref", "f", ("M",), True),
                    ("bbox", "i", ("M", 4), True), ("pixel_offset", "i", ("M",), True),
                    ("background", "f", ("M",), False)],
    "pixels": [("counts", "f", ("T",), True), ("mask", "i", ("T",), True)],
}

# dtypes written (shoebox-hdf5.md); also the canonical in-memory dtypes' integer ranges.
WRITE_DTYPES = {
    "origin": "f8", "fast_axis": "f8", "slow_axis": "f8", "pixel_size": "f8", "size": "i4",
    "read_noise": "f8", "wavelength": "f8", "bandwidth": "f8", "A_matrix": "f8",
    "polarization_fraction": "f8", "crystal_id": "i4", "image_id": "i4", "panel": "i2",
    "miller_index": "i4", "intensity_ref": "f8", "bbox": "i4", "pixel_offset": "i8",
    "background": "f4", "counts": "f4", "mask": "u1",
}

#: Compression choices for writers: name → h5py dataset keywords.
COMPRESSION: dict[str | None, dict[str, Any]] = {
    None: {},
    "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
    "lzf": {"compression": "lzf", "shuffle": True},
    "bitshuffle-lz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


def _check_root(path: str, f: h5py.File, expected_format: str) -> None:
    fmt = f.attrs.get("format")
    if fmt is None or _text(fmt) != expected_format:
        raise ShoeboxFileError(f"{path}: root attribute 'format' is {None if fmt is None else _text(fmt)!r}, "
                               f"expected {expected_format!r}")
    version = f.attrs.get("format_version")
    if version is None or not np.issubdtype(np.asarray(version).dtype, np.integer) \
            or np.asarray(version).size != 1:
        raise ShoeboxFileError(f"{path}: root attribute 'format_version' must be an integer")
    if int(np.asarray(version).reshape(-1)[0]) != FORMAT_VERSION:
        raise ShoeboxFileError(f"{path}: format_version {int(np.asarray(version).reshape(-1)[0])} "
                               f"is not supported (this reader reads {FORMAT_VERSION})")


def _read_symmetry(path: str, f: h5py.File) -> tuple[str | None, np.ndarray | None]:
    """The optional root attributes ``space_group`` (a symbol) and ``unit_cell`` (six floats)."""
    space_group = f.attrs.get("space_group")
    if space_group is not None:
        space_group = _text(space_group).strip()
        if not space_group:
            raise ShoeboxFileError(f"{path}: root attribute 'space_group' is empty")
    cell = f.attrs.get("unit_cell")
    if cell is not None:
        cell = np.asarray(cell)
        if cell.dtype.kind not in "fiu" or cell.size != 6:
            raise ShoeboxFileError(f"{path}: root attribute 'unit_cell' must be six numbers "
                                   f"(a, b, c in Å, α, β, γ in degrees), found {cell!r}")
        cell = cell.astype(np.float64).reshape(6)
        if not (np.all(np.isfinite(cell)) and np.all(cell[:3] > 0)
                and np.all((cell[3:] > 0) & (cell[3:] < 180))):
            raise ShoeboxFileError(f"{path}: root attribute 'unit_cell' {cell.tolist()} is not a "
                                   f"unit cell (lengths > 0, angles in (0, 180) degrees)")
    return space_group, cell


def _open(path: str, expected_format: str) -> h5py.File:
    """Open an HDF5 file read-only and check its root attributes."""
    if PARTIAL_PATTERN.match(os.path.basename(path)):
        raise ShoeboxFileError(f"{path}: is a partial file left by an interrupted write, not a result")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise ShoeboxFileError(f"{path}: not a readable HDF5 file ({error})") from None
    try:
        _check_root(path, f, expected_format)
    except ShoeboxFileError:
        f.close()
        raise
    return f


def _read_dataset(path: str, f: h5py.File, group: str, name: str, kind: str, shape: tuple,
                  sizes: dict[str, int]) -> np.ndarray:
    where = f"/{group}/{name}"
    node = f[group][name]
    if not isinstance(node, h5py.Dataset):
        raise ShoeboxFileError(f"{path}: {where} is not a dataset")
    dtype = node.dtype
    if kind == "f" and dtype.kind != "f":
        raise ShoeboxFileError(f"{path}: {where} must be a float dataset, found dtype {dtype}")
    if kind == "i" and dtype.kind not in "iu" and not (name == "mask" and dtype.kind == "b"):
        raise ShoeboxFileError(f"{path}: {where} must be an integer dataset, found dtype {dtype}")
    symbol = shape[0]
    if node.ndim != len(shape):
        raise ShoeboxFileError(f"{path}: {where} must have {len(shape)} dimension(s), found shape {node.shape}")
    if symbol not in sizes:
        sizes[symbol] = node.shape[0]
    expected = tuple(sizes[symbol] if i == 0 else n for i, n in enumerate(shape))
    if node.shape != expected:
        raise ShoeboxFileError(f"{path}: {where} has shape {node.shape}, expected {expected} "
                               f"(rows must match the group's other datasets)")
    try:
        data = node[()]
    except OSError as error:  # a filter that is not available, a corrupt chunk
        raise ShoeboxFileError(f"{path}: {where} could not be read: {error}") from None
    if kind == "i":
        target = np.dtype(WRITE_DTYPES[name]) if name != "mask" else np.dtype("u1")
        info = np.iinfo(target)
        if data.size:
            bad = np.flatnonzero(((data < info.min) | (data > info.max)).reshape(len(data), -1).any(1))
            if bad.size:
                raise ShoeboxFileError(f"{path}: {where} row {bad[0]}: value out of range for {target}")
    return data


def read_shoeboxes(path: str | os.PathLike) -> ShoeboxSet:
    """Read and validate a shoebox file.

    Parameters
    ----------
    path : str or path-like
        A ``pixelrefine.shoeboxes`` HDF5 file, format version 1.

    Returns
    -------
    ShoeboxSet
        With ``source`` set to the path, ``truth`` filled when the file has ``/truth``.

    Raises
    ------
    ShoeboxFileError
        For a file that does not follow the format: names file, dataset and first bad row.
    """
    path = os.fspath(path)
    with _open(path, SHOEBOX_FORMAT) as f:
        sizes: dict[str, int] = {}
        data: dict[str, dict[str, np.ndarray | None]] = {}
        for group, layout in INPUT_LAYOUT.items():
            if group not in f or not isinstance(f[group], h5py.Group):
                raise ShoeboxFileError(f"{path}: missing group /{group}")
            data[group] = {}
            for name, kind, shape, required in layout:
                if name not in f[group]:
                    if required:
                        raise ShoeboxFileError(f"{path}: missing dataset /{group}/{name}")
                    data[group][name] = None
                    continue
                data[group][name] = _read_dataset(path, f, group, name, kind, shape, sizes)
        truth = _read_truth(f) if "truth" in f else None
        space_group, unit_cell = _read_symmetry(path, f)
    try:
        shoeboxes = ShoeboxSet(detector=Detector(**data["detector"]), images=Images(**data["images"]),
                               reflections=Reflections(**data["reflections"]),
                               pixels=Pixels(**data["pixels"]), source=path, truth=truth,
                               space_group=space_group, unit_cell=unit_cell)
        shoeboxes.core()  # validates every value, naming dataset and row
    except ValueError as error:
        message = str(error)
        raise ShoeboxFileError(message if message.startswith(path) else f"{path}: {message}") from None
    return shoeboxes


@dataclass
class ShoeboxTables:
    """A shoebox file without its pixels: what merging, export and the report need.

    Attributes
    ----------
    detector, images, reflections : dict of str to ndarray
        The file's groups (every dataset of ``INPUT_LAYOUT`` present, canonical dtypes).
    space_group : str or None
        Root attribute ``space_group``.
    unit_cell : ndarray [6] or None
        Root attribute ``unit_cell``.
    truth : dict or None
        ``/truth`` when present (simulated files).
    source : str
        The file's path.
    """

    detector: dict[str, np.ndarray]
    images: dict[str, np.ndarray]
    reflections: dict[str, np.ndarray]
    space_group: str | None
    unit_cell: np.ndarray | None
    truth: dict | None
    source: str

    @property
    def n_images(self) -> int:
        return len(self.images["wavelength"])


def read_tables(path: str | os.PathLike, *, truth: bool = True) -> ShoeboxTables:
    """Read a shoebox file's detector, images and reflections, not its pixels.

    The datasets are checked as ``read_shoeboxes`` checks them (dtype kind, shape, rows, integer
    range); the pixels are not read, so this is cheap on large files.

    Parameters
    ----------
    path : str or path-like
        A ``pixelrefine.shoeboxes`` file.
    truth : bool
        Also read ``/truth`` when present.

    Raises
    ------
    ShoeboxFileError
        Naming file, dataset and first bad row.
    """
    path = os.fspath(path)
    with _open(path, SHOEBOX_FORMAT) as f:
        sizes: dict[str, int] = {}
        groups: dict[str, dict[str, np.ndarray]] = {}
        for group in ("detector", "images", "reflections"):
            if group not in f or not isinstance(f[group], h5py.Group):
                raise ShoeboxFileError(f"{path}: missing group /{group}")
            groups[group] = {}
            for name, kind, shape, required in INPUT_LAYOUT[group]:
                if name not in f[group]:
                    if required:
                        raise ShoeboxFileError(f"{path}: missing dataset /{group}/{name}")
                    continue
                value = _read_dataset(path, f, group, name, kind, shape, sizes)
                groups[group][name] = np.ascontiguousarray(value, dtype=WRITE_DTYPES[name])
        space_group, unit_cell = _read_symmetry(path, f)
        truth_data = _read_truth(f) if truth and "truth" in f else None
    n_images, n_refl = len(groups["images"]["wavelength"]), len(groups["reflections"]["image_id"])
    groups["images"].setdefault("crystal_id", np.zeros(n_images, np.int32))
    groups["reflections"].setdefault("panel", np.zeros(n_refl, np.int16))
    image_id = groups["reflections"]["image_id"]
    bad = np.flatnonzero((image_id < 0) | (image_id >= n_images))
    if bad.size:
        raise ShoeboxFileError(f"{path}: /reflections/image_id row {bad[0]}: {image_id[bad[0]]} is "
                               f"not a row of /images ({n_images} rows)")
    return ShoeboxTables(detector=groups["detector"], images=groups["images"],
                         reflections=groups["reflections"], space_group=space_group,
                         unit_cell=unit_cell, truth=truth_data, source=path)


def _read_truth(f: h5py.File) -> dict:
    truth: dict[str, Any] = {}
    for name, node in f["truth"].items():
        if isinstance(node, h5py.Group):
            truth[name] = {k: v[()] for k, v in node.items() if isinstance(v, h5py.Dataset)}
            truth[name].update({f"@{k}": v for k, v in node.attrs.items()})
    truth.update({f"@{k}": v for k, v in f["truth"].attrs.items()})
    return truth


#: Partial files are hidden beside their output: ``.<name>.pixelrefine-<pid>-<token>.part``.
PARTIAL_PATTERN = re.compile(r"^\.(?P<name>.+)\.pixelrefine-(?P<pid>\d+)-[0-9a-f]+\.part$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Delete the partial files of ``path`` that writers no longer running left behind.

    A writer killed while writing (SIGKILL, power loss) leaves its hidden partial file; the
    output itself only ever appears complete (written, synced, then renamed into place).
    Partial files of a writer still running are left alone. Returns the paths removed.
    """
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = PARTIAL_PATTERN.match(entry)
        if not match or match["name"] != name:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
            removed.append(os.path.join(directory, entry))
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def _atomic_h5(path: str):
    """Yield the name of a hidden partial file beside ``path``; when the block completes, the
    file is synced to disk and renamed onto ``path`` (atomic), otherwise it is deleted. Stale
    partial files of ``path`` left by killed writers are removed first."""
    remove_stale_partials(path)
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f".{name}.pixelrefine-{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        yield partial
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
        try:
            directory_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False,
                      inputs: tuple = ()) -> str:
    """Check before any work that ``path`` can be written: its folder exists and is writable,
    it is none of ``inputs``, and it exists only if ``overwrite``. Returns the path as str.

    Raises
    ------
    ValueError
        Naming the path and what is wrong.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: the folder {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: the folder {directory} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a file")
    for source in inputs:
        if source and os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise ValueError(f"{path}: is an input file; pixelrefine never writes into its input")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; refusing to overwrite (pass overwrite=True / --overwrite)")
    return path


def write_shoeboxes(path: str | os.PathLike, shoeboxes: ShoeboxSet, *, truth: dict | None = None,
                    compression: str | None = "gzip", overwrite: bool = False) -> None:
    """Write a shoebox file (the input format), optionally with ``/truth``.

    Parameters
    ----------
    compression : {None, "gzip", "lzf", "bitshuffle-lz4"}
        Filter for every dataset (chunked when not None).
    overwrite : bool
        Replace an existing file; never the file the set was read from.
    """
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {list(COMPRESSION)}, not {compression!r}")
    path = check_output_path(path, overwrite=overwrite, inputs=(shoeboxes.source,))
    filters = COMPRESSION[compression]
    with _atomic_h5(path) as partial:
        with h5py.File(partial, "w") as f:
            f.attrs["format"] = SHOEBOX_FORMAT
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            write_symmetry(f, shoeboxes.space_group, shoeboxes.unit_cell)
            for group, obj in (("detector", shoeboxes.detector), ("images", shoeboxes.images),
                               ("reflections", shoeboxes.reflections), ("pixels", shoeboxes.pixels)):
                g = f.create_group(group)
                for name, value in group_fields(obj).items():
                    value = np.asarray(value, dtype=WRITE_DTYPES[name])
                    g.create_dataset(name, data=value, **(filters if value.size else {}))
            truth = truth if truth is not None else shoeboxes.truth
            if truth:
                t = f.create_group("truth")
                for key, value in truth.items():
                    if key.startswith("@"):
                        t.attrs[key[1:]] = value
                        continue
                    sub = t.create_group(key)
                    for name, arr in value.items():
                        if name.startswith("@"):
                            sub.attrs[name[1:]] = arr
                        else:
                            sub.create_dataset(name, data=np.asarray(arr))


def write_symmetry(f: h5py.File, space_group: str | None, unit_cell) -> None:
    """Write the optional root attributes ``space_group`` and ``unit_cell`` (when known)."""
    if space_group:
        f.attrs["space_group"] = str(space_group)
    if unit_cell is not None:
        f.attrs["unit_cell"] = np.asarray(unit_cell, dtype=np.float64).reshape(6)


def write_results(path: str | os.PathLike, results: Results, *, overwrite: bool = False) -> None:
    """Write a results file (``pixelrefine.results``, format version 1).

    Refuses to write onto the input file the results came from (whatever ``overwrite``) and
    onto any existing file unless ``overwrite``. The file appears only when complete.
    """
    path = check_output_path(path, overwrite=overwrite, inputs=(results.input_file,))
    with _atomic_h5(path) as partial:
        with h5py.File(partial, "w") as f:
            f.attrs["format"] = RESULTS_FORMAT
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["package_version"] = results.package_version
            f.attrs["objective"] = results.objective
            f.attrs["options"] = json.dumps(results.options, sort_keys=True)
            f.attrs["input_file"] = results.input_file or ""
            for group, arrays in (("images", results.images), ("global", results.crystals),
                                  ("reflections", results.reflections)):
                g = f.create_group(group)
                for name, value in arrays.items():
                    g.create_dataset(name, data=value)
            f["images/covariance"].attrs["parameter_names"] = json.dumps(results.parameter_names)
            f["reflections/flags"].attrs["bits"] = json.dumps(
                {str(bit): name for bit, name in FLAGS.items()})
            f["images/status"].attrs["codes"] = json.dumps(
                {str(code): text for code, text in STATUS.items()})


def read_results(path: str | os.PathLike) -> Results:
    """Read a results file written by ``write_results``."""
    path = os.fspath(path)
    with _open(path, RESULTS_FORMAT) as f:
        for group in ("images", "global", "reflections"):
            if group not in f:
                raise ShoeboxFileError(f"{path}: missing group /{group}")
        groups = {g: {k: v[()] for k, v in f[g].items()} for g in ("images", "global", "reflections")}
        names = f["images/covariance"].attrs.get("parameter_names")
        parameter_names = json.loads(_text(names)) if names is not None else ["G", "B", "R1"]
        return Results(images=groups["images"], crystals=groups["global"],
                       reflections=groups["reflections"], parameter_names=parameter_names,
                       objective=_text(f.attrs.get("objective", "")),
                       options=json.loads(_text(f.attrs.get("options", "{}"))),
                       input_file=_text(f.attrs.get("input_file", "")) or None,
                       package_version=_text(f.attrs.get("package_version", "")))
