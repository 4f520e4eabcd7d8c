"""A writer of DIALS's integrated files, for the tests: a pixelrefine simulation as a
dxtbx experiment list (.expt, JSON) and a reflection table with shoeboxes (.refl, msgpack),
to the documented layout (``reflection_table_msgpack_adapter.h``, dxtbx's ``to_dict``), written
with the msgpack package — independent of ``pixelrefine.dials``'s own reader.

The geometry goes from conventions.md's frame to DIALS's by the inverse of the importer's R
(for the beam direction d, R·(−d) = +z), so a round trip must give the same numbers back.
"""

from __future__ import annotations

import json
import struct
import uuid

import msgpack
import numpy as np

from pixelrefine.dials import (MASK_BACKGROUND, MASK_FOREGROUND, MASK_OVERLAPPED, MASK_VALID,
                               attenuation_length, dials_to_lab_rotation)
from pixelrefine.simulate import predict

TYPES = {"bool": "u1", "int": "<i4", "std::size_t": "<u8", "double": "<f8",
         "vec3<double>": "<f8", "int6": "<i4", "cctbx::miller::index<>": "<i4"}


def _column(type_name: str, values: np.ndarray):
    values = np.ascontiguousarray(values, dtype=TYPES[type_name])
    return [type_name, [int(len(values)), values.tobytes()]]


