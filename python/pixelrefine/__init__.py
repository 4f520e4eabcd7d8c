"""pixelrefine: per-reflection refinement of serial-crystallography still images.

``read_shoeboxes`` → ``ShoeboxSet`` → ``refine`` → ``Results`` → ``write_results``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("pixelrefine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

from .shoeboxes import Detector, Images, Pixels, Reflections, ShoeboxSet  # noqa: E402
from .refine import FLAGS, STATUS, Results, evaluate_image, refine  # noqa: E402
from .io import read_results, read_shoeboxes, write_results, write_shoeboxes  # noqa: E402
from .simulate import simulate  # noqa: E402

__all__ = [
    "Detector", "Images", "Pixels", "Reflections", "ShoeboxSet", "Results", "refine",
    "evaluate_image", "read_shoeboxes", "write_shoeboxes", "read_results", "write_results",
    "simulate", "STATUS", "FLAGS", "__version__",
]
