"""ziplm-planner: latency-aware structured compression of transformer language models.

After ZipLM (Kurtic, Frantar, Alistarh, NeurIPS 2023): profile the deployment machine,
remove the structures with the worst loss-to-runtime trade-off using second-order (OBS)
estimates and weight updates, and output a family of smaller models, one per speedup target.
"""

from .api import compress, profile
from .export import load_pruned
from .models import load_model
from .spec import InferenceSpec
from .table import LatencyTable

__all__ = ["InferenceSpec", "LatencyTable", "compress", "load_model", "load_pruned", "profile"]
__version__ = "0.1.0"