def _orthonormal_frame(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q[:, 0], q[:, 1]


def detector_dict(detector, R_dials, *, hierarchy: bool, parallax=None, gain: float = 1.0,
                  seed: int = 0) -> dict:
    """dxtbx's detector dict; with ``hierarchy``, panels under two nested groups whose frames
    are arbitrary (the panels' frames are then local, as dxtbx writes them)."""
    rng = np.random.default_rng(seed)
    origin = detector.origin @ R_dials.T
    fast = detector.fast_axis @ R_dials.T
    slow = detector.slow_axis @ R_dials.T
    strategy = {"type": "ParallaxCorrectedPxMmStrategy"} if parallax else {"type": "SimplePxMmStrategy"}
    mu, thickness = parallax if parallax else (0.0, 0.0)

    def panel(k, f, s, o):
        return {"name": f"panel {k}", "type": "SENSOR_PAD", "fast_axis": list(f), "slow_axis": list(s),
                "origin": list(o), "raw_image_offset": [0, 0],
                "image_size": [int(v) for v in detector.size[k]],
                "pixel_size": [float(detector.pixel_size[k])] * 2, "trusted_range": [-10.0, 65535.0],
                "thickness": thickness, "material": "Si", "mu": mu, "identifier": "", "mask": [],
                "gain": gain, "pedestal": 0.0, "px_mm_strategy": strategy}

    n = len(origin)
    if not hierarchy:
        return {"panels": [panel(k, fast[k], slow[k], origin[k]) for k in range(n)]}

    def local(vector, frame_fast, frame_slow, is_point, frame_origin):
        normal = np.cross(frame_fast, frame_slow)
        v = vector - frame_origin if is_point else vector
        return [float(v @ frame_fast), float(v @ frame_slow), float(v @ normal)]

    root_f, root_s = _orthonormal_frame(rng)
    root_o = rng.normal(size=3) * 10
    group_f, group_s = _orthonormal_frame(rng)   # the group's global frame
    group_o = rng.normal(size=3) * 5
    panels = [panel(k, local(fast[k], group_f, group_s, False, 0),
                    local(slow[k], group_f, group_s, False, 0),
                    local(origin[k], group_f, group_s, True, group_o)) for k in range(n)]
    group = {"name": "quadrant", "type": "", "children": [{"panel": k} for k in range(n)],
             "fast_axis": local(group_f, root_f, root_s, False, 0),
             "slow_axis": local(group_s, root_f, root_s, False, 0),
             "origin": local(group_o, root_f, root_s, True, root_o)}
    root = {"name": "detector", "type": "", "fast_axis": list(root_f), "slow_axis": list(root_s),
            "origin": list(root_o), "children": [group]}
    return {"panels": panels, "hierarchy": root}


def write_dials(shoeboxes, expt_path, refl_path, *, images=None, gain: float = 1.0,
                hierarchy: bool = False, parallax=None, direction=(0.0, 0.0, 1.0),
                hall_symbol: str = " P 1", neighbour_fraction: float = 0.1,
                shoebox_version: int = 2, extra_rows: bool = True, with_shoeboxes: bool = True,
                seed: int = 0) -> dict:
    """Write ``images`` of ``shoeboxes`` as one DIALS .expt/.refl pair.

    Returns
    -------
    dict
        What the importer must give back: ``rows`` (the set's reflection rows written, in
        the table's row order), ``table_image`` (each row's position in ``images``), ``mask``
        (the expected pixelrefine mask of each row's pixels, a list), ``xyzcal_px`` (DIALS's xyzcal.px, parallax included), ``xyzcal_plane``
        (the ray's panel intersection, px).
    """
    rng = np.random.default_rng(seed)
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    R_import = dials_to_lab_rotation(direction)
    R_dials = R_import.T
    det, im, refl, pix = shoeboxes.detector, shoeboxes.images, shoeboxes.reflections, shoeboxes.pixels
    images = list(range(shoeboxes.n_images)) if images is None else list(images)
    identifiers = [str(uuid.UUID(int=int(rng.integers(0, 2**62)))) for _ in images]

    experiments, beams, crystals = [], [], []
    for j, i in enumerate(images):
        f = im.polarization_fraction[i]
        beams.append({"__id__": "monochromatic", "direction": list(direction),
                      "wavelength": float(im.wavelength[i]), "divergence": 0.0,
                      "sigma_divergence": 0.0, "polarization_normal": list(R_dials @ [0.0, 1.0, 0.0]),
                      "polarization_fraction": float(f), "flux": 0.0, "transmission": 1.0,
                      "probe": "x-ray", "sample_to_source_distance": 0.0})
        A_dials = R_dials @ im.A_matrix[i]
        real = np.linalg.inv(A_dials)  # rows a, b, c
        crystals.append({"__id__": "crystal", "real_space_a": list(real[0]),
                         "real_space_b": list(real[1]), "real_space_c": list(real[2]),
                         "space_group_hall_symbol": hall_symbol})
        experiments.append({"__id__": "Experiment", "identifier": identifiers[j], "beam": j,
                            "detector": 0, "crystal": j, "imageset": 0})
    doc = {"__id__": "ExperimentList", "experiment": experiments,
           "imageset": [{"__id__": "ImageSet", "images": []}], "beam": beams,
           "detector": [detector_dict(det, R_dials, hierarchy=hierarchy, parallax=parallax,
                                      gain=gain, seed=seed)],
           "goniometer": [], "scan": [], "crystal": crystals, "profile": [], "scaling_model": []}
    with open(expt_path, "w") as handle:
        json.dump(doc, handle, indent=1)

    rows = np.concatenate([np.flatnonzero(refl.image_id == i) for i in images]).astype(int)
    order = rng.permutation(len(rows))  # DIALS's tables are not sorted by experiment
    rows = rows[order]
    table_id = np.array([images.index(refl.image_id[r]) for r in rows])
    normals = np.cross(det.fast_axis, det.slow_axis)
    truth_xy = shoeboxes.truth["reflections"]["xyzcal"][rows]
    plane_xy = truth_xy.copy()
    px_xy = plane_xy.copy()
    s1 = np.zeros((len(rows), 3))
    for n, r in enumerate(rows):
        i, k = refl.image_id[r], refl.panel[r]
        pred = predict(im.A_matrix[i], refl.miller_index[r][None], im.wavelength[i],
                       im.polarization_fraction[i])
        s_hat = pred.s_hat[0]
        s1[n] = R_dials @ (s_hat / im.wavelength[i])
        if parallax:
            normal = normals[k] / np.linalg.norm(normals[k])
            cos = s_hat @ normal
            depth = attenuation_length(parallax[0], parallax[1], cos)
            px_xy[n] += depth * np.array([s_hat @ det.fast_axis[k], s_hat @ det.slow_axis[k]]) \
                / det.pixel_size[k]
    blob = bytearray()
    expected_mask = []
    bbox6 = np.zeros((len(rows), 6), np.int64)
    for n, r in enumerate(rows):
        x0, x1, y0, y1 = (int(v) for v in refl.bbox[r])
        k = refl.panel[r]
        nx, ny = det.size[k]
        # Boxes against a panel edge reach past it, as DIALS's do (those pixels not valid).
        px0, px1 = x0 - (2 if x0 == 0 else 0), x1 + (2 if x1 == nx else 0)
        py0, py1 = y0 - (2 if y0 == 0 else 0), y1 + (2 if y1 == ny else 0)
        h, w = py1 - py0, px1 - px0
        start, size = refl.pixel_offset[r], (x1 - x0) * (y1 - y0)
        counts = pix.counts[start:start + size].reshape(y1 - y0, x1 - x0)
        ok = pix.mask[start:start + size].reshape(y1 - y0, x1 - x0).astype(bool)
        data = np.zeros((h, w), np.float32)
        mask = np.zeros((h, w), np.int64)
        inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
        data[inner] = counts * gain
        yy, xx = np.mgrid[y0:y1, x0:x1]
        cx, cy = truth_xy[n]
        foreground = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= 2.0 ** 2
        code = np.where(ok, MASK_VALID, 0) | np.where(foreground, MASK_FOREGROUND, MASK_BACKGROUND)
        neighbour = (rng.random(ok.shape) < neighbour_fraction) & ~foreground
        code = code | np.where(neighbour, MASK_OVERLAPPED, 0)
        # an overlapped pixel inside this reflection's own foreground stays valid
        shared = foreground & (rng.random(ok.shape) < neighbour_fraction)
        code = code | np.where(shared, MASK_OVERLAPPED, 0)
        mask[inner] = code
        expected_mask.append((ok & ~neighbour).astype(np.uint8).reshape(-1))
        background = np.full((h, w), 0.5, np.float32)
        bbox6[n] = (px0, px1, py0, py1, 0, 1)
        blob += struct.pack("<I6iB", int(k), px0, px1, py0, py1, 0, 1, shoebox_version)
        blob += data.astype("<f4").tobytes()
        blob += mask.astype("u1" if shoebox_version == 2 else "<i4").tobytes()
        blob += background.astype("<f4").tobytes()
    n_rows = len(rows)
    hkl = refl.miller_index[rows]
    ids = table_id
    panel = refl.panel[rows].astype(np.uint64)
    flags = np.full(n_rows, (1 << 0) | (1 << 8), np.uint64)
    xyz_px = np.column_stack([px_xy, np.full(n_rows, 0.5)])
    pixel = det.pixel_size[refl.panel[rows]]
    xyz_mm = np.column_stack([plane_xy * pixel[:, None], np.zeros(n_rows)])
    if extra_rows:  # an unindexed strong spot and a predicted row without shoebox data
        blob += struct.pack("<I6iB", 0, 10, 13, 10, 13, 0, 1, shoebox_version)
        blob += np.ones(9, "<f4").tobytes() + np.full(9, MASK_VALID, "u1" if shoebox_version == 2
                                                      else "<i4").tobytes() + np.zeros(9, "<f4").tobytes()
        blob += struct.pack("<I6iB", 0, 20, 23, 20, 23, 0, 1, 0)
        hkl = np.vstack([hkl, [[0, 0, 0], [1, 2, 3]]])
        ids = np.concatenate([ids, [-1, 0]])
        panel = np.concatenate([panel, [0, 0]]).astype(np.uint64)
        flags = np.concatenate([flags, [1 << 5, 1]]).astype(np.uint64)
        xyz_px = np.vstack([xyz_px, [[11.5, 11.5, 0.5], [21.5, 21.5, 0.5]]])
        xyz_mm = np.vstack([xyz_mm, [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]])
        s1 = np.vstack([s1, [[0, 0.1, -0.7], [0, 0.2, -0.7]]])
        bbox6 = np.vstack([bbox6, [[10, 13, 10, 13, 0, 1], [20, 23, 20, 23, 0, 1]]])
        n_rows += 2
    data = {
        "miller_index": _column("cctbx::miller::index<>", hkl),
        "id": _column("int", ids),
        "panel": _column("std::size_t", panel),
        "flags": _column("std::size_t", flags),
        "bbox": _column("int6", bbox6),
        "xyzcal.px": _column("vec3<double>", xyz_px),
        "xyzcal.mm": _column("vec3<double>", xyz_mm),
        "s1": _column("vec3<double>", s1),
        "entering": _column("bool", np.zeros(n_rows)),
        "intensity.sum.value": _column("double", np.ones(n_rows)),
        "intensity.sum.variance": _column("double", np.ones(n_rows)),
    }
    if with_shoeboxes:
        data["shoebox"] = ["Shoebox<>", [n_rows, bytes(blob)]]
    table = ["dials::af::reflection_table", 2,
             {"identifiers": {j: identifiers[j] for j in range(len(images))}, "nrows": n_rows,
              "data": data}]
    with open(refl_path, "wb") as handle:
        handle.write(msgpack.packb(table, use_bin_type=True))
    return {"rows": rows, "table_image": table_id, "mask": expected_mask, "xyzcal_px": px_xy,
            "xyzcal_plane": plane_xy, "images": images}


def imported_order(info: dict) -> tuple[np.ndarray, list]:
    """The set's rows in the order the importer writes them (experiment by experiment, each in
    table order) and their expected masks."""
    order = np.concatenate([np.flatnonzero(info["table_image"] == j)
                            for j in range(len(info["images"]))]).astype(int)
    return info["rows"][order], [info["mask"][n] for n in order]
