"""tsvd — LLM training with weights stored as truncated-SVD factors ``W = U diag(s) Vᵀ``."""

from tsvd.convert import spectralize
from tsvd.errors import UserError
from tsvd.retraction import Retractor, attach_retraction, retract_
from tsvd.spectral import SpectralEmbedding, SpectralLinear, SpectralModule

__all__ = [
    "SpectralEmbedding",
    "SpectralLinear",
    "SpectralModule",
    "Retractor",
    "UserError",
    "attach_retraction",
    "retract_",
    "spectralize",
]
__version__ = "0.1.0"
