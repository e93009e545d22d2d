"""attnmem: see, remove and compare the memory bottleneck of softmax attention."""

from . import distributed, masks, mechanisms, nn, scores  # noqa: F401  (importing mechanisms registers every method)
from .api import attention, validate
from .kernels import merge
from .memory.estimate import Estimate, estimate
from .memory.measure import Measurement, measure
from .memory.plan import ModelConfig, plan
from .registry import MethodInfo, methods
from .version import __version__

__all__ = [
    "attention", "validate", "methods", "MethodInfo", "masks", "nn", "measure", "Measurement",
    "estimate", "Estimate", "plan", "ModelConfig", "merge", "scores",
    "__version__",
]
