"""DIALS in: integrated experiment lists (``.expt``) and reflection tables with shoeboxes
(``.refl``) → a pixelrefine shoebox file (format version 1), without DIALS installed.

The reading only translates; the conventions and the formulas are METHODS.md §I.18.

- ``.expt`` is dxtbx's experiment-list JSON: per experiment indices into the lists ``beam``,
  ``detector``, ``crystal``; a detector's ``panels`` hold frames local to their group in
  ``hierarchy`` (composed here into the lab frame).
- ``.refl`` is DIALS's msgpack layout (``reflection_table_msgpack_adapter.h``):
  ``["dials::af::reflection_table", version, {"identifiers": {id: str}, "nrows": n,
  "data": {name: [type, [count, bin]]}}]``, every column one little-endian binary blob, the
  ``shoebox`` column one blob of per-row records: ``u4`` panel, ``i4`` bbox[6], ``u1`` flag
  (0: no data, 1: data with ``i4`` mask, 2: data with ``u1`` mask), then ``f4`` data, the mask
  and ``f4`` background, each (z, y, x) row-major. It is read in place from a memory map, one
  experiment's rows at a time, so memory is bounded by one image's shoeboxes whatever the
  file's size.

Frames: DIALS's beam travels along −d (d = ``direction``, the sample-to-source unit vector,
usually (0, 0, 1)); every lab vector is rotated by R = Q·diag(−1, 1, −1) (180° about y, then
the small rotation Q that takes the beam exactly onto +z) into conventions.md's frame.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import h5py
import numpy as np

from .io import (COMPRESSION, FORMAT_VERSION, SHOEBOX_FORMAT, WRITE_DTYPES, _atomic_h5,
                 check_output_path, write_symmetry)

__all__ = ["DialsFormatError", "read_experiments", "ReflectionTable", "import_dials",
           "ImportSummary", "MASK_VALID", "MASK_FOREGROUND", "MASK_OVERLAPPED",
           "dials_to_lab_rotation", "attenuation_length", "keep_shoeboxes_hint"]

#: DIALS's shoebox mask codes (``dials/model/data/mask_code.h``).
MASK_VALID, MASK_BACKGROUND, MASK_FOREGROUND, MASK_STRONG = 1, 2, 4, 8
MASK_BACKGROUND_USED, MASK_OVERLAPPED = 16, 32

#: Column types of the msgpack layout: numpy dtype and values per row.
COLUMN_TYPES: dict[str, tuple[str, int]] = {
    "bool": ("u1", 1), "int": ("<i4", 1), "std::size_t": ("<u8", 1), "double": ("<f8", 1),
    "vec2<double>": ("<f8", 2), "vec3<double>": ("<f8", 3), "mat3<double>": ("<f8", 9),
    "int6": ("<i4", 6), "cctbx::miller::index<>": ("<i4", 3),
}

#: DIALS reflection-table flag bits used here.
FLAG_INTEGRATED_SUM, FLAG_INTEGRATED_PRF = 1 << 8, 1 << 9


def keep_shoeboxes_hint() -> str:
    """How to make DIALS keep the shoeboxes in its integrated table."""
    return ("DIALS drops the shoeboxes after integration unless asked: rerun "
            "dials.ssx_integrate with debug.output.shoeboxes=True, or dials.stills_process with "
            "integration.debug.delete_shoeboxes=False integration.debug.output=True "
            "integration.debug.separate_files=False")


class DialsFormatError(ValueError):
    """A DIALS file that cannot be translated; the message names the file, column and row."""


# --------------------------------------------------------------------------------------------
# msgpack, the subset DIALS writes, read in place
# --------------------------------------------------------------------------------------------

class _Msgpack:
    """Walks a msgpack buffer without copying: containers are headers, bins are (start, size)."""

    def __init__(self, buffer, path: str):
        self.buf = buffer
        self.path = path
        self.size = len(buffer)

    def _need(self, pos: int, n: int) -> None:
        if pos + n > self.size:
            raise DialsFormatError(f"{self.path}: truncated msgpack data at byte {pos} "
                                   f"(needs {n} more bytes, the file has {self.size})")

    def _unpack(self, fmt: str, pos: int):
        self._need(pos, struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def next(self, pos: int) -> tuple[str, Any, int]:
        """(kind, value, next position) of the object at ``pos``.

        kind: "int", "float", "nil", "bool", "str" (value decoded), "bin" (value (start, size)),
        "array"/"map" (value the number of items or pairs, next = the first item), "ext".
        """
        self._need(pos, 1)
        b = self.buf[pos]
        p = pos + 1
        if b <= 0x7F:
            return "int", b, p
        if b >= 0xE0:
            return "int", b - 0x100, p
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F, p
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F, p
        if 0xA0 <= b <= 0xBF:
            return self._str(p, b & 0x1F)
        if b == 0xC0:
            return "nil", None, p
        if b in (0xC2, 0xC3):
            return "bool", b == 0xC3, p
        if b in (0xC4, 0xC5, 0xC6):
            fmt = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[b]
            n = self._unpack(fmt, p)
            start = p + struct.calcsize(fmt)
            self._need(start, n)
            return "bin", (start, n), start + n
        if b in (0xC7, 0xC8, 0xC9):
            fmt = {0xC7: ">B", 0xC8: ">H", 0xC9: ">I"}[b]
            n = self._unpack(fmt, p)
            return "ext", None, p + struct.calcsize(fmt) + 1 + n
        if b == 0xCA:
            return "float", self._unpack(">f", p), p + 4
        if b == 0xCB:
            return "float", self._unpack(">d", p), p + 8
        if 0xCC <= b <= 0xD3:
            fmt = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
                   0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}[b]
            return "int", self._unpack(fmt, p), p + struct.calcsize(fmt)
        if 0xD4 <= b <= 0xD8:
            return "ext", None, p + 1 + (1 << (b - 0xD4))
        if b in (0xD9, 0xDA, 0xDB):
            fmt = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}[b]
            return self._str(p + struct.calcsize(fmt), self._unpack(fmt, p))
        if b in (0xDC, 0xDD):
            fmt = ">H" if b == 0xDC else ">I"
            return "array", self._unpack(fmt, p), p + struct.calcsize(fmt)
        if b in (0xDE, 0xDF):
            fmt = ">H" if b == 0xDE else ">I"
            return "map", self._unpack(fmt, p), p + struct.calcsize(fmt)
        raise DialsFormatError(f"{self.path}: byte {pos}: 0x{b:02x} is not a msgpack type")

    def _str(self, start: int, n: int) -> tuple[str, str, int]:
        self._need(start, n)
        return "str", bytes(self.buf[start:start + n]).decode("utf-8", "replace"), start + n

    def skip(self, pos: int) -> int:
        """The position after the whole object at ``pos``."""
        pending = 1
        while pending:
            kind, value, pos = self.next(pos)
            pending -= 1
            if kind == "array":
                pending += value
            elif kind == "map":
                pending += 2 * value
        return pos

    def value(self, pos: int) -> tuple[Any, int]:
        """Decode a small object completely (bins as bytes)."""
        kind, value, pos = self.next(pos)
        if kind == "array":
            items = []
            for _ in range(value):
                item, pos = self.value(pos)
                items.append(item)
            return items, pos
        if kind == "map":
            out = {}
            for _ in range(value):
                key, pos = self.value(pos)
                out[key], pos = self.value(pos)
            return out, pos
        if kind == "bin":
            start, n = value
            return bytes(self.buf[start:start + n]), pos
        return value, pos


@dataclass
class _Column:
    type: str
    count: int
    start: int
    size: int


class ReflectionTable:
    """A DIALS ``.refl`` (msgpack) opened in place; columns are read on demand.

    Parameters
    ----------
    path : str
        The file.

    Attributes
    ----------
    nrows : int
    identifiers : dict of int to str
        The table's experiment identifiers (``id`` → the experiment's ``identifier``).
    columns : dict of str to _Column
        Every column's type, row count and where its binary data lie.

    Raises
    ------
    DialsFormatError
        When the file is not a DIALS reflection table in the msgpack layout.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as error:
            raise DialsFormatError(f"{self.path}: cannot be read ({error})") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size == 0:
                raise DialsFormatError(f"{self.path}: empty file, not a DIALS reflection table")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        mp = _Msgpack(self._map, self.path)
        if self._map[:2] == b"\x80\x02" or self._map[:1] == b"(":
            raise DialsFormatError(f"{self.path}: a pickled reflection table (DIALS before 2.0); "
                                   "convert it with a current DIALS (dials.convert_to_msgpack?) "
                                   "or re-run the processing")
        kind, n, pos = mp.next(0)
        if kind != "array" or n != 3:
            raise DialsFormatError(f"{self.path}: not a DIALS reflection table (expected the "
                                   "msgpack array [\"dials::af::reflection_table\", version, {...}])")
        name, pos = mp.value(pos)
        if name != "dials::af::reflection_table":
            raise DialsFormatError(f"{self.path}: not a DIALS reflection table (header {name!r})")
        version, pos = mp.value(pos)
        if version not in (1, 2):
            raise DialsFormatError(f"{self.path}: reflection-table version {version} is not "
                                   "supported (1 and 2 are)")
        kind, n, pos = mp.next(pos)
        if kind != "map":
            raise DialsFormatError(f"{self.path}: the table's header is not a msgpack map")
        self.nrows, self.identifiers, self.columns = None, {}, {}
        for _ in range(n):
            key, pos = mp.value(pos)
            if key == "nrows":
                self.nrows, pos = mp.value(pos)
            elif key == "identifiers":
                identifiers, pos = mp.value(pos)
                self.identifiers = {int(k): str(v) for k, v in identifiers.items()}
            elif key == "data":
                pos = self._parse_columns(mp, pos)
            else:
                pos = mp.skip(pos)
        if self.nrows is None:
            raise DialsFormatError(f"{self.path}: the table has no 'nrows'")

    def _parse_columns(self, mp: _Msgpack, pos: int) -> int:
        kind, n, pos = mp.next(pos)
        if kind != "map":
            raise DialsFormatError(f"{self.path}: the table's 'data' is not a msgpack map")
        for _ in range(n):
            name, pos = mp.value(pos)
            kind, two, p = mp.next(pos)
            if kind != "array" or two != 2:
                raise DialsFormatError(f"{self.path}: column {name!r} is not [type, data]")
            ctype, p = mp.value(p)
            kind, two, p = mp.next(p)
            if kind != "array" or two != 2:
                raise DialsFormatError(f"{self.path}: column {name!r} data is not [count, bin]")
            count, p = mp.value(p)
            kind, where, pos = mp.next(p)
            if kind != "bin":
                raise DialsFormatError(f"{self.path}: column {name!r} holds no binary data")
            self.columns[str(name)] = _Column(str(ctype), int(count), *where)
        return pos

    def close(self) -> None:
        """Release the memory map and the file."""
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the GC closes it later
                pass
            self._map = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ReflectionTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A numeric column as a new array ([nrows] or [nrows, k]), optionally only ``rows``.

        Raises
        ------
        DialsFormatError
            Missing column, unknown type, or a binary size that does not match its row count.
        """
        if name not in self.columns:
            raise DialsFormatError(f"{self.path}: no column {name!r} (columns: "
                                   f"{', '.join(sorted(self.columns))})")
        col = self.columns[name]
        if col.type not in COLUMN_TYPES:
            raise DialsFormatError(f"{self.path}: column {name!r} has type {col.type!r}, which "
                                   "is not a numeric column")
        dtype, width = COLUMN_TYPES[col.type]
        item = np.dtype(dtype).itemsize * width
        if col.size != col.count * item or col.count != self.nrows:
            raise DialsFormatError(f"{self.path}: column {name!r} ({col.type}) holds {col.size} "
                                   f"bytes for {col.count} rows, expected {col.count * item} for "
                                   f"{self.nrows} rows")
        view = np.frombuffer(self._map, dtype=dtype, count=col.count * width, offset=col.start)
        view = view.reshape(col.count, width) if width > 1 else view
        out = view[rows] if rows is not None else view.copy()
        del view
        return np.ascontiguousarray(out)

    def shoebox_index(self) -> "_ShoeboxIndex":
        """Walk the ``shoebox`` column once: every row's panel, bbox and where its data lie.

        Raises
        ------
        DialsFormatError
            When the table has no shoeboxes (with how to keep them) or a record is malformed.
        """
        if "shoebox" not in self.columns:
            raise DialsFormatError(f"{self.path}: the table has no 'shoebox' column. "
                                   + keep_shoeboxes_hint())
        col = self.columns["shoebox"]
        if col.type != "Shoebox<>":
            raise DialsFormatError(f"{self.path}: column 'shoebox' has type {col.type!r}, "
                                   "expected 'Shoebox<>'")
        if col.count != self.nrows:
            raise DialsFormatError(f"{self.path}: column 'shoebox' has {col.count} rows, the "
                                   f"table {self.nrows}")
        n = col.count
        panel = np.empty(n, np.int64)
        bbox = np.empty((n, 6), np.int64)
        flag = np.empty(n, np.uint8)
        offset = np.empty(n, np.int64)
        header = struct.Struct("<I6iB")
        buf, pos, end = self._map, col.start, col.start + col.size
        for row in range(n):
            if pos + header.size > end:
                raise DialsFormatError(f"{self.path}: column 'shoebox' row {row}: the column's "
                                       "data end inside this row's record")
            p, x0, x1, y0, y1, z0, z1, f = header.unpack_from(buf, pos)
            pos += header.size
            if x1 < x0 or y1 < y0 or z1 < z0:
                raise DialsFormatError(f"{self.path}: column 'shoebox' row {row}: bbox "
                                       f"{[x0, x1, y0, y1, z0, z1]} is not ordered")
            panel[row], flag[row], offset[row] = p, f, pos
            bbox[row] = (x0, x1, y0, y1, z0, z1)
            if f in (1, 2):
                voxels = (x1 - x0) * (y1 - y0) * (z1 - z0)
                pos += voxels * (8 + (4 if f == 1 else 1))
            elif f != 0:
                raise DialsFormatError(f"{self.path}: column 'shoebox' row {row}: data flag {f} "
                                       "is not 0, 1 or 2")
        if pos != end:
            raise DialsFormatError(f"{self.path}: column 'shoebox': {end - pos} bytes left after "
                                   f"the last of {n} rows")
        if not np.any(flag):
            raise DialsFormatError(f"{self.path}: the shoeboxes hold no pixel data (allocated but "
                                   "empty). " + keep_shoeboxes_hint())
        return _ShoeboxIndex(panel, bbox, flag, offset)

    def shoebox(self, index: "_ShoeboxIndex", row: int) -> tuple[np.ndarray, np.ndarray]:
        """(data, mask) of one row as 2-D (y, x) arrays (the still's single frame)."""
        x0, x1, y0, y1, z0, z1 = index.bbox[row]
        n = (x1 - x0) * (y1 - y0) * (z1 - z0)
        start = int(index.offset[row])
        data = np.frombuffer(self._map, "<f4", n, start).reshape(y1 - y0, x1 - x0).copy()
        if index.flag[row] == 2:
            mask = np.frombuffer(self._map, "u1", n, start + 4 * n)
        else:
            mask = np.frombuffer(self._map, "<i4", n, start + 4 * n)
        mask = mask.reshape(y1 - y0, x1 - x0).astype(np.int64)
        return data, mask


@dataclass
class _ShoeboxIndex:
    panel: np.ndarray
    bbox: np.ndarray
    flag: np.ndarray
    offset: np.ndarray


# --------------------------------------------------------------------------------------------
# Experiment lists
# --------------------------------------------------------------------------------------------

@dataclass
class Panel:
    """One panel in DIALS's lab frame (mm), composed through the detector hierarchy."""

    origin: np.ndarray
    fast: np.ndarray
    slow: np.ndarray
    pixel_size: float
    size: tuple[int, int]
    gain: float
    parallax: bool
    mu: float
    thickness: float
    name: str = ""


@dataclass
class Experiment:
    """What pixelrefine takes from one DIALS experiment (DIALS's lab frame)."""

    identifier: str
    wavelength: float
    direction: np.ndarray           # sample-to-source unit vector
    polarization_normal: np.ndarray
    polarization_fraction: float
    detector: int                   # index into the file's detector list
    real_space: np.ndarray          # [3, 3] rows a, b, c (Å)
    hall_symbol: str | None


def _vec(value, what: str, path: str, n: int = 3) -> np.ndarray:
    try:
        out = np.asarray(value, float).reshape(n)
    except (TypeError, ValueError):
        raise DialsFormatError(f"{path}: {what} is not {n} numbers: {value!r}") from None
    if not np.all(np.isfinite(out)):
        raise DialsFormatError(f"{path}: {what} is not finite: {value!r}")
    return out


def _panel(d: dict, parent: tuple[np.ndarray, np.ndarray, np.ndarray], path: str,
           where: str) -> Panel:
    """A panel from its dict, its local frame composed with the parent's (dxtbx's rule:
    global = [pf ps pn]·local + parent origin, pn = pf × ps)."""
    pf, ps, po = parent
    pn = np.cross(pf, ps)
    frame = np.column_stack([pf, ps, pn])
    fast = frame @ _vec(d.get("fast_axis"), f"{where} fast_axis", path)
    slow = frame @ _vec(d.get("slow_axis"), f"{where} slow_axis", path)
    origin = frame @ _vec(d.get("origin"), f"{where} origin", path) + po
    pixel = _vec(d.get("pixel_size"), f"{where} pixel_size", path, 2)
    if abs(pixel[0] - pixel[1]) > 1e-9 * max(pixel):
        raise DialsFormatError(f"{path}: {where}: pixels {pixel.tolist()} mm are not square "
                               "(the shoebox format needs square pixels)")
    size = _vec(d.get("image_size"), f"{where} image_size", path, 2).astype(int)
    strategy = (d.get("px_mm_strategy") or {}).get("type", "SimplePxMmStrategy")
    if strategy.startswith("Offset"):
        raise DialsFormatError(f"{path}: {where}: px_mm_strategy {strategy} (per-pixel offset "
                               "maps) is not supported")
    parallax = strategy == "ParallaxCorrectedPxMmStrategy"
    mu, thickness = float(d.get("mu", 0.0) or 0.0), float(d.get("thickness", 0.0) or 0.0)
    if parallax and not (mu > 0 and thickness > 0):
        raise DialsFormatError(f"{path}: {where}: px_mm_strategy {strategy} but mu = {mu}, "
                               f"thickness = {thickness}")
    return Panel(origin=origin, fast=fast / np.linalg.norm(fast), slow=slow / np.linalg.norm(slow),
                 pixel_size=float(pixel[0]), size=(int(size[0]), int(size[1])),
                 gain=float(d.get("gain", 1.0) or 1.0), parallax=parallax, mu=mu,
                 thickness=thickness, name=str(d.get("name", "")))


def _detector(d: dict, path: str, where: str) -> list[Panel]:
    panels = d.get("panels")
    if not isinstance(panels, list) or not panels:
        raise DialsFormatError(f"{path}: {where} has no panels")
    root = d.get("hierarchy")
    lab = (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3))
    if not root:
        return [_panel(p, lab, path, f"{where} panel {i}") for i, p in enumerate(panels)]
    out: list[Panel | None] = [None] * len(panels)

    def visit(node: dict, parent, label: str) -> None:
        group = _panel({**node, "pixel_size": node.get("pixel_size") or [1, 1],
                        "image_size": node.get("image_size") or [0, 0], "px_mm_strategy": {}},
                       parent, path, label)
        frame = (group.fast, group.slow, group.origin)
        for i, child in enumerate(node.get("children", [])):
            if "panel" in child:
                k = int(child["panel"])
                if not 0 <= k < len(panels) or out[k] is not None:
                    raise DialsFormatError(f"{path}: {label} child {i}: panel {k} is not a panel "
                                           "of the detector or appears twice")
                out[k] = _panel(panels[k], frame, path, f"{where} panel {k}")
            else:
                visit(child, frame, f"{label}/{i}")

    visit(root, lab, f"{where} hierarchy")
    missing = [k for k, p in enumerate(out) if p is None]
    if missing:
        raise DialsFormatError(f"{path}: {where}: panels {missing} are not in the hierarchy")
    return out  # type: ignore[return-value]


