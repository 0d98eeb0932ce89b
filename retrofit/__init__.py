"""retrofit: swap token-choice routers of diffusion-LM MoE checkpoints for expert-choice or block routing.

Importing the package registers its model families (``retrofit.models``) with ``transformers.AutoConfig`` and
``AutoModel``, and its routers (``retrofit.routers``).
"""

from retrofit.errors import RetrofitError
from retrofit.io.load import load_model
from retrofit.models import FAMILIES, LLaDAMoEConfig, LLaDAMoEModelLM, ModelFamily, register_family
from retrofit.routers import ROUTERS, RouterSettings, register_router, router_settings, swap_routers

__version__ = "0.1.0"
__all__ = ["FAMILIES", "ROUTERS", "LLaDAMoEConfig", "LLaDAMoEModelLM", "ModelFamily", "RetrofitError",
           "RouterSettings", "__version__", "load_model", "register_family", "register_router", "router_settings",
           "swap_routers"]
