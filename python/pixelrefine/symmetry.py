"""Space groups, the reciprocal asymmetric unit and systematic absences, through gemmi.

Merging, export and the import of references share these: Miller indices are mapped into
gemmi's (CCP4's) reciprocal ASU of the space group's Laue class, with M/ISYM as MTZ writes it
(odd: h' = R h, even: the Friedel mate, h' = −R h; ISYM = 2·op + 1 or 2·op + 2).
"""

from __future__ import annotations

import numpy as np

import gemmi

__all__ = ["space_group_from_symbol", "space_group_from_hall", "to_asu", "systematic_absences",
           "crystfel_point_group", "space_group_of"]


def space_group_from_symbol(symbol: str) -> gemmi.SpaceGroup:
    """A gemmi space group from a Hermann–Mauguin symbol, a number or a Hall symbol.

    Raises
    ------
    ValueError
        Naming the symbol when gemmi does not know it.
    """
    text = str(symbol).strip()
    try:
        if text.isdigit():
            sg = gemmi.find_spacegroup_by_number(int(text))
        else:
            sg = gemmi.find_spacegroup_by_name(text)
    except (ValueError, RuntimeError):
        sg = None
    if sg is None:
        try:
            sg = space_group_from_hall(text)
        except ValueError:
            sg = None
    if sg is None:
        raise ValueError(f"space group {symbol!r} is not a symbol gemmi knows "
                         "(e.g. 'P 43 21 2', 'P43212', 'C 1 2 1' or a number 1-230)")
    return sg


def space_group_from_hall(hall: str) -> gemmi.SpaceGroup:
    """The space group of a Hall symbol (as DIALS's ``space_group_hall_symbol``)."""
    try:
        sg = gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(str(hall)))
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"Hall symbol {hall!r} is not understood: {error}") from None
    if sg is None:
        raise ValueError(f"Hall symbol {hall!r} is not one of the 230 space groups' settings "
                         "gemmi tabulates")
    return sg


def space_group_of(name: str | gemmi.SpaceGroup | None, *, what: str = "") -> gemmi.SpaceGroup:
    """``name`` as a gemmi space group; None raises with what to pass."""
    if isinstance(name, gemmi.SpaceGroup):
        return name
    if not name:
        raise ValueError(f"{what}no space group is known: the shoebox file has no 'space_group' "
                         "attribute; pass --space-group")
    return space_group_from_symbol(name)


def to_asu(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> tuple[np.ndarray, np.ndarray]:
    """Miller indices [M, 3] in the reciprocal ASU of ``space_group`` and their M/ISYM.

    gemmi's ``ReciprocalAsu.to_asu`` is applied once per distinct index.
    """
    hkl = np.asarray(hkl, np.int32).reshape(-1, 3)
    if len(hkl) == 0:
        return hkl.copy(), np.zeros(0, np.int32)
    unique, inverse = np.unique(hkl, axis=0, return_inverse=True)
    asu = gemmi.ReciprocalAsu(space_group)
    ops = space_group.operations()
    mapped = np.empty_like(unique)
    isym = np.empty(len(unique), np.int32)
    for i, h in enumerate(unique.tolist()):
        mapped[i], isym[i] = asu.to_asu(h, ops)
    inverse = inverse.reshape(-1)
    return mapped[inverse], isym[inverse]


def systematic_absences(hkl: np.ndarray, space_group: gemmi.SpaceGroup) -> np.ndarray:
    """True where h is systematically absent in ``space_group`` [M]."""
    hkl = np.asarray(hkl, np.int32).reshape(-1, 3)
    if len(hkl) == 0:
        return np.zeros(0, bool)
    unique, inverse = np.unique(hkl, axis=0, return_inverse=True)
    ops = space_group.operations()
    absent = np.array([ops.is_systematically_absent(h) for h in unique.tolist()], bool)
    return absent[inverse.reshape(-1)]


def crystfel_point_group(space_group: gemmi.SpaceGroup) -> str:
    """CrystFEL's name of the Laue class the merge used (``Symmetry:`` of a .hkl file):
    monoclinic with its unique axis (``2/m_uab``), trigonal with its axes (``-3_H``,
    ``-3m1_H``, ``-31m_H``, ``-3_R``, ``-3m_R``)."""
    laue = space_group.laue_str()
    if laue == "2/m":
        axis = (space_group.qualifier or "b")[0]
        return f"2/m_ua{axis if axis in 'abc' else 'b'}"
    if laue == "-3":
        return "-3_R" if space_group.ext == "R" else "-3_H"
    if laue == "-3m":
        if space_group.ext == "R":
            return "-3m_R"
        tokens = space_group.hm.split()  # "P 3 2 1", "P 3 m 1" or "P 3 1 2", "P -3 1 m"
        return "-31m_H" if len(tokens) == 4 and tokens[2] == "1" else "-3m1_H"
    return laue