def read_experiments(path: str | os.PathLike) -> tuple[list[Experiment], list[list[Panel]]]:
    """Read a dxtbx experiment list (JSON).

    Returns
    -------
    experiments : list of Experiment
        In the file's order (the reflection table's ``id``).
    detectors : list of list of Panel
        The file's detector models, panels in the lab frame of DIALS.

    Raises
    ------
    DialsFormatError
        Naming the file and the experiment, model or panel at fault.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            doc = json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DialsFormatError(f"{path}: not a readable experiment list (JSON): {error}") from None
    if not isinstance(doc, dict) or doc.get("__id__") != "ExperimentList":
        raise DialsFormatError(f"{path}: not a DIALS experiment list (no \"__id__\": "
                               "\"ExperimentList\")")
    detectors = [_detector(d, path, f"detector {i}") for i, d in enumerate(doc.get("detector", []))]
    beams, crystals = doc.get("beam", []), doc.get("crystal", [])
    experiments = []
    for i, e in enumerate(doc.get("experiment", [])):
        where = f"experiment {i}"
        try:
            beam, crystal, det = beams[e["beam"]], crystals[e["crystal"]], int(e["detector"])
            detectors[det]
        except (KeyError, IndexError, TypeError):
            raise DialsFormatError(f"{path}: {where} lacks a beam, crystal or detector model "
                                   "(pixelrefine needs indexed, integrated experiments)") from None
        real = np.stack([_vec(crystal.get(k), f"{where} crystal {k}", path)
                         for k in ("real_space_a", "real_space_b", "real_space_c")])
        if abs(np.linalg.det(real)) < 1e-6:
            raise DialsFormatError(f"{path}: {where}: the crystal's real-space vectors are singular")
        wavelength = float(beam.get("wavelength", 0.0))
        if not wavelength > 0:
            raise DialsFormatError(f"{path}: {where}: beam wavelength {wavelength} is not positive")
        direction = _vec(beam.get("direction", [0, 0, 1]), f"{where} beam direction", path)
        experiments.append(Experiment(
            identifier=str(e.get("identifier", "")), wavelength=wavelength,
            direction=direction / np.linalg.norm(direction),
            polarization_normal=_vec(beam.get("polarization_normal", [0, 1, 0]),
                                     f"{where} polarization_normal", path),
            polarization_fraction=float(beam.get("polarization_fraction", 0.5)),
            detector=det, real_space=real, hall_symbol=crystal.get("space_group_hall_symbol")))
    if not experiments:
        raise DialsFormatError(f"{path}: the experiment list holds no experiments")
    return experiments, detectors


# --------------------------------------------------------------------------------------------
# Frames, polarisation, parallax
# --------------------------------------------------------------------------------------------

def dials_to_lab_rotation(direction: np.ndarray) -> np.ndarray:
    """R taking DIALS's lab frame to conventions.md's: R·(−d) = +z, d the sample-to-source
    direction; R = Q·diag(−1, 1, −1), Q the least rotation that takes diag(−1, 1, −1)·(−d)
    onto +z (Q = I for d = (0, 0, 1), DIALS's usual beam)."""
    flip = np.diag([-1.0, 1.0, -1.0])  # 180° about y: proper, keeps handedness
    v = flip @ (-np.asarray(direction, float) / np.linalg.norm(direction))
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(v, z)
    s, c = np.linalg.norm(axis), float(v @ z)
    if s < 1e-15:
        if c > 0:
            return flip
        return np.diag([1.0, -1.0, -1.0]) @ flip  # beam along −z after the flip: 180° about x
    k = axis / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    Q = np.eye(3) + s * K + (1 - c) * (K @ K)
    return Q @ flip


def polarization_fraction_along_x(normal: np.ndarray, fraction: float, direction: np.ndarray,
                                  R: np.ndarray) -> float:
    """conventions.md's f (fraction along lab x) from DIALS's polarisation normal n and
    fraction P: the polarised E lies along e = unit(n × d); f = P (R e)_x² + (1 − P) (R n̂)_x²
    (exact when e is along x or y, which is where the convention can say it)."""
    n = normal / np.linalg.norm(normal)
    e = np.cross(n, direction)
    norm = np.linalg.norm(e)
    if norm < 1e-12:
        return 0.5
    e /= norm
    return float(fraction * (R @ e)[0] ** 2 + (1 - fraction) * (R @ n)[0] ** 2)


def attenuation_length(mu: float, thickness: float, cos_incidence: np.ndarray) -> np.ndarray:
    """dxtbx's mean absorption depth along the ray (mm): 1/μ − (t/c + 1/μ) exp(−μ t/c),
    c = cos of the ray's angle to the panel normal."""
    c = np.asarray(cos_incidence, float)
    return 1.0 / mu - (thickness / c + 1.0 / mu) * np.exp(-mu * thickness / c)


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------

@dataclass
class ImportSummary:
    """What ``import_dials`` wrote, read and left out."""

    output: str
    n_images: int = 0
    n_reflections: int = 0
    n_pixels: int = 0
    n_panels: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    space_group: str | None = None
    unit_cell: list[float] | None = None
    gain: list[float] = field(default_factory=list)
    parallax: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """A few lines for the terminal."""
        lines = [f"wrote {self.output}: {self.n_images} images, {self.n_reflections} reflections, "
                 f"{self.n_pixels} pixels, {self.n_panels} panel(s); space group "
                 f"{self.space_group or 'unknown'}, cell "
                 f"{' '.join(f'{v:.3f}' for v in self.unit_cell) if self.unit_cell else 'unknown'}"]
        if self.skipped:
            lines.append("left out: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items()))
        p = self.parallax
        if p.get("panels_corrected"):
            lines.append(
                f"parallax ({p['mode']}): {p['panels_corrected']} panel(s) moved by the mean "
                f"absorption depth {p['depth_mm_min']:.4f}–{p['depth_mm_max']:.4f} mm along their "
                f"normals; residual against DIALS's correction rms {p['residual_px_rms']:.4f} px, "
                f"max {p['residual_px_max']:.4f} px (left out it would be rms "
                f"{p['uncorrected_px_rms']:.4f}, max {p['uncorrected_px_max']:.4f} px)")
        elif p.get("uncorrected_px_max", 0) > 0:
            lines.append(f"parallax not applied: the spots sit off c_pred by rms "
                         f"{p['uncorrected_px_rms']:.4f} px, max {p['uncorrected_px_max']:.4f} px")
        if self.reference:
            r = self.reference
            lines.append(f"reference {r['source']}: {r['found']} of {r['reflections']} reflections "
                         f"have one, {r['absent']} systematically absent (NaN, flagged)")
        return "\n".join(lines)


class _Appender:
    """Resizable 1-D/2-D datasets appended to in blocks."""

    def __init__(self, group: h5py.Group, name: str, dtype, width: int | None, filters: dict):
        shape = (0,) if width is None else (0, width)
        maxshape = (None,) if width is None else (None, width)
        chunk_rows = 1 << 18 if width is None else max(1, (1 << 16) // width)
        self.ds = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype,
                                       chunks=(chunk_rows,) + shape[1:], **filters)
        self.n = 0

    def append(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.ds.resize(self.n + len(values), axis=0)
        self.ds[self.n:self.n + len(values)] = values
        self.n += len(values)


def _valid_mask(mask: np.ndarray) -> np.ndarray:
    """1 where DIALS says the pixel is valid for this reflection and not in another
    reflection's foreground (Overlapped without this reflection's Foreground)."""
    valid = (mask & MASK_VALID) != 0
    neighbour = ((mask & MASK_OVERLAPPED) != 0) & ((mask & MASK_FOREGROUND) == 0)
    return (valid & ~neighbour).astype(np.uint8)


def _same_detector(a: list[Panel], b: list[Panel], tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(
        np.allclose(p.origin, q.origin, atol=tol) and np.allclose(p.fast, q.fast, atol=tol)
        and np.allclose(p.slow, q.slow, atol=tol) and p.size == q.size
        and abs(p.pixel_size - q.pixel_size) < tol for p, q in zip(a, b))


def _directions(table: ReflectionTable, rows: np.ndarray, panels: list[Panel],
                panel_of: np.ndarray, index: _ShoeboxIndex) -> np.ndarray:
    """Unit ray directions ŝ (DIALS frame) of the predictions: from s1, else xyzcal.mm, else the
    box centre."""
    if "s1" in table:
        s1 = table.column("s1", rows)
        return s1 / np.linalg.norm(s1, axis=1, keepdims=True)
    if "xyzcal.mm" in table:
        xy = table.column("xyzcal.mm", rows)[:, :2]
    else:
        b = index.bbox[rows]
        pix = np.array([panels[k].pixel_size for k in panel_of])
        xy = np.stack([(b[:, 0] + b[:, 1]) / 2, (b[:, 2] + b[:, 3]) / 2], 1) * pix[:, None]
    r = np.array([panels[k].origin + x * panels[k].fast + y * panels[k].slow
                  for k, (x, y) in zip(panel_of, xy)]).reshape(-1, 3)
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def import_dials(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
                 output: str | os.PathLike, *, gain: float | None = None,
                 reference: str | os.PathLike | None = None, reference_column: str | None = None,
                 space_group: str | None = None, read_noise: float = 0.0,
                 bandwidth: float = 0.0, parallax: str = "fit", compression: str | None = "gzip",
                 overwrite: bool = False) -> ImportSummary:
    """Translate DIALS integrated experiments and reflection tables into one shoebox file.

    Parameters
    ----------
    pairs : sequence of (expt, refl)
        Experiment lists (JSON) and their reflection tables with shoeboxes (msgpack), read one
        table at a time; the images are their experiments in order.
    output : path
        The shoebox file to write (appears only when complete).
    gain : float, optional
        ADU per photon for every panel, instead of the panels' ``gain`` (which DIALS often
        leaves at 1 for data in ADU). Counts are written as data / gain.
    reference : path, optional
        An MTZ (intensities, or amplitudes squared) or a PDB/mmCIF model (|Fcalc|² to the data's
        resolution) for ``intensity_ref``; NaN where it has no value, and for systematic
        absences (flagged in ``/reflections/systematic_absence``). See ``pixelrefine.reference``.
    reference_column : str, optional
        The MTZ column to use (default: the first intensity, else the first amplitude).
    space_group : str, optional
        Overrides the experiments' space group (DIALS 3.12 may store the lattice's holohedry).
    read_noise : float
        rms read noise in photons, written to ``/detector/read_noise`` for every panel.
    bandwidth : float
        rms σλ/λ of the beam (DIALS does not store it), written for every image.
    parallax : {"fit", "none"}
        "fit": move each panel with a parallax-corrected px-mm strategy along its normal by the
        mean absorption depth that best reproduces DIALS's correction of xyzcal.px (METHODS.md
        §I.18); "none": leave it out (the summary says what that costs).
    compression : {None, "gzip", "lzf", "bitshuffle-lz4"}
    overwrite : bool

    Returns
    -------
    ImportSummary

    Raises
    ------
    DialsFormatError
        Naming the file, the column and the row at fault; a table without shoeboxes says how to
        keep them.
    """
    from . import reference as reference_module
    from .symmetry import space_group_from_hall, space_group_from_symbol, systematic_absences

    if parallax not in ("fit", "none"):
        raise ValueError(f"parallax must be 'fit' or 'none', not {parallax!r}")
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {list(COMPRESSION)}, not {compression!r}")
    if gain is not None and not gain > 0:
        raise ValueError(f"--gain must be positive (ADU per photon), not {gain}")
    pairs = [(os.fspath(e), os.fspath(r)) for e, r in pairs]
    if not pairs:
        raise ValueError("give at least one EXPT REFL pair")
    output = check_output_path(output, overwrite=overwrite, inputs=tuple(p for pr in pairs for p in pr))
    filters = COMPRESSION[compression]
    summary = ImportSummary(output=output)
    sg_override = space_group_from_symbol(space_group) if space_group else None

    # The experiments of every pair first (small): one detector, one beam direction.
    experiment_lists = []
    detector: list[Panel] | None = None
    direction = None
    for expt_path, _ in pairs:
        experiments, detectors = read_experiments(expt_path)
        for i, e in enumerate(experiments):
            if detector is None:
                detector, direction = detectors[e.detector], e.direction
            elif not _same_detector(detector, detectors[e.detector]):
                raise DialsFormatError(f"{expt_path}: experiment {i}: its detector differs from "
                                       "the first experiment's (a shoebox file holds one detector)")
            if np.degrees(np.arccos(np.clip(e.direction @ direction, -1, 1))) > 1e-4:
                raise DialsFormatError(f"{expt_path}: experiment {i}: beam direction "
                                       f"{e.direction.tolist()} differs from the first "
                                       f"experiment's {direction.tolist()}")
        experiment_lists.append(experiments)
    R = dials_to_lab_rotation(direction)
    n_panels = len(detector)
    panel_gain = np.array([gain if gain is not None else p.gain for p in detector])
    inverse_gain = (1.0 / panel_gain).astype(np.float32)  # counts stay float32
    summary.n_panels, summary.gain = n_panels, panel_gain.tolist()

    # Symmetry: the override, else the experiments' (all the same).
    halls = {e.hall_symbol for exps in experiment_lists for e in exps if e.hall_symbol}
    if sg_override is not None:
        sg = sg_override
    elif len(halls) == 1:
        sg = space_group_from_hall(halls.pop())
    elif len(halls) > 1:
        raise DialsFormatError(f"{pairs[0][0]}: the experiments have different space groups "
                               f"({sorted(halls)}); pass --space-group")
    else:
        sg = None

    images: dict[str, list] = {k: [] for k in ("wavelength", "A_matrix", "polarization_fraction",
                                               "cell", "source", "experiment", "identifier")}
    hkl_all, d_all = [], []
    depth_num, depth_den = np.zeros(n_panels), np.zeros(n_panels)
    parallax_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (panel, u·p, δ·p)

    with contextlib_atomic(output) as partial, h5py.File(partial, "w") as f:
        g_refl, g_pix = f.create_group("reflections"), f.create_group("pixels")
        out = {"image_id": _Appender(g_refl, "image_id", "i4", None, filters),
               "panel": _Appender(g_refl, "panel", "i2", None, filters),
               "miller_index": _Appender(g_refl, "miller_index", "i4", 3, filters),
               "bbox": _Appender(g_refl, "bbox", "i4", 4, filters),
               "pixel_offset": _Appender(g_refl, "pixel_offset", "i8", None, filters),
               "dials_row": _Appender(g_refl, "dials_row", "i8", None, filters),
               "dials_flags": _Appender(g_refl, "dials_flags", "i8", None, filters),
               "counts": _Appender(g_pix, "counts", "f4", None, filters),
               "mask": _Appender(g_pix, "mask", "u1", None, filters)}
        n_pixels = 0
        for source, ((expt_path, refl_path), experiments) in enumerate(zip(pairs, experiment_lists)):
            with ReflectionTable(refl_path) as table:
                index = table.shoebox_index()
                n = table.nrows
                ids = table.column("id").astype(np.int64) if "id" in table else np.zeros(n, np.int64)
                hkl = table.column("miller_index").astype(np.int64)
                flags = table.column("flags").astype(np.int64) if "flags" in table else np.zeros(n, np.int64)
                panel_col = index.panel
                experiment_of = _experiment_rows(table, ids, experiments, refl_path)
                bad_panel = np.flatnonzero((panel_col >= n_panels) & (index.flag > 0))
                if bad_panel.size:
                    raise DialsFormatError(f"{refl_path}: column 'shoebox' row {bad_panel[0]}: "
                                           f"panel {panel_col[bad_panel[0]]} is not a panel of the "
                                           f"detector ({n_panels} panels)")
                z_extent = index.bbox[:, 5] - index.bbox[:, 4]
                not_still = np.flatnonzero((z_extent != 1) & (index.flag > 0))
                if not_still.size:
                    raise DialsFormatError(f"{refl_path}: column 'shoebox' row {not_still[0]}: the "
                                           f"shoebox spans {z_extent[not_still[0]]} frames; a still "
                                           "has one (is this a rotation scan?)")
                orphans = int(np.count_nonzero(experiment_of < 0))
                if orphans:
                    summary.skipped["rows of no experiment (id -1: unindexed)"] = \
                        summary.skipped.get("rows of no experiment (id -1: unindexed)", 0) + orphans
                for k, e in enumerate(experiments):
                    image_id = len(images["wavelength"])
                    rows = np.flatnonzero(experiment_of == k)
                    rows = rows[_selectable(rows, index, hkl, summary.skipped)]
                    # boxes clipped to their panel (DIALS's may reach past its edges)
                    box = index.bbox[rows, :4]
                    size = np.array([detector[p].size for p in index.panel[rows]]).reshape(-1, 2)
                    clipped = np.column_stack([np.maximum(box[:, 0], 0), np.minimum(box[:, 1], size[:, 0]),
                                               np.maximum(box[:, 2], 0), np.minimum(box[:, 3], size[:, 1])])
                    inside = (clipped[:, 1] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 2])
                    if not inside.all():
                        why = "boxes wholly outside their panel"
                        summary.skipped[why] = summary.skipped.get(why, 0) + int((~inside).sum())
                    kept, box, clipped = rows[inside], box[inside], clipped[inside]
                    m = len(kept)
                    npix = (clipped[:, 1] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 2])
                    starts = np.concatenate([[0], np.cumsum(npix)]).astype(np.int64)
                    counts = np.empty(int(starts[-1]), np.float32)
                    masks = np.empty(int(starts[-1]), np.uint8)
                    for j, row in enumerate(kept):
                        data, mask = table.shoebox(index, row)
                        x0, _, y0, _ = box[j]
                        cx0, cx1, cy0, cy1 = clipped[j]
                        block = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
                        target = slice(starts[j], starts[j + 1])
                        np.multiply(data[block].reshape(-1), inverse_gain[index.panel[row]],
                                    out=counts[target])
                        masks[target] = _valid_mask(mask[block]).reshape(-1)
                    bbox, offsets = clipped, n_pixels + starts[:-1]
                    n_pixels += int(starts[-1])
                    out["image_id"].append(np.full(m, image_id, np.int32))
                    out["panel"].append(index.panel[kept].astype(np.int16))
                    out["miller_index"].append(hkl[kept].astype(np.int32))
                    out["bbox"].append(np.asarray(bbox, np.int32).reshape(-1, 4))
                    out["pixel_offset"].append(np.asarray(offsets, np.int64))
                    out["dials_row"].append(kept)
                    out["dials_flags"].append(flags[kept])
                    out["counts"].append(counts)
                    out["mask"].append(masks)
                    del counts, masks
                    hkl_all.append(hkl[kept].astype(np.int32))
                    A_dials = np.linalg.inv(e.real_space)  # rows a, b, c → columns a*, b*, c*
                    A = R @ A_dials
                    if m:
                        q = hkl[kept] @ A.T
                        d_all.append(1.0 / np.linalg.norm(q, axis=1))
                        _accumulate_parallax(table, kept, index, detector, depth_num, depth_den,
                                             parallax_rows)
                    images["wavelength"].append(e.wavelength)
                    images["A_matrix"].append(A)
                    images["polarization_fraction"].append(polarization_fraction_along_x(
                        e.polarization_normal, e.polarization_fraction, e.direction, R))
                    images["cell"].append(_cell(e.real_space))
                    images["source"].append(source)
                    images["experiment"].append(k)
                    images["identifier"].append(e.identifier)
                del index
        summary.n_images, summary.n_pixels = len(images["wavelength"]), n_pixels
        summary.n_reflections = out["image_id"].n

        # Detector, with the parallax depth per panel.
        depth = _parallax_depths(detector, depth_num, depth_den, parallax)
        summary.parallax = _parallax_report(detector, depth, parallax_rows, parallax)
        g_det = f.create_group("detector")
        normal = [np.cross(p.fast, p.slow) / np.linalg.norm(np.cross(p.fast, p.slow)) for p in detector]
        normal = [n if n @ p.origin >= 0 else -n for n, p in zip(normal, detector)]
        origin = np.array([R @ (p.origin + depth[k] * normal[k]) for k, p in enumerate(detector)])
        g_det["origin"] = origin
        g_det["fast_axis"] = np.array([R @ p.fast for p in detector])
        g_det["slow_axis"] = np.array([R @ p.slow for p in detector])
        g_det["pixel_size"] = np.array([p.pixel_size for p in detector])
        g_det["size"] = np.array([p.size for p in detector], np.int32)
        g_det["read_noise"] = np.full(n_panels, float(read_noise))
        g_det["parallax_depth"] = depth
        g_det["parallax_depth"].attrs["meaning"] = (
            "mm each panel was moved along its normal (away from the crystal) to stand for DIALS's "
            "parallax correction; 0 where none (METHODS.md §I.18)")

        # Images.
        N = summary.n_images
        g_im = f.create_group("images")
        g_im["wavelength"] = np.asarray(images["wavelength"], float)
        g_im["bandwidth"] = np.full(N, float(bandwidth))
        g_im["A_matrix"] = np.asarray(images["A_matrix"], float).reshape(N, 3, 3)
        g_im["polarization_fraction"] = np.asarray(images["polarization_fraction"], float)
        g_im["crystal_id"] = np.zeros(N, np.int32)
        g_im["dials_source"] = np.asarray(images["source"], np.int32)
        g_im["dials_experiment"] = np.asarray(images["experiment"], np.int32)
        g_im.create_dataset("dials_identifier", data=np.array(images["identifier"], dtype=object),
                            dtype=h5py.string_dtype())
        g_im["unit_cell"] = np.asarray(images["cell"], float).reshape(N, 6)

        # Symmetry and the reference.
        hkl_all_arr = np.concatenate(hkl_all) if hkl_all else np.zeros((0, 3), np.int32)
        d_arr = np.concatenate(d_all) if d_all else np.zeros(0)
        cell = np.mean(np.asarray(images["cell"], float), axis=0) if N else None
        intensity_ref = np.full(len(hkl_all_arr), np.nan)
        if sg is not None:
            absent = systematic_absences(hkl_all_arr, sg)
            g_refl["systematic_absence"] = absent.astype(np.uint8)
        else:
            absent = np.zeros(len(hkl_all_arr), bool)
        if reference is not None:
            if sg is None:
                raise DialsFormatError(f"{pairs[0][0]}: no space group known to map the reference "
                                       "onto the data; pass --space-group")
            ref = reference_module.load_reference(reference, space_group=sg, unit_cell=cell,
                                                  d_min=float(d_arr.min()) if d_arr.size else None,
                                                  column=reference_column)
            intensity_ref = ref.lookup(hkl_all_arr)
            intensity_ref[absent] = np.nan
            summary.reference = {"source": ref.description, "reflections": len(hkl_all_arr),
                                 "found": int(np.isfinite(intensity_ref).sum()),
                                 "absent": int(absent.sum())}
        g_refl["intensity_ref"] = intensity_ref
        g_refl["background"] = np.full(len(hkl_all_arr), np.nan, np.float32)

        f.attrs["format"] = SHOEBOX_FORMAT
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        summary.space_group = sg.xhm() if sg is not None else None
        summary.unit_cell = cell.tolist() if cell is not None else None
        write_symmetry(f, summary.space_group, cell)
        f.attrs["importer"] = "pixelrefine.dials"
        f.attrs["dials_sources"] = json.dumps([list(p) for p in pairs])
        f.attrs["import_summary"] = json.dumps({
            "gain_adu_per_photon": summary.gain, "parallax": summary.parallax,
            "skipped": summary.skipped, "reference": summary.reference,
            "bandwidth": bandwidth, "read_noise": read_noise})
    return summary


# helpers of import_dials --------------------------------------------------------------------

def contextlib_atomic(path: str):
    """The shoebox file appears only when complete (``io._atomic_h5``)."""
    return _atomic_h5(path)


def _cell(real_space: np.ndarray) -> list[float]:
    a, b, c = real_space
    angle = lambda u, v: float(np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))  # noqa: E731
    return [float(np.linalg.norm(a)), float(np.linalg.norm(b)), float(np.linalg.norm(c)),
            angle(b, c), angle(a, c), angle(a, b)]


def _experiment_rows(table: ReflectionTable, ids: np.ndarray, experiments: list[Experiment],
                     path: str) -> np.ndarray:
    """The index of each row's experiment in the list (−1: none), by identifier when the table
    has them, else by the id itself."""
    out = np.full(len(ids), -1, np.int64)
    by_identifier = {e.identifier: k for k, e in enumerate(experiments) if e.identifier}
    if table.identifiers and by_identifier:
        for table_id, identifier in table.identifiers.items():
            if identifier not in by_identifier:
                raise DialsFormatError(f"{path}: table id {table_id} has experiment identifier "
                                       f"{identifier!r}, which the experiment list does not hold")
            out[ids == table_id] = by_identifier[identifier]
    else:
        ok = (ids >= 0) & (ids < len(experiments))
        out[ok] = ids[ok]
    return out


def _selectable(rows: np.ndarray, index: _ShoeboxIndex, hkl: np.ndarray,
                skipped: dict[str, int]) -> np.ndarray:
    has_data = index.flag[rows] > 0
    indexed = np.any(hkl[rows] != 0, axis=1)
    for why, bad in (("rows without shoebox data", ~has_data), ("unindexed rows", has_data & ~indexed)):
        if bad.any():
            skipped[why] = skipped.get(why, 0) + int(bad.sum())
    return has_data & indexed


def _accumulate_parallax(table: ReflectionTable, rows: np.ndarray, index: _ShoeboxIndex,
                         detector: list[Panel], num: np.ndarray, den: np.ndarray,
                         parallax_rows: list) -> None:
    """Per panel Σ u·δ and Σ |u|² (mm) for the least-squares depth Δ, u = (ŝ·f, ŝ·e)/(ŝ·n̂) the
    in-plane move per unit depth, δ DIALS's parallax shift: measured as xyzcal.px·p −
    xyzcal.mm when the table has both, else dxtbx's formula o(ŝ)·(ŝ·f, ŝ·e)."""
    panel_of = index.panel[rows]
    if not any(detector[k].parallax for k in np.unique(panel_of)):
        return
    s = _directions(table, rows, detector, panel_of, index)
    measured = None
    if "xyzcal.px" in table and "xyzcal.mm" in table:
        px, mm = table.column("xyzcal.px", rows)[:, :2], table.column("xyzcal.mm", rows)[:, :2]
        pix = np.array([detector[k].pixel_size for k in panel_of])
        measured = px * pix[:, None] - mm
    for k in np.unique(panel_of):
        p = detector[k]
        if not p.parallax:
            continue
        sel = panel_of == k
        n = np.cross(p.fast, p.slow)
        n /= np.linalg.norm(n)
        if n @ p.origin < 0:
            n = -n
        cos = s[sel] @ n
        inplane = np.stack([s[sel] @ p.fast, s[sel] @ p.slow], 1)
        u = inplane / cos[:, None]
        delta = measured[sel] if measured is not None else \
            attenuation_length(p.mu, p.thickness, cos)[:, None] * inplane
        num[k] += float(np.sum(u * delta))
        den[k] += float(np.sum(u * u))
        parallax_rows.append((np.full(int(sel.sum()), k), u, delta))


def _parallax_depths(detector: list[Panel], num: np.ndarray, den: np.ndarray,
                     mode: str) -> np.ndarray:
    depth = np.zeros(len(detector))
    if mode == "none":
        return depth
    for k, p in enumerate(detector):
        if not p.parallax:
            continue
        depth[k] = num[k] / den[k] if den[k] > 0 else float(attenuation_length(p.mu, p.thickness, 1.0))
    return depth


def _parallax_report(detector: list[Panel], depth: np.ndarray, rows: list, mode: str) -> dict:
    report: dict[str, Any] = {"mode": mode, "panels_with_parallax": int(sum(p.parallax for p in detector)),
                              "panels_corrected": int(np.count_nonzero(depth))}
    if not rows:
        report.update(residual_px_rms=0.0, residual_px_max=0.0, uncorrected_px_rms=0.0,
                      uncorrected_px_max=0.0, n=0)
    else:
        panel = np.concatenate([r[0] for r in rows])
        u = np.concatenate([r[1] for r in rows])
        delta = np.concatenate([r[2] for r in rows])
        pix = np.array([detector[k].pixel_size for k in panel])
        residual = np.linalg.norm(depth[panel][:, None] * u - delta, axis=1) / pix
        uncorrected = np.linalg.norm(delta, axis=1) / pix
        report.update(residual_px_rms=float(np.sqrt(np.mean(residual**2))),
                      residual_px_max=float(residual.max()),
                      uncorrected_px_rms=float(np.sqrt(np.mean(uncorrected**2))),
                      uncorrected_px_max=float(uncorrected.max()), n=int(len(panel)))
    if report["panels_corrected"]:
        nonzero = depth[depth != 0]
        report.update(depth_mm_min=float(nonzero.min()), depth_mm_max=float(nonzero.max()))
    return report


# Column dtypes written by the importer agree with the format's.
assert WRITE_DTYPES["counts"] == "f4" and WRITE_DTYPES["mask"] == "u1"
