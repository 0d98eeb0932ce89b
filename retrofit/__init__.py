"""retrofit: swap token-choice routers of diffusion-LM MoE checkpoints for expert-choice or block routing.

Importing the package registers its model types with ``transformers.AutoConfig``/``AutoModel``.
"""

from retrofit.errors import RetrofitError
from retrofit.io.load import load_model
from retrofit.models import LLaDAMoEConfig, LLaDAMoEModelLM
from retrofit.routers import RouterSettings

__version__ = "0.1.0"
__all__ = ["LLaDAMoEConfig", "LLaDAMoEModelLM", "RetrofitError", "RouterSettings", "__version__", "load_model"]
