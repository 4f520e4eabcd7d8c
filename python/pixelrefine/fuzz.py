"""Fuzzing of shoebox files: hostile variants of small valid files through ``pixelrefine refine``.

A development tool (it needs ``hypothesis``, a test extra). Cases start from one of a few small
valid files (1–3 images, ~20 reflections, 5×5 boxes) and apply mutations:

- structured (hypothesis strategies, ``case_strategy``): values (NaN, ±inf, huge, integer
  extremes, mask values 2–255), dtypes (every int and float width, big-endian, bool, complex,
  strings), shapes (rows and columns dropped or added, scalars, extra axes), datasets and
  groups deleted or swapped for each other, soft links (valid, dangling, cyclic, pointing at
  the wrong dataset), external links, root attributes (``format``, ``format_version``
  variants), pixel offsets (all 0, overlapping, shifted, permuted, with gaps), absurd boxes,
  permuted rows, empty groups, other filters and chunks, extra datasets and attributes, a
  malformed ``/truth``;
- byte-level: bytes of a valid file flipped, overwritten, zeroed, or the file truncated.

Each case runs ``pixelrefine refine CASE OUT`` (fast: ``--R0 5e-4 --option max_global=1``;
some cases with the defaults; some as the command in a process of its own) in a worker process
that runs many cases in turn, and ends in one outcome (``OUTCOMES``; those in ``BUGS`` are
failures, among them a refusal of a file that every mutation keeps valid, ``keeps_valid``). A
worker that dies by a signal or hangs costs only the case it had started (it announces each
case before running it); that case is run once more alone to see whether it crashes by itself,
and the worker is restarted on the cases left. The report (``--out``) is rewritten every 30 s
while the run goes (``"complete": false``), so an interrupted run leaves its counts so far.

    python -m pixelrefine.fuzz --cases 10000 --seed 1 --save-cases docs/fuzz-10000-cases.jsonl.gz \
        --workers 1 --out docs/fuzz-10000.json                  # draw, save and run
    python -m pixelrefine.fuzz --cases-from docs/fuzz-10000-cases.jsonl.gz --workers 1 \
        --out docs/fuzz-10000.json                              # the same cases again, exactly
    python -m pixelrefine.fuzz replay docs/fuzz-10000.json 1234 case.h5   # one case's file
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Iterable

import h5py
import numpy as np

__all__ = ["OUTCOMES", "BUGS", "make_bases", "case_strategy", "generate_cases", "materialize",
           "run_case", "run_cases", "summarize", "main"]

#: Every outcome of a case; those in BUGS are failures.
OUTCOMES = {
    "accepted": "refined; exit 0, the results pass the results check, nothing on stderr",
    "refused": "exit 1 with one line 'Error: <file>: ...' naming the input file",
    "traceback": "an exception escaped the command (a traceback)",
    "internal_error": "exit 1 with 'internal error' (an unexpected exception, caught)",
    "unflagged_nonfinite": "a non-finite result without a status or flag that explains it",
    "unclear_error": "exit 1, but not one line naming the input file",
    "noisy": "more than the one line on stderr (warnings, C++ or HDF5 diagnostics)",
    "crash": "the worker died by a signal while running the case",
    "hang": "the case ran longer than the timeout",
    "input_modified": "the input file changed",
    "output_left": "a refused case left an output or partial file",
    "unexpected_exit": "an exit code other than 0 and 1",
    "wrongly_refused": "refused, though every mutation of the case keeps the file valid "
                       "(``keeps_valid``)",
}
BUGS = frozenset(OUTCOMES) - {"accepted", "refused"}

DATASETS = [f"/{group}/{name}" for group, names in {
    "detector": ["origin", "fast_axis", "slow_axis", "pixel_size", "size", "read_noise"],
    "images": ["wavelength", "bandwidth", "A_matrix", "polarization_fraction", "crystal_id"],
    "reflections": ["image_id", "panel", "miller_index", "intensity_ref", "bbox", "pixel_offset",
                    "background"],
    "pixels": ["counts", "mask"],
}.items() for name in names]
TRUTH_DATASETS = ["/truth/images/G", "/truth/global/R0", "/truth/reflections/intensity_true"]
GROUPS = ["/detector", "/images", "/reflections", "/pixels", "/truth", "/truth/images"]
SPECIAL_VALUES = [
    float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 5e-324, 1e-300, 1e-30, 1e38, 3.4e38,
    1e39, 1e300, -1e300, -1.0, 0.5, 1.5, 2.0, 7.0, 255.0, 256.0, 1e9,
    -1, 0, 1, 2, 3, 7, 99, 255, 256, 2**15, 2**15 - 1, 2**31 - 1, -2**31, 2**31, 2**32,
    2**53 + 1, 2**62, 2**63 - 10, 2**63 - 1, -2**63, 2**64 - 1,
]
DTYPES = ["f2", "f4", "f8", "f16", ">f8", "i1", "i2", "i4", "i8", ">i4", "u1", "u2", "u4", "u8",
          "bool", "c8", "c16", "S8", "vlen-str"]
SHAPES = ["drop_row", "add_row", "drop_column", "add_column", "add_axis", "scalar", "empty",
          "flatten", "transpose"]
LINKS = ["valid", "relative", "dangling", "self", "cycle", "other"]
EXTERNAL = ["self_file", "missing_file", "not_hdf5"]
ROOT_ATTRIBUTES = {
    "format": ["pixelrefine.shoeboxes", "bytes", "pixelrefine.shoeboxes ",
               "dials.refl", "", "missing", "array", "number"],
    "format_version": [1, 2, 0, -1, 2**40, "1.0", "1", "b1", "int8", "uint64", "array2",
                       "bool", "missing", "empty", "float"],
}
OFFSETS = ["zero", "copy_previous", "shift_one", "shift_far", "reverse", "gap", "negative"]
BBOXES = [[0, 2**31 - 1, 0, 2**31 - 1], [-5, 0, 0, 5], [5, 0, 0, 5], [0, 0, 0, 0],
          [2**31 - 2, 2**31 - 1, 0, 1], [-2**31, 2**31 - 1, -2**31, 2**31 - 1], [0, 1, 0, 1],
          [0, 1030, 0, 1064], [3, 8, 3, 8], [0, 5, 0, 6]]
FILTERS = ["gzip", "lzf", "shuffle_fletcher32", "bitshuffle", "blosc", "zstd", "lz4"]
TRUTH = ["dataset", "dangling", "external", "delete", "scalar", "garbage", "group_for_dataset"]
EMPTY = ["reflections", "images", "pixels"]
BASES = ["one", "two", "three", "tiled"]
BYTE_BASES = ["one", "two"]

#: Outcomes come back from workers on this many seconds of silence at most (per case).
DEFAULT_TIMEOUT = 60.0
#: Seconds a case run in its own process may take (then: a hang).
SUBPROCESS_TIMEOUT = 50.0
#: Address space of a worker (bytes): a runaway allocation fails there, not on the machine.
WORKER_MEMORY = 4 << 30
#: What the reader of a worker may load (PIXELREFINE_MAX_READ_BYTES).
WORKER_READ_BYTES = 1 << 30


# ------------------------------------------------------------------ the valid starting files

def make_bases(directory: str) -> dict[str, str]:
    """The valid starting files (deterministic), written to ``directory`` once."""
    from .io import write_shoeboxes
    from .simulate import simulate, tiled_detector

    specs = {
        "one": dict(n=1, seed=1, compression=None, extra={}),
        "two": dict(n=2, seed=2, compression="gzip", extra=dict(n_crystals=2, read_noise=1.0)),
        "three": dict(n=3, seed=3, compression="lzf", extra={}),
        "tiled": dict(n=2, seed=4, compression="bitshuffle-lz4",
                      extra=dict(detector=tiled_detector(2, 1, module_size=(512, 1064),
                                                         gap=(6, 0)))),
    }
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, spec in specs.items():
        path = os.path.join(directory, f"base-{name}.h5")
        if not os.path.exists(path):
            shoeboxes = simulate(spec["n"], seed=spec["seed"], max_reflections=20, shoebox_size=5,
                                 **spec["extra"])
            partial = path + ".writing"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            write_shoeboxes(partial, shoeboxes, compression=spec["compression"], overwrite=True)
            os.chmod(partial, 0o444)  # no case may change a starting file
            os.replace(partial, path)
        paths[name] = path
    return paths


# ------------------------------------------------------------------ strategies

def case_strategy():
    """Hypothesis strategy of one case: a dict with ``kind`` ("structured" or "bytes"),
    ``base`` (a name of ``make_bases``) and ``mutations`` (applied in turn), JSON-serialisable."""
    from hypothesis import strategies as st

    row = st.integers(0, 200)
    value = st.one_of(st.sampled_from(SPECIAL_VALUES),
                      st.floats(allow_nan=True, allow_infinity=True, width=64),
                      st.integers(-2**63, 2**64 - 1))
    dataset = st.sampled_from(DATASETS)
    structured = st.one_of(
        st.fixed_dictionaries({"op": st.just("value"), "path": dataset, "row": row,
                               "column": st.none() | st.integers(0, 3), "value": value}),
        st.fixed_dictionaries({"op": st.just("fill"), "path": dataset, "value": value}),
        st.fixed_dictionaries({"op": st.just("dtype"), "path": dataset,
                               "dtype": st.sampled_from(DTYPES)}),
        st.fixed_dictionaries({"op": st.just("shape"), "path": dataset,
                               "how": st.sampled_from(SHAPES)}),
        st.fixed_dictionaries({"op": st.just("delete"),
                               "path": st.sampled_from(DATASETS + GROUPS)}),
        st.fixed_dictionaries({"op": st.just("group_for_dataset"), "path": dataset}),
        st.fixed_dictionaries({"op": st.just("dataset_for_group"), "path": st.sampled_from(GROUPS)}),
        st.fixed_dictionaries({"op": st.just("soft_link"), "path": st.sampled_from(DATASETS + GROUPS),
                               "target": st.sampled_from(LINKS)}),
        st.fixed_dictionaries({"op": st.just("external_link"),
                               "path": st.sampled_from(DATASETS + GROUPS),
                               "target": st.sampled_from(EXTERNAL)}),
        st.sampled_from([{"op": "root_attribute", "name": name, "value": v}
                         for name, values in ROOT_ATTRIBUTES.items() for v in values]),
        st.fixed_dictionaries({"op": st.just("offsets"), "how": st.sampled_from(OFFSETS),
                               "row": row}),
        st.fixed_dictionaries({"op": st.just("bbox"), "row": row,
                               "value": st.sampled_from(BBOXES) | st.lists(
                                   st.integers(-2**31, 2**31 - 1), min_size=4, max_size=4)}),
        st.fixed_dictionaries({"op": st.just("permute"), "path": dataset,
                               "seed": st.integers(0, 2**16)}),
        st.fixed_dictionaries({"op": st.just("filter"), "path": dataset,
                               "filter": st.sampled_from(FILTERS), "chunk": st.integers(1, 64)}),
        st.fixed_dictionaries({"op": st.just("extra"),
                               "kind": st.sampled_from(["dataset", "attribute", "group", "compound"])}),
        st.fixed_dictionaries({"op": st.just("truth"), "how": st.sampled_from(TRUTH)}),
        st.fixed_dictionaries({"op": st.just("empty"), "group": st.sampled_from(EMPTY)}),
    )
    # Byte positions come from a seeded generator (uniform over the file, or over its first
    # 4 KB: superblock, root group, the first object headers); hypothesis' own integers lean
    # to small values.
    where = {"seed": st.integers(0, 2**32 - 1), "region": st.sampled_from(["file", "file", "head"])}
    byte_level = st.one_of(
        st.fixed_dictionaries({"op": st.just("flip"), "count": st.integers(1, 24), **where}),
        st.fixed_dictionaries({"op": st.just("truncate"), **where}),
        st.fixed_dictionaries({"op": st.just("overwrite"),
                               "bytes": st.sampled_from(["ff" * 8, "00" * 8, "7f" * 4, "80" * 8])
                               | st.binary(min_size=1, max_size=16).map(bytes.hex), **where}),
        st.fixed_dictionaries({"op": st.just("zero"), "length": st.integers(1, 4096), **where}),
    )
    structured_case = st.fixed_dictionaries({
        "kind": st.just("structured"), "base": st.sampled_from(BASES),
        "mutations": st.lists(structured, min_size=1, max_size=3)})
    byte_case = st.fixed_dictionaries({
        "kind": st.just("bytes"), "base": st.sampled_from(BYTE_BASES),
        "mutations": st.lists(byte_level, min_size=1, max_size=2)})
    return st.one_of(structured_case, structured_case, byte_case)


#: How a case is refined: fast (R0 given, one round of the global loop: the point is the input
#: handling) or with the defaults (R0 and the error model refined, the profile chosen).
FAST = {"R0": 5e-4, "max_global": 1}
DEFAULTS = {"R0": None, "max_global": None}


def generate_cases(n: int, seed: int, *, derandomize: bool = False,
                   default_fraction: float = 0.05, process_fraction: float = 0.01) -> list[dict]:
    """``n`` cases drawn from ``case_strategy`` (reproducible for a seed and a hypothesis
    version), numbered from 0; a ``default_fraction`` of them (chosen by their number) are
    refined with the default settings, the others fast; a ``process_fraction`` run the
    command in a process of its own (``python -m pixelrefine.cli``: what a user's shell
    sees, traceback and exit status included), the others through click's test runner in the
    worker (much faster)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    cases: list[dict] = []

    @settings(max_examples=n, database=None, deadline=None, derandomize=derandomize,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(case_strategy())
    def collect(case):
        if len(cases) < n:
            cases.append(copy.deepcopy(case))

    collect()
    def every(fraction: float, phase: int) -> set[int]:
        step = 1.0 / fraction if fraction > 0 else float("inf")
        return {int(k * step) + phase for k in range(n) if k * step + phase < n}

    defaults, process = every(default_fraction, 0), every(process_fraction, 1)
    return [{"id": i, **case, "run": dict(DEFAULTS if i in defaults else FAST),
             "process": i in process}
            for i, case in enumerate(cases)]


# ------------------------------------------------------------------ mutations

def materialize(case: dict, bases: dict[str, str], path: str) -> list[str]:
    """Write the case's file at ``path``: its base, mutated. Returns the mutations that could
    not apply (to a file an earlier mutation had already broken, say): they are skipped."""
    shutil.copyfile(bases[case["base"]], path)
    skipped = []
    if case["kind"] == "structured":
        for op in case["mutations"]:
            try:
                with h5py.File(path, "r+") as f:
                    _STRUCTURED[op["op"]](f, op, path, bases)
            except Exception as error:  # the op does not apply to this file
                skipped.append(f"{op['op']}: {type(error).__name__}: {error}")
    else:
        for op in case["mutations"]:
            _mutate_bytes(path, op)
    return skipped


def _rewrite(f: h5py.File, path: str, data: Any, **kwargs) -> None:
    attrs = dict(f[path].attrs) if path in f and isinstance(f[path], h5py.Dataset) else {}
    if path in f or isinstance(f.get(path, getlink=True), (h5py.SoftLink, h5py.ExternalLink)):
        del f[path]
    f.create_dataset(path, data=data, **kwargs)
    for key, value in attrs.items():
        f[path].attrs[key] = value


def _python_value(value: Any) -> Any:
    return float(value) if isinstance(value, float) else int(value)


def _fit(data: np.ndarray, value: Any) -> np.ndarray:
    """``data`` in a dtype that holds ``value`` (ints widened, floats where needed)."""
    if data.dtype.kind == "b":
        data = data.astype("i8")
    if data.dtype.kind in "iu":
        if isinstance(value, float):
            return data.astype("f8") if not (np.isfinite(value) and value.is_integer()
                                             and -2**63 <= value < 2**63) else data.astype("i8")
        for dtype in (data.dtype, np.dtype("i8"), np.dtype("u8")):
            info = np.iinfo(dtype)
            if info.min <= value <= info.max:
                return data.astype(dtype)
        return data.astype("f8")
    if data.dtype.kind == "f":
        return data
    raise TypeError(f"cannot put a number into dtype {data.dtype}")


def _op_value(f, op, path, bases):
    data = np.asarray(f[op["path"]][()])
    if data.ndim == 0 or len(data) == 0:
        raise ValueError("no rows")
    value = _python_value(op["value"])
    data = _fit(data, value)
    index = (op["row"] % len(data),)
    if op["column"] is not None and data.ndim > 1:
        index += (op["column"] % data.shape[1],)
    with np.errstate(all="ignore"):
        data[index] = value
    _rewrite(f, op["path"], data)


def _op_fill(f, op, path, bases):
    data = np.asarray(f[op["path"]][()])
    value = _python_value(op["value"])
    data = _fit(data, value)
    with np.errstate(all="ignore"):
        data[...] = value
    _rewrite(f, op["path"], data)


def _op_dtype(f, op, path, bases):
    data = np.asarray(f[op["path"]][()])
    with np.errstate(all="ignore"):
        if op["dtype"] == "vlen-str":
            _rewrite(f, op["path"], data.astype(str).astype(object), dtype=h5py.string_dtype())
            return
        if op["dtype"] == "S8":
            data = data.astype("S8")
        else:
            data = data.astype(op["dtype"])
    _rewrite(f, op["path"], data)


def _op_shape(f, op, path, bases):
    data = np.asarray(f[op["path"]][()])
    how = op["how"]
    if how == "drop_row":
        data = data[:-1]
    elif how == "add_row":
        data = np.concatenate([data, data[-1:] if len(data) else np.zeros((1,) + data.shape[1:], data.dtype)])
    elif how == "drop_column":
        data = data[..., :-1] if data.ndim > 1 else data[:, None][:, :0]
    elif how == "add_column":
        data = np.concatenate([data, data[..., -1:]], axis=-1) if data.ndim > 1 else np.stack([data, data], 1)
    elif how == "add_axis":
        data = data[..., None]
    elif how == "scalar":
        data = data.reshape(-1)[0] if data.size else np.zeros((), data.dtype)
    elif how == "empty":
        data = data[:0]
    elif how == "flatten":
        data = data.reshape(-1)
    elif how == "transpose":
        data = data.T
    _rewrite(f, op["path"], data)


def _op_delete(f, op, path, bases):
    del f[op["path"]]


def _op_group_for_dataset(f, op, path, bases):
    del f[op["path"]]
    f.create_group(op["path"])["data"] = np.arange(3)


def _op_dataset_for_group(f, op, path, bases):
    del f[op["path"]]
    f[op["path"]] = np.arange(5.0)


def _op_soft_link(f, op, path, bases):
    where, target = op["path"], op["target"]
    parent, name = where.rsplit("/", 1)
    if target in ("valid", "relative"):
        f.move(where, f"{where}_real")
        f[where] = h5py.SoftLink(f"{where}_real" if target == "valid" else f"{name}_real")
    elif target == "dangling":
        del f[where]
        f[where] = h5py.SoftLink(f"{parent}/nowhere")
    elif target == "self":
        del f[where]
        f[where] = h5py.SoftLink(where)
    elif target == "cycle":
        del f[where]
        f[where] = h5py.SoftLink(f"{where}_a")
        f[f"{where}_a"] = h5py.SoftLink(where)
    else:  # another object of the file in its place
        other = "/pixels/counts" if where != "/pixels/counts" else "/reflections/bbox"
        del f[where]
        f[where] = h5py.SoftLink(other)


def _op_external_link(f, op, path, bases):
    where = op["path"]
    if op["target"] == "self_file":  # a copy of a valid file beside the case (never a base)
        file = os.path.abspath(path + ".linked.h5")
        shutil.copyfile(bases["one"], file)
    else:
        file = {"missing_file": "/nonexistent/x.h5", "not_hdf5": "/etc/hostname"}[op["target"]]
    del f[where]
    f[where] = h5py.ExternalLink(file, where)


def _op_root_attribute(f, op, path, bases):
    name, value = op["name"], op["value"]
    special = {"missing": None, "bytes": b"pixelrefine.shoeboxes", "array": np.array(["pixelrefine.shoeboxes"] * 2, dtype="S"),
               "number": 3.0, "1.0": 1.0, "b1": b"1", "int8": np.int8(1), "uint64": np.uint64(1),
               "array2": np.array([1, 1]), "bool": np.bool_(True),
               "empty": h5py.Empty("i4"), "float": np.float32(1.0)}
    value = special.get(value, value) if isinstance(value, str) else value
    if value is None:
        if name in f.attrs:
            del f.attrs[name]
        return
    f.attrs[name] = value


def _op_offsets(f, op, path, bases):
    offsets = np.asarray(f["/reflections/pixel_offset"][()]).astype("i8")
    if len(offsets) == 0:
        raise ValueError("no reflections")
    r = op["row"] % len(offsets)
    how = op["how"]
    if how == "zero":
        offsets[:] = 0
    elif how == "copy_previous":
        offsets[r] = offsets[r - 1] if r else offsets[min(1, len(offsets) - 1)]
    elif how == "shift_one":
        offsets[r:] += 1
    elif how == "shift_far":
        offsets[r] += int(f["/pixels/counts"].shape[0])
    elif how == "reverse":
        offsets = offsets[::-1].copy()
    elif how == "negative":
        offsets[r] = -offsets[r] - 1
    elif how == "gap":  # valid: ten unused pixels before row r's box
        offsets[r:] += 10
        for name in ("/pixels/counts", "/pixels/mask"):
            data = np.asarray(f[name][()])
            _rewrite(f, name, np.concatenate([data, np.zeros(10, data.dtype)]))
    _rewrite(f, "/reflections/pixel_offset", offsets)


def _op_bbox(f, op, path, bases):
    bbox = np.asarray(f["/reflections/bbox"][()]).astype("i8")
    bbox[op["row"] % len(bbox)] = op["value"]
    _rewrite(f, "/reflections/bbox", bbox)


def _op_permute(f, op, path, bases):
    data = np.asarray(f[op["path"]][()])
    order = np.random.default_rng(op["seed"]).permutation(len(data))
    _rewrite(f, op["path"], data[order])


def _op_filter(f, op, path, bases):
    import hdf5plugin

    data = np.asarray(f[op["path"]][()])
    chunks = (min(op["chunk"], max(len(data), 1)),) + data.shape[1:] if data.ndim else None
    kwargs = {"gzip": {"compression": "gzip", "compression_opts": 9},
              "lzf": {"compression": "lzf"},
              "shuffle_fletcher32": {"shuffle": True, "fletcher32": True},
              "bitshuffle": dict(hdf5plugin.Bitshuffle()), "blosc": dict(hdf5plugin.Blosc()),
              "zstd": dict(hdf5plugin.Zstd()), "lz4": dict(hdf5plugin.LZ4())}[op["filter"]]
    if not data.size or op["filter"] == "lzf" and data.dtype.kind not in "iuf":
        raise ValueError("nothing to filter")
    _rewrite(f, op["path"], data, chunks=chunks, **kwargs)


def _op_extra(f, op, path, bases):
    kind = op["kind"]
    if kind == "dataset":
        f["/reflections/extra_column"] = np.arange(len(f["/reflections/image_id"]))
    elif kind == "attribute":
        f.attrs["comment"] = "an extra root attribute"
        f["/pixels/counts"].attrs["units"] = "photons"
    elif kind == "group":
        f.create_group("/calibration")["gain"] = np.ones(3)
    else:
        f["/images/notes"] = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])


