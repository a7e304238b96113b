"""pyramid_kv: KV-cache compression for LLM inference (PyramidInfer and cross-layer sharing).

The kernels are torch custom ops under ``torch.ops.pyramid_kv``; :mod:`pyramid_kv.ops` holds
typed, validating wrappers and :mod:`pyramid_kv.reference` plain-PyTorch versions of each.
"""

__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as e:  # pragma: no cover - only without a built extension
    raise ImportError(
        f"pyramid_kv's compiled extension could not be loaded ({e}); install the package with "
        "`pip install --no-build-isolation .` against the torch you run with") from e

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from .ops import (Selection, compact, compact_, ensemble_scores, merged_attention,  # noqa: E402
                  select_top_k, select_top_p)
from .config import PRESETS, PyramidConfig, preset  # noqa: E402
from .generate import GenerationOutput, generate  # noqa: E402
from .runner import Runner  # noqa: E402
from .sharing import SharingPlan, calibrate_kvsharer  # noqa: E402

__all__ = [
    "__version__",
    "GenerationOutput",
    "PRESETS",
    "PyramidConfig",
    "Runner",
    "Selection",
    "SharingPlan",
    "compact",
    "compact_",
    "ensemble_scores",
    "calibrate_kvsharer",
    "generate",
    "merged_attention",
    "preset",
    "select_top_k",
    "select_top_p",
]
