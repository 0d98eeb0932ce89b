"""Let plain ``lm_eval --model retrofit`` find retrofit's adapter (lm-eval has no plugin discovery).

Loaded at interpreter start through a .pth file that `make setup` writes (``python -m
retrofit.eval.install_hook``). It imports only the standard library: when, and only when, a program imports
``lm_eval.api.registry``, it registers ``retrofit`` as a lazy entry pointing at retrofit.eval.adapter, after
lm-eval's own models, so nothing heavy is imported for any other program.

Why a start-up hook and not an entry point: lm-eval 0.4.13 resolves ``--model`` only through
``lm_eval.api.registry.get_model()``, which looks the name up in ``model_registry``, filled only from
``lm_eval.models.MODEL_MAPPING`` and by ``register_model`` calls in code already imported; nothing in
lm-eval calls ``importlib.metadata.entry_points()`` (no ``lm_eval.models``/plugins group), and no environment
variable or CLI option imports a third-party module (``--include_path`` is for task YAMLs only), so the name
can only be registered by code already running in the ``lm_eval`` process.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "lm_eval.api.registry"


class _RegisterRetrofit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot: find the real module without coming back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import lm_eval.models  # noqa: F401  (lm-eval's own lazy entries first, as get_model expects)

            if "retrofit" not in module.model_registry:
                module.model_registry.register("retrofit", target="retrofit.eval.adapter:RetrofitLM")

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterRetrofit) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterRetrofit())