def _op_truth(f, op, path, bases):
    how = op["how"]
    if "truth" in f:
        del f["truth"]
    if how == "dataset":
        f["truth"] = np.arange(4)
    elif how == "dangling":
        f["truth"] = h5py.SoftLink("/nowhere")
    elif how == "external":
        f["truth"] = h5py.ExternalLink("/nonexistent/truth.h5", "/truth")
    elif how == "scalar":
        f.create_group("truth/images")["G"] = 1.0
    elif how == "garbage":
        g = f.create_group("truth")
        g.create_group("images")["G"] = np.array([b"x"])
        g["global"] = h5py.SoftLink("/truth/global")
        g.attrs["parameters"] = "not json"
    elif how == "group_for_dataset":
        f.create_group("truth/images/G")


def _op_empty(f, op, path, bases):
    groups = {"reflections": ["reflections", "pixels"], "images": ["images", "reflections", "pixels"],
              "pixels": ["pixels"]}[op["group"]]
    for group in groups:
        for name in list(f[group].keys()):
            data = np.asarray(f[f"{group}/{name}"][()])
            _rewrite(f, f"{group}/{name}", data[:0])


_STRUCTURED = {name[4:]: fn for name, fn in globals().items() if name.startswith("_op_")}


def _mutate_bytes(path: str, op: dict) -> None:
    data = bytearray(open(path, "rb").read())
    size = len(data)
    rng = np.random.default_rng(op["seed"])
    span = size if op["region"] == "file" else min(size, 4096)
    start = int(rng.integers(0, span))
    if op["op"] == "flip":
        for at, xor in zip(rng.integers(0, span, op["count"]), rng.integers(1, 256, op["count"])):
            data[at] ^= int(xor)
    elif op["op"] == "truncate":
        del data[start:]
    elif op["op"] == "overwrite":
        chunk = bytes.fromhex(op["bytes"])[:size - start]
        data[start:start + len(chunk)] = chunk
    elif op["op"] == "zero":
        end = min(size, start + op["length"])
        data[start:end] = bytes(end - start)
    with open(path, "wb") as handle:
        handle.write(data)


