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

from .refine import (FLAGS, GLOBAL_CONTRIBUTIONS, IMAGE_FIELDS, REFLECTION_FIELDS, STATUS,
                     CrystalModel, Results)
from .shoeboxes import (Detector, Images, Pixels, Reflections, ShoeboxSet, as_column,
                        group_fields)

__all__ = ["ShoeboxFileError", "read_shoeboxes", "write_shoeboxes", "read_results",
           "write_results", "check_output_path", "remove_stale_partials", "memory_limit",
           "COMPRESSION"]

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


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (h5py's KeyError messages without their quotes)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


#: At most this many soft links are followed from one name (HDF5's own limit is 16).
MAX_SOFT_LINKS = 16


def memory_limit() -> int:
    """Bytes a file's datasets may take in memory: the machine's physical memory (the
    environment variable ``PIXELREFINE_MAX_READ_BYTES`` overrides it)."""
    override = os.environ.get("PIXELREFINE_MAX_READ_BYTES")
    if override:
        return int(float(override))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 34


class _FileReader:
    """Reads one HDF5 file's objects by name, following hard links and soft links within the
    file only (an external link, which would open another file, is refused), and names the
    file and the dataset in every error. h5py's own errors on corrupt metadata (KeyError,
    RuntimeError, OSError, ...) become ``ShoeboxFileError``."""

    def __init__(self, path: str, f: h5py.File):
        self.path = path
        self.f = f

    def error(self, where: str, what: str, row: int | None = None) -> ShoeboxFileError:
        at = f"{where} row {row}" if row is not None else where
        return ShoeboxFileError(f"{self.path}: {at}: {what}")

    def node(self, where: str, *, required: bool = True):
        """The object at absolute path ``where``, or None when absent and not required."""
        parts = [p for p in where.split("/") if p and p != "."]
        node, done, hops = self.f, [], 0
        while parts:
            name = parts.pop(0)
            here = "/" + "/".join(done + [name])
            try:
                link = node.get(name, getlink=True)
            except Exception as error:  # corrupt link or group metadata
                raise self.error(here, f"could not be opened ({_one_line(error)})") from None
            if link is None:
                if hops:
                    raise self.error(where, "is a soft link to an object that does not exist")
                if required or parts:
                    raise self.error(here, "missing")
                return None
            if isinstance(link, h5py.ExternalLink):
                raise self.error(here, f"is an external link (to {link.filename}:{link.path}); "
                                       f"a shoebox file must hold its own data")
            if isinstance(link, h5py.SoftLink):
                hops += 1
                if hops > MAX_SOFT_LINKS:
                    raise self.error(here, f"more than {MAX_SOFT_LINKS} soft links (a cycle?)")
                target = str(link.path)
                base = [] if target.startswith("/") else done
                parts = [p for p in base + target.split("/") if p and p != "."] + parts
                node, done = self.f, []
                continue
            try:
                node = node[name]
            except Exception as error:
                raise self.error(here, f"could not be opened ({_one_line(error)})") from None
            if parts and not isinstance(node, h5py.Group):
                raise self.error(here, "is not a group")
            done.append(name)
        return node

    def group(self, where: str, *, required: bool = True) -> h5py.Group | None:
        node = self.node(where, required=required)
        if node is not None and not isinstance(node, h5py.Group):
            raise self.error(where, "is not a group")
        return node

    def check_dataset(self, where: str, kind: str, shape: tuple, sizes: dict[str, int],
                      *, required: bool = True) -> h5py.Dataset | None:
        """The dataset at ``where`` after checking its dtype kind and shape (nothing read)."""
        node = self.node(where, required=required)
        if node is None:
            return None
        if not isinstance(node, h5py.Dataset):
            raise self.error(where, "is not a dataset")
        try:
            dtype, file_shape = node.dtype, node.shape
        except Exception as error:
            raise self.error(where, f"could not be read ({_one_line(error)})") from None
        if kind == "f" and dtype.kind != "f":
            raise self.error(where, f"must be a float dataset, found dtype {dtype}")
        if kind == "i" and dtype.kind not in "iu" and not (where == "/pixels/mask" and dtype.kind == "b"):
            raise self.error(where, f"must be an integer dataset, found dtype {dtype}")
        if file_shape is None:
            raise self.error(where, "has no dataspace (an empty dataset)")
        if len(file_shape) != len(shape):
            raise self.error(where, f"must have {len(shape)} dimension(s), found shape {file_shape}")
        symbol = shape[0]
        sizes.setdefault(symbol, file_shape[0])
        expected = tuple(sizes[symbol] if i == 0 else n for i, n in enumerate(shape))
        if file_shape != expected:
            raise self.error(where, f"has shape {file_shape}, expected {expected} "
                                    f"(rows must match the group's other datasets)")
        return node

    def read(self, where: str, node: h5py.Dataset) -> np.ndarray:
        try:
            return np.asarray(node[()])
        except MemoryError:
            raise self.error(where, "does not fit in memory") from None
        except Exception as error:  # a filter that is not available, a corrupt chunk
            raise self.error(where, f"could not be read ({_one_line(error)})") from None


def _nbytes(node: h5py.Dataset, name: str) -> int:
    """Memory a dataset takes when read and converted to its canonical dtype."""
    canonical = np.dtype(WRITE_DTYPES.get(name, "f8")).itemsize
    return int(node.size) * (node.dtype.itemsize + canonical)


def _root_attribute(reader: _FileReader, name: str) -> Any:
    try:
        return reader.f.attrs.get(name)
    except Exception as error:
        raise ShoeboxFileError(f"{reader.path}: root attribute {name!r} could not be read "
                               f"({_one_line(error)})") from None


def _check_root(reader: _FileReader, expected_format: str) -> None:
    path = reader.path
    fmt = _root_attribute(reader, "format")
    if fmt is None or _text(fmt) != expected_format:
        raise ShoeboxFileError(f"{path}: root attribute 'format' is "
                               f"{None if fmt is None else _text(fmt)!r}, expected {expected_format!r}")
    version = _root_attribute(reader, "format_version")
    array = np.asarray(version) if version is not None else None
    if array is None or not np.issubdtype(array.dtype, np.integer) or array.size != 1:
        raise ShoeboxFileError(f"{path}: root attribute 'format_version' must be an integer")
    if int(array.reshape(-1)[0]) != FORMAT_VERSION:
        raise ShoeboxFileError(f"{path}: format_version {int(array.reshape(-1)[0])} "
                               f"is not supported (this reader reads {FORMAT_VERSION})")


def _read_symmetry(reader: "_FileReader") -> tuple[str | None, np.ndarray | None]:
    """The optional root attributes ``space_group`` (a symbol) and ``unit_cell`` (six floats)."""
    path = reader.path
    space_group = _root_attribute(reader, "space_group")
    if space_group is not None:
        space_group = _text(space_group).strip()
        if not space_group:
            raise ShoeboxFileError(f"{path}: root attribute 'space_group' is empty")
    cell = _root_attribute(reader, "unit_cell")
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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Signature of an HDF5 global heap collection (where variable-length strings live).
GLOBAL_HEAP_SIGNATURE = b"GCOL\x01"


def _sizeof_lengths(data: Any) -> int:
    """Bytes of a "length" field in this HDF5 file (superblock; 8 when it cannot be told).
    The superblock sits at byte 0, 512, 1024, ... (after a user block)."""
    at = 0
    while at + 16 <= len(data):
        if data[at:at + 8] == HDF5_SIGNATURE:
            version = data[at + 8]
            size = data[at + 14] if version in (0, 1) else data[at + 10]
            return size if size in (2, 4, 8, 16) else 8
        at = 512 if at == 0 else 2 * at
    return 8


def _global_heap_problem(data: Any) -> tuple[int, str] | None:
    """The first global heap collection of an HDF5 file's bytes that libhdf5 cannot parse
    to its end, as (byte offset, what); None when every one parses.

    libhdf5 (2.0.0 and earlier) walks a collection's objects by their sizes: an object
    header of index 0 and size 0 (zeroed bytes), or a size that wraps the address, never
    advances, and reading any variable-length string in that collection (the root attribute
    ``format``, say) loops forever. This walk mirrors libhdf5's (``H5HG__cache_heap_deserialize``).
    A collection that would end past the end of the file is not walked: libhdf5 refuses to
    read it (and a chance "GCOL" in pixel data almost never claims a size that fits).
    """
    length = _sizeof_lengths(data)
    header = 8 + length              # "GCOL", version, 3 reserved, collection size
    object_header = 8 + length       # index (2), references (2), reserved (4), size
    wrap = 1 << 64
    end_of_file = len(data)

    def field(at: int, n: int) -> int:
        return int.from_bytes(bytes(data[at:at + n]), "little")

    start = data.find(GLOBAL_HEAP_SIGNATURE)
    while start >= 0:
        size = field(start + 8, length)
        end = start + size
        if end > end_of_file:
            start = data.find(GLOBAL_HEAP_SIGNATURE, start + 1)
            continue
        p = start + header
        steps = 0
        while p < end:
            if p + object_header > end:
                break                # trailing bytes too small for an object: free space
            index, object_size = field(p, 2), field(p + 8, length)
            need = (object_header + ((object_size + 7) & ~7)) % wrap if index else object_size
            if need == 0 or need >= wrap // 2:  # no step, or one that wraps libhdf5's pointer
                return start, (f"object {index} at byte {p} has size {object_size}: "
                               f"the collection cannot be walked (zeroed or overwritten bytes)")
            p += need
            steps += 1
            if steps > size:         # cannot happen (every step advances); a guard
                return start, "the collection cannot be walked"
        start = data.find(GLOBAL_HEAP_SIGNATURE, start + 1)
    return None


def _check_global_heaps(path: str) -> None:
    """Refuse a file whose global heap libhdf5 would loop on (``_global_heap_problem``),
    before libhdf5 reads it. One pass over the file's bytes (memory-mapped)."""
    import mmap

    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return  # h5py refuses it
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                problem = _global_heap_problem(data)
    except (OSError, ValueError):
        return  # not readable as bytes: h5py's own open names the problem
    if problem is not None:
        at, what = problem
        raise ShoeboxFileError(f"{path}: HDF5 global heap at byte {at} is corrupt ({what})")


def _open(path: str, expected_format: str) -> tuple[h5py.File, _FileReader]:
    """Open an HDF5 file read-only and check its root attributes."""
    if PARTIAL_PATTERN.match(os.path.basename(path)):
        raise ShoeboxFileError(f"{path}: is a partial file left by an interrupted write, not a result")
    _check_global_heaps(path)
    try:
        f = h5py.File(path, "r")
    except Exception as error:  # OSError mostly; anything h5py raises on a corrupt superblock
        raise ShoeboxFileError(f"{path}: not a readable HDF5 file ({_one_line(error)})") from None
    reader = _FileReader(path, f)
    try:
        _check_root(reader, expected_format)
    except BaseException:
        f.close()
        raise
    return f, reader


def _read_groups(reader: _FileReader, groups: tuple[str, ...]
                 ) -> tuple[dict[str, dict[str, np.ndarray | None]], int]:
    """The datasets of ``INPUT_LAYOUT``'s ``groups`` (None where an optional one is absent),
    every dtype kind and shape checked before anything is read and the whole refused when it
    would not fit in memory; and the bytes they take."""
    sizes: dict[str, int] = {}
    nodes: dict[str, dict[str, h5py.Dataset | None]] = {}
    for group in groups:
        reader.group(f"/{group}")
        nodes[group] = {name: reader.check_dataset(f"/{group}/{name}", kind, shape, sizes,
                                                   required=required)
                        for name, kind, shape, required in INPUT_LAYOUT[group]}
    needed = sum(_nbytes(node, name) for group in nodes.values()
                 for name, node in group.items() if node is not None)
    if needed > memory_limit():
        raise ShoeboxFileError(f"{reader.path}: its datasets need {needed / 1e9:.3g} GB of memory, "
                               f"more than this machine has ({memory_limit() / 1e9:.3g} GB)")
    data = {group: {name: None if node is None else reader.read(f"/{group}/{name}", node)
                    for name, node in layout.items()}
            for group, layout in nodes.items()}
    return data, needed


def read_shoeboxes(path: str | os.PathLike) -> ShoeboxSet:
    """Read and validate a shoebox file.

    Everything ``shoebox-hdf5.md`` allows is read (any float/int dtype per column, filters,
    soft links within the file, extra datasets and attributes); everything else is refused,
    and so are external links (the file must hold its own data), shoeboxes that share pixels
    and datasets larger than this machine's memory (``memory_limit``). ``/truth`` is read as
    far as it can be (refinement never uses it): what cannot be read is left out.

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
    f, reader = _open(path, SHOEBOX_FORMAT)
    with f:
        data, needed = _read_groups(reader, tuple(INPUT_LAYOUT))
        truth = _read_truth(reader, memory_limit() - needed)
        space_group, unit_cell = _read_symmetry(reader)
    try:
        shoeboxes = ShoeboxSet(detector=Detector(**data["detector"]), images=Images(**data["images"]),
                               reflections=Reflections(**data["reflections"]),
                               pixels=Pixels(**data["pixels"]), source=path, truth=truth,
                               space_group=space_group, unit_cell=unit_cell)
        shoeboxes.core()  # validates every value, naming dataset and row
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ShoeboxFileError(message if message.startswith(path) else f"{path}: {message}") from None
    except MemoryError:
        raise ShoeboxFileError(f"{path}: does not fit in memory") from None
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
    f, reader = _open(path, SHOEBOX_FORMAT)
    with f:
        data, needed = _read_groups(reader, ("detector", "images", "reflections"))
        space_group, unit_cell = _read_symmetry(reader)
        truth_data = _read_truth(reader, memory_limit() - needed) if truth else None
    groups: dict[str, dict[str, np.ndarray]] = {}
    for group, values in data.items():
        groups[group] = {}
        for name, kind, _, _ in INPUT_LAYOUT[group]:
            value = values[name]
            if value is None:
                continue
            if kind == "i" and value.size:  # the core, which checks the rest, does not see these
                info = np.iinfo(WRITE_DTYPES[name])
                bad = np.flatnonzero(((value < info.min) | (value > info.max))
                                     .reshape(len(value), -1).any(1))
                if bad.size:
                    raise reader.error(f"/{group}/{name}", f"value out of range for {info.dtype}",
                                       int(bad[0]))
            groups[group][name] = np.ascontiguousarray(value, dtype=WRITE_DTYPES[name])
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


def _read_truth(reader: _FileReader, budget: int) -> dict | None:
    """``/truth`` as far as it reads: its groups' datasets and attributes (those that cannot be
    read, and everything beyond ``budget`` bytes, left out); None when there is no group."""
    try:
        root = reader.group("/truth", required=False)
    except ShoeboxFileError:
        return None
    if root is None:
        return None
    truth: dict[str, Any] = {}
    for name in _names(root):
        try:
            node = reader.group(f"/truth/{name}")
        except ShoeboxFileError:
            continue
        entries: dict[str, Any] = {}
        for key in _names(node):
            try:
                dataset = reader.node(f"/truth/{name}/{key}")
                if not isinstance(dataset, h5py.Dataset) or dataset.nbytes > budget:
                    continue
                entries[key] = reader.read(f"/truth/{name}/{key}", dataset)
                budget -= entries[key].nbytes
            except Exception:  # best effort: refinement never reads /truth
                continue
        entries.update({f"@{k}": v for k, v in _attributes(node).items()})
        truth[name] = entries
    truth.update({f"@{k}": v for k, v in _attributes(root).items()})
    return truth


def _names(group: h5py.Group) -> list[str]:
    try:
        return [str(name) for name in group.keys()]
    except Exception:
        return []


def _attributes(node: Any) -> dict[str, Any]:
    out = {}
    try:
        names = list(node.attrs.keys())
    except Exception:
        return out
    for name in names:
        try:
            out[name] = node.attrs[name]
        except Exception:
            continue
    return out


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


#: Results datasets by group: (kind, columns) as in refine.IMAGE_FIELDS (0: a vector, n: [rows,
#: n], -1: [rows, k, k]); /global holds one row per crystal of CrystalModel's fields.
RESULT_LAYOUT: dict[str, tuple[str, dict[str, tuple[str, int]]]] = {
    "images": ("N", {name: spec for name, spec in IMAGE_FIELDS.items()
                     if name not in GLOBAL_CONTRIBUTIONS}),
    "global": ("C", {name: ("i4" if name == "crystal_id" else "f8", 0)
                     for name in CrystalModel.__dataclass_fields__}),
    "reflections": ("M", dict(REFLECTION_FIELDS)),
}
#: Every results file has at least these (older files may lack the others: filled with NaN).
RESULT_REQUIRED = {"images": ("G", "status"), "global": ("crystal_id", "R0"),
                   "reflections": ("flags",)}


def _json_attribute(reader: _FileReader, node: Any, where: str, name: str, default: Any,
                    kind: type) -> Any:
    try:
        value = node.attrs.get(name)
    except Exception as error:
        raise reader.error(where, f"attribute {name!r} could not be read ({_one_line(error)})") from None
    if value is None:
        return default
    try:
        parsed = json.loads(_text(value))
    except ValueError:
        raise reader.error(where, f"attribute {name!r} is not JSON") from None
    if not isinstance(parsed, kind):
        raise reader.error(where, f"attribute {name!r} must be a JSON {kind.__name__}")
    return parsed


def _read_result_group(reader: _FileReader, group: str, k: int) -> dict[str, np.ndarray]:
    symbol, layout = RESULT_LAYOUT[group]
    reader.group(f"/{group}")
    sizes: dict[str, int] = {}
    nodes = {}
    for name, (dtype, columns) in layout.items():
        shape = (symbol,) if columns == 0 else (symbol, k, k) if columns < 0 else (symbol, columns)
        nodes[name] = reader.check_dataset(f"/{group}/{name}", "i" if dtype == "i4" else "f",
                                           shape, sizes, required=name in RESULT_REQUIRED[group])
    rows = sizes[symbol]
    out = {}
    for name, node in nodes.items():
        dtype, columns = layout[name]
        if node is None:
            shape = (rows,) if columns == 0 else (rows, k, k) if columns < 0 else (rows, columns)
            out[name] = np.zeros(shape, np.int32) if dtype == "i4" else np.full(shape, np.nan)
            continue
        data = reader.read(f"/{group}/{name}", node)
        try:
            out[name] = np.array(as_column(data, dtype, data.ndim, f"/{group}/{name}"))
        except (TypeError, ValueError) as error:
            raise ShoeboxFileError(f"{reader.path}: {error}") from None
    return out


def read_results(path: str | os.PathLike) -> Results:
    """Read and check a results file written by ``write_results``.

    Raises
    ------
    ShoeboxFileError
        For a file that is not a readable results file: names file, dataset and row.
    """
    path = os.fspath(path)
    f, reader = _open(path, RESULTS_FORMAT)
    with f:
        covariance = reader.node("/images/covariance", required=False)
        names = (["G", "B", "R1"] if covariance is None else
                 _json_attribute(reader, covariance, "/images/covariance", "parameter_names",
                                 ["G", "B", "R1"], list))
        if not names or not all(isinstance(n, str) for n in names):
            raise reader.error("/images/covariance", "attribute 'parameter_names' must list names")
        groups = {group: _read_result_group(reader, group, len(names)) for group in RESULT_LAYOUT}
        if len(groups["reflections"]["flags"]) and len(groups["images"]["G"]) == 0:
            raise reader.error("/images/G", "no images for the reflections")
        options = _json_attribute(reader, f, "/", "options", {}, dict)
        attributes = {name: "" if (value := _root_attribute(reader, name)) is None else _text(value)
                      for name in ("objective", "input_file", "package_version")}
        return Results(images=groups["images"], crystals=groups["global"],
                       reflections=groups["reflections"], parameter_names=list(names),
                       objective=attributes["objective"], options=options,
                       input_file=attributes["input_file"] or None,
                       package_version=attributes["package_version"])
