"""actsparse: activation sparsity for faster LLM inference.

The path from text to tokens, in order::

    model, tok = load_model("smollm2-135m")                       # models.py
    calib = calibrate(model, tok, read_text("wiki_calib"))          # calibrate.py (+ allocate.py)
    sparsify_(model, TealConfig(sparsity=0.5, calibration=calib))   # sparsify.py (+ thresholds.py)
    evaluate(model, tok, read_text("wiki_eval"), {...})             # evaluate.py
    generate(...)                                                   # engine/ (GPU) or HF generate (CPU)
"""

__version__ = "0.1.0"

from .calibrate import Calibration, CalibrationConfig, calibrate  # noqa: E402
from .errors import ActsparseError  # noqa: E402
from .evaluate import evaluate, perplexity  # noqa: E402
from .gated import CatsConfig  # noqa: E402  (also registers the CATS transform with sparsify_)
from .io import read_text  # noqa: E402
from .models import SUPPORTED_ARCHITECTURES, fetch_default, input_sites, load_model  # noqa: E402
from .rotate import RotationConfig, rotate_  # noqa: E402
from .sparsify import SparseLinear, TealConfig, sparsify_, track_sparsity  # noqa: E402
from .thresholds import ThresholdSet, compute_thresholds, load_thresholds, save_thresholds  # noqa: E402

__all__ = [
    "ActsparseError", "Calibration", "CalibrationConfig", "CatsConfig", "RotationConfig", "rotate_", "SUPPORTED_ARCHITECTURES", "SparseLinear",
    "TealConfig", "ThresholdSet", "calibrate", "compute_thresholds", "evaluate", "fetch_default",
    "input_sites", "load_model", "load_thresholds", "perplexity", "read_text", "save_thresholds",
    "sparsify_", "track_sparsity",
]