# ------------------------------------------------------------------ one case

def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    except OSError:
        return None


def refine_arguments(case: dict, path: str, out: str) -> list[str]:
    """The command line of a case (after ``pixelrefine``)."""
    args = ["refine", path, out, "--threads", "1", "--no-progress"]
    if case["run"]["R0"] is not None:
        args += ["--R0", repr(case["run"]["R0"])]
    if case["run"]["max_global"] is not None:
        args += ["--option", f"max_global={case['run']['max_global']}"]
    return args


@contextlib.contextmanager
def _captured_fd2():
    """What C and C++ code write to file descriptor 2 meanwhile (glog, HDF5 diagnostics)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        text = io.StringIO()
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text.write(capture.read().decode("utf-8", "replace"))


def _check_accepted(path: str, out: str) -> tuple[str, str]:
    from .io import read_results, read_shoeboxes
    from .validation import unexplained

    results = read_results(out)
    shoeboxes = read_shoeboxes(path)
    found = unexplained(results, shoeboxes.reflections.image_id)
    if found:
        return "unflagged_nonfinite", found[0]
    return "accepted", ""


def classify(path: str, out: str, exit_code: int, exception: BaseException | None,
             stderr: str) -> tuple[str, str]:
    """(outcome, detail) of one run of the command."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if exception is not None and not isinstance(exception, SystemExit):
        frame = traceback.extract_tb(exception.__traceback__)[-1]
        return "traceback", f"{type(exception).__name__}: {exception} ({frame.filename}:{frame.lineno})"
    if exit_code == 0:
        if lines:
            return "noisy", " | ".join(lines)[:400]
        return _check_accepted(path, out)
    if exit_code != 1:
        return "unexpected_exit", f"exit {exit_code}: {' | '.join(lines)[:400]}"
    if len(lines) != 1:
        return "noisy", " | ".join(lines)[:400]
    line = lines[0]
    if "nothing explains it" in line:
        return "unflagged_nonfinite", line
    if "internal error" in line:
        return "internal_error", line
    if not line.startswith(f"Error: {path}: ") or refusal_subject(line) is None:
        return "unclear_error", line
    if os.path.exists(out) or any(p.startswith(f".{os.path.basename(out)}.")
                                  for p in os.listdir(os.path.dirname(out) or ".")):
        return "output_left", line
    return "refused", line


FLOAT_DATASETS = {"/detector/origin", "/detector/fast_axis", "/detector/slow_axis",
                  "/detector/pixel_size", "/detector/read_noise", "/images/wavelength",
                  "/images/bandwidth", "/images/A_matrix", "/images/polarization_fraction",
                  "/reflections/intensity_ref", "/reflections/background", "/pixels/counts"}
OPTIONAL_DATASETS = {"/detector/read_noise", "/images/crystal_id", "/reflections/background"}


def keeps_valid(op: dict, base: str) -> bool:
    """Whether a structured mutation leaves a valid file valid (shoebox-hdf5.md: any float
    dtype for a float column and any integer one for an integer column, filters, extra
    datasets and attributes, optional datasets absent, unused pixels, soft links within the
    file, anything under /truth, rows of /images or /pixels in another order, no reflections)."""
    name, path = op["op"], op.get("path", "")
    in_truth = path == "/truth" or path.startswith("/truth/")
    if name in ("extra", "filter", "truth"):
        return True
    if name in ("delete", "dataset_for_group", "external_link", "group_for_dataset"):
        return in_truth or (name == "delete" and (
            path in OPTIONAL_DATASETS or (path == "/reflections/panel" and base != "tiled")))
    if name == "soft_link":
        return op["target"] in ("valid", "relative") or in_truth
    if name == "dtype":  # widths that hold every value of the valid files exactly
        return op["dtype"] in (("f8", ">f8", "f16") if path in FLOAT_DATASETS else ("i4", "i8", ">i4"))
    if name == "offsets":
        return op["how"] == "gap"
    if name == "root_attribute":
        return (op["name"], op["value"]) in {("format", "pixelrefine.shoeboxes"), ("format", "bytes"),
                                             ("format_version", 1), ("format_version", "int8"),
                                             ("format_version", "uint64")}
    if name == "permute":
        return path.startswith("/images/") or path.startswith("/pixels/")
    if name == "empty":
        return op["group"] in ("reflections", "images")
    return False


def expected_valid(case: dict) -> bool:
    """Whether a case's file is valid by construction: structured, every mutation valid."""
    return case["kind"] == "structured" and all(keeps_valid(op, case["base"])
                                                for op in case["mutations"])


def run_case(case: dict, bases: dict[str, str], directory: str) -> dict:
    """Materialise and run one case in this process; its outcome record."""
    from click.testing import CliRunner

    from .cli import main as command

    path = os.path.join(directory, f"case-{case['id']}.h5")
    out = os.path.join(directory, f"case-{case['id']}-results.h5")
    start = time.perf_counter()
    skipped = materialize(case, bases, path)
    _selftest(case)
    digest = _digest(path)
    if case.get("process"):  # the installed command in a process of its own
        try:
            run = subprocess.run([sys.executable, "-m", "pixelrefine.cli",
                                  *refine_arguments(case, path, out)],
                                 capture_output=True, text=True, errors="replace",
                                 stdin=subprocess.DEVNULL, timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            outcome, detail = "hang", f"the command ran more than {SUBPROCESS_TIMEOUT:g} s"
        else:
            if run.returncode < 0:
                outcome, detail = "crash", f"the command died by {signal.Signals(-run.returncode).name}"
            elif "Traceback (most recent call last)" in run.stderr:
                outcome, detail = "traceback", run.stderr.strip().splitlines()[-1][:400]
            else:
                outcome, detail = classify(path, out, run.returncode, None, run.stderr)
    else:
        with _captured_fd2() as native:
            result = CliRunner().invoke(command, refine_arguments(case, path, out))
        outcome, detail = classify(path, out, result.exit_code, result.exception,
                                   result.stderr + native.getvalue())
    if outcome == "refused" and expected_valid(case):
        outcome = "wrongly_refused"
    if _digest(path) != digest:
        outcome, detail = "input_modified", detail
    record = {"id": case["id"], "outcome": outcome, "detail": detail,
              "seconds": round(time.perf_counter() - start, 3)}
    if skipped:
        record["skipped"] = skipped
    for name in (path, out, path + ".linked.h5"):
        with contextlib.suppress(OSError):
            os.unlink(name)
    return record


def _selftest(case: dict) -> None:
    """Cases that test the harness itself: ``"selftest": "abort" | "hang" | "raise"``."""
    how = case.get("selftest")
    if how == "abort":
        os.abort()
    if how == "hang":
        time.sleep(3600)
    if how == "raise":
        raise RuntimeError("selftest")


# ------------------------------------------------------------------ workers

def worker(case_file: str, directory: str) -> None:
    """Run the cases of ``case_file`` (JSON lines) one after another, announcing each on
    stdout (``{"start": id}``) and then its outcome record."""
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    _die_with_parent()
    bases = json.loads(os.environ["PIXELREFINE_FUZZ_BASES"])
    protocol = sys.stdout
    with open(case_file) as handle:
        cases = [json.loads(line) for line in handle if line.strip()]
    for case in cases:
        print(json.dumps({"start": case["id"]}), file=protocol, flush=True)
        try:
            record = run_case(case, bases, directory)
        except Exception as error:  # the harness itself failed on this case
            record = {"id": case["id"], "outcome": "traceback",
                      "detail": f"harness: {type(error).__name__}: {error}"}
        print(json.dumps(record), file=protocol, flush=True)


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the process that started it ends (a hanging case
    would otherwise outlive an interrupted run)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Worker:
    """One worker process and the cases it has left."""

    def __init__(self, cases: list[dict], directory: str, bases: dict[str, str], index: int):
        self.cases = {case["id"]: case for case in cases}
        self.order = [case["id"] for case in cases]
        self.directory, self.bases, self.index = directory, bases, index
        self.current: int | None = None
        self.started = 0.0
        self.process: subprocess.Popen | None = None
        self.buffer = b""
        self.launches = 0

    def launch(self) -> None:
        self.launches += 1
        case_file = os.path.join(self.directory, f"worker-{self.index}-{self.launches}.jsonl")
        with open(case_file, "w") as handle:
            for case_id in self.order:
                handle.write(json.dumps(self.cases[case_id]) + "\n")
        env = dict(os.environ, PIXELREFINE_FUZZ_BASES=json.dumps(self.bases),
                   PIXELREFINE_MAX_READ_BYTES=str(WORKER_READ_BYTES), OMP_NUM_THREADS="1")
        env.pop("PIXELREFINE_TRACEBACK", None)
        log = open(os.path.join(self.directory, f"worker-{self.index}.log"), "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pixelrefine.fuzz", "worker", case_file, self.directory],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
        log.close()
        self.current, self.started, self.buffer = None, time.monotonic(), b""

    def lines(self) -> list[dict] | None:
        """The complete lines read now; None at the end of the worker's output."""
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()


def _run_alone(case: dict, directory: str, bases: dict[str, str], timeout: float) -> str:
    """Whether a case that ended its worker does so alone in a fresh worker."""
    solo = _Worker([case], directory, bases, index=10_000 + case["id"])
    records = _drive([solo], timeout, confirm=False)
    return records[0]["outcome"] if records else "no outcome"


def _drive(workers: list[_Worker], timeout: float, *, confirm: bool = True,
           progress=None) -> list[dict]:
    records: list[dict] = []
    selector = selectors.DefaultSelector()
    for w in workers:
        w.launch()
        selector.register(w.process.stdout, selectors.EVENT_READ, w)
    live = set(workers)

    def finish(w: _Worker, outcome: str, detail: str) -> None:
        case = w.cases[w.current]
        if confirm:
            detail += f"; alone: {_run_alone(case, w.directory, w.bases, timeout)}"
        records.append({"id": w.current, "outcome": outcome, "detail": detail})
        w.order.remove(w.current)
        w.current = None

    def restart_or_retire(w: _Worker) -> None:
        selector.unregister(w.process.stdout)
        if w.order:
            w.launch()
            selector.register(w.process.stdout, selectors.EVENT_READ, w)
        else:
            live.discard(w)

    while live:
        for key, _ in selector.select(timeout=1.0):
            w = key.data
            lines = w.lines()
            if lines is None:  # end of file: the worker ended
                w.process.wait()
                code = w.process.returncode
                w.process.stdout.close()
                if w.current is not None:
                    what = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
                    finish(w, "crash", what)
                w.order = [i for i in w.order if i not in {r["id"] for r in records}]
                restart_or_retire(w)
                continue
            for line in lines:
                if "start" in line:
                    w.current, w.started = line["start"], time.monotonic()
                else:
                    records.append(line)
                    w.order.remove(line["id"])
                    w.current = None
                    if progress:
                        progress(records)
        for w in list(live):
            if w.current is not None and time.monotonic() - w.started > timeout:
                w.kill()
                finish(w, "hang", f"more than {timeout:g} s")
                restart_or_retire(w)
    return records


def run_cases(cases: list[dict], directory: str, *, workers: int = 1,
              timeout: float = DEFAULT_TIMEOUT, progress=None) -> list[dict]:
    """Run ``cases`` on ``workers`` worker processes; one outcome record per case, by id.

    Raises
    ------
    RuntimeError
        When a starting file changed during the run (the harness would be testing other
        files than it says).
    """
    bases = make_bases(os.path.join(directory, "bases"))
    before = {name: _digest(path) for name, path in bases.items()}
    work = os.path.join(directory, "cases")
    os.makedirs(work, exist_ok=True)
    pool = [_Worker(cases[k::workers], work, bases, k) for k in range(workers) if cases[k::workers]]
    records = _drive(pool, timeout, progress=progress)
    changed = [name for name, path in bases.items() if _digest(path) != before[name]]
    if changed:
        raise RuntimeError(f"fuzz harness: the starting file(s) {changed} changed during the run")
    return sorted(records, key=lambda r: r["id"])


def summarize(cases: list[dict], records: list[dict]) -> dict:
    """Counts by outcome (overall and by kind of case and of settings) and the bugs."""
    by_id = {case["id"]: case for case in cases}
    counts = {name: 0 for name in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    for record in records:
        case = by_id[record["id"]]
        counts[record["outcome"]] += 1
        kind = (f"{case['kind']}, {'fast' if case['run']['R0'] is not None else 'defaults'}"
                f"{', own process' if case.get('process') else ''}")
        by_kind.setdefault(kind, {}).setdefault(record["outcome"], 0)
        by_kind[kind][record["outcome"]] += 1
    bugs = [{**record, "case": by_id[record["id"]]} for record in records
            if record["outcome"] in BUGS]
    refused_by: dict[str, int] = {}
    for record in records:
        if record["outcome"] == "refused":
            where = refusal_subject(record["detail"])
            refused_by[where] = refused_by.get(where, 0) + 1
    return {"cases": len(records), "counts": counts, "by_kind": by_kind,
            "refused_by": dict(sorted(refused_by.items(), key=lambda kv: -kv[1])),
            "bugs": sum(counts[name] for name in BUGS), "bug_cases": bugs}


#: What a refusal names after the file: a dataset or group, a root attribute, or the file as
#: a whole (not HDF5, a corrupt global heap, too large, a partial file).
REFUSAL_SUBJECT = re.compile(
    r"^Error: .*?: (?P<subject>(/[A-Za-z0-9_]+)+|root attribute '[a-z_]+'|format_version|"
    r"HDF5 global heap|not a readable HDF5 file|its datasets need|is a partial file)")


def refusal_subject(line: str) -> str | None:
    """The dataset (or other part of the file) a refusal's line names first; None when it
    names none (an unclear error)."""
    match = REFUSAL_SUBJECT.match(line)
    if not match:
        return None
    subject = match["subject"]
    return subject.split(" row ")[0]


# ------------------------------------------------------------------ command line

def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("pixelrefine", "hypothesis", "h5py", "hdf5plugin",
                                             "numpy", "click")} | {
        "hdf5": h5py.version.hdf5_version, "python": platform.python_version()}


def save_cases(path: str, cases: list[dict]) -> None:
    """Write drawn cases as gzipped JSON lines (hypothesis reproduces a draw from its seed
    only "somewhat": a run is repeated exactly from the cases themselves)."""
    import gzip

    with gzip.open(path + ".writing", "wt", encoding="utf-8") as handle:
        for case in cases:
            handle.write(json.dumps(case, sort_keys=True) + "\n")
    os.replace(path + ".writing", path)


def load_cases(path: str) -> list[dict]:
    """Cases written by ``save_cases``."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def cases_digest(cases: list[dict]) -> str:
    """SHA-256 of the drawn cases (canonical JSON): a reproduction compares it to know it drew
    the same cases (the draws depend on the seed, the number of cases and hypothesis)."""
    return hashlib.sha256(json.dumps(cases, sort_keys=True).encode()).hexdigest()


def _long_run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.cases_from:
        cases = load_cases(args.cases_from)
    else:
        cases = generate_cases(args.cases, args.seed, default_fraction=args.default_fraction,
                               process_fraction=args.process_fraction)
    if args.save_cases:
        save_cases(args.save_cases, cases)
    generated = time.perf_counter() - start
    directory = args.workdir or tempfile.mkdtemp(prefix="pixelrefine-fuzz-")
    last = [0.0]

    drawn = (f"--cases-from {args.cases_from}" if args.cases_from else
             f"--cases {args.cases} --seed {args.seed} --default-fraction {args.default_fraction:g} "
             f"--process-fraction {args.process_fraction:g}"
             + (f" --save-cases {args.save_cases}" if args.save_cases else ""))
    command = (f"python -m pixelrefine.fuzz {drawn} --workers {args.workers} "
               f"--timeout {args.timeout:g} --out {args.out}")

    def write_report(records: list[dict], complete: bool) -> dict:
        done = {r["id"] for r in records}
        summary = summarize([c for c in cases if c["id"] in done], records)
        report = {"command": command, "seed": args.seed, "complete": complete,
                  "cases_planned": len(cases), "cases_sha256": cases_digest(cases),
                  "seconds": round(time.perf_counter() - start, 1),
                  "generation_seconds": round(generated, 1), "outcomes": OUTCOMES, **summary,
                  "versions": _versions(),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}
        if args.out:  # written whole, then renamed: an interrupted run leaves its last counts
            with open(args.out + ".writing", "w") as handle:
                json.dump(report, handle, indent=1, sort_keys=False)
                handle.write("\n")
            os.replace(args.out + ".writing", args.out)
        return summary

    def progress(records: list[dict]) -> None:
        if time.monotonic() - last[0] > 30 or len(records) == len(cases):
            last[0] = time.monotonic()
            bad = sum(r["outcome"] in BUGS for r in records)
            print(f"fuzz: {len(records)}/{len(cases)} cases, {bad} bugs, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if len(records) < len(cases):
                write_report(records, complete=False)

    records = run_cases(cases, directory, workers=args.workers, timeout=args.timeout,
                        progress=progress)
    summary = write_report(records, complete=True)
    print(json.dumps({"counts": summary["counts"], "bugs": summary["bugs"]}))
    if not args.workdir:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if summary["bugs"] else 0


def _replay(args: argparse.Namespace) -> int:
    with open(args.report) as handle:
        report = json.load(handle)
    cases = {c["case"]["id"]: c["case"] for c in report.get("bug_cases", [])}
    case = cases.get(args.id)
    if case is None:  # the run's own cases (saved), or drawn again as the run drew them
        run = _parser().parse_args(report["command"].split()[3:])
        saved = run.cases_from or run.save_cases
        cases = (load_cases(saved) if saved and os.path.exists(saved) else
                 generate_cases(run.cases, run.seed, default_fraction=run.default_fraction,
                                process_fraction=run.process_fraction))
        if not 0 <= args.id < len(cases):
            raise SystemExit(f"case {args.id} is not one of the run's {len(cases)}")
        case = cases[args.id]
    bases = make_bases(os.path.join(tempfile.gettempdir(), "pixelrefine-fuzz-bases"))
    skipped = materialize(case, bases, args.path)
    print(json.dumps(case))
    if skipped:
        print("skipped:", skipped)
    print("pixelrefine " + " ".join(refine_arguments(case, args.path, args.path + ".out.h5")))
    return 0


def _parser() -> argparse.ArgumentParser:
    """The long run's command line."""
    parser = argparse.ArgumentParser(prog="python -m pixelrefine.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--default-fraction", type=float, default=0.05,
                        help="share of cases refined with the default settings (the rest fast)")
    parser.add_argument("--process-fraction", type=float, default=0.01,
                        help="share of cases run as the command in a process of its own")
    parser.add_argument("--save-cases", default=None,
                        help="write the drawn cases here (gzipped JSON lines)")
    parser.add_argument("--cases-from", default=None,
                        help="run the cases of this file (from --save-cases) instead of drawing")
    parser.add_argument("--out", default=None, help="JSON file for the counts and the bugs")
    parser.add_argument("--workdir", default=None, help="keep the work files here")
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m pixelrefine.fuzz``: the long run, ``replay`` or (internal) ``worker``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker(argv[1], argv[2])
        return 0
    if argv[:1] == ["replay"]:
        parser = argparse.ArgumentParser(prog="python -m pixelrefine.fuzz replay")
        parser.add_argument("report")
        parser.add_argument("id", type=int)
        parser.add_argument("path")
        return _replay(parser.parse_args(argv[1:]))
    return _long_run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
