"""The one interface between retrofit and a model family, and the registry of families.

Everything outside ``retrofit/models/`` (convert, verify, loading, training, evaluation, create-tiny, the
benches) reaches a model only through :class:`ModelFamily` and the methods every native model class offers
(:class:`NativeModel`). A family provides:

- ``recognises(raw)``: whether a checkpoint's config.json (``model_type``/``architectures`` and fields) is one
  of its models, and ``config_from_checkpoint(raw)`` to build its config, refusing what it does not implement;
- ``config_class``/``model_class``: its configuration and native masked-diffusion LM (no remote code);
- ``moe_layers(config)`` and ``router_tensor_name(layer)``: which layers route, and the Hub names of their
  router tensors;
- ``scoring(config)``: the checkpoint's own :class:`~retrofit.routers.Scoring` (softmax; or sigmoid with an
  expert bias, group-limited top-k, renormalisation and a scaling factor), which every router scores with;
- ``token_choice(config)``: the settings of its own token-choice router (the distillation teacher);
- ``hub_config(config)``: the config.json its Hub snapshots carry (tiny snapshots are written with it), and
  ``converted_config(raw, ...)``: the config.json of a converted model (retrofit's own ``model_type``);
- ``hub_models``: short names for ``--src``/``--model`` and their Hub ids, and ``hub_routers``: the router settings
  a named checkpoint was trained with when its config.json does not say (dMoE-16B's block router);
- ``tiny_dims(...)``: its config fields for a tiny model of a generic shape (``create-tiny``, tests);
- ``sampler``: the name of the denoising sampler its models generate with (``retrofit.eval.samplers``), and
  ``training_block``: the block of the block-diffusion layout it is trained with (None: plain masked diffusion).

Adding a family is one module defining a subclass and one ``register_family`` line (``models/__init__.py``);
``tests/test_family_seam.py`` proves it with a toy family defined in the test suite.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from retrofit.errors import RetrofitError, warn
from retrofit.routers import SOFTMAX, RouterSettings, Scoring, TokenChoiceSettings


# config.json fields every family reads as sizes or counts: each must be a whole number of at least 1 when present.
COUNT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_experts", "num_experts_per_tok", "max_position_embeddings")

# Keys of a config.json that describe the file rather than the model.
# "sampler": retrofit's record of the sampler a converted checkpoint generates with (:meth:`ModelFamily.sampler_for`).
META_FIELDS = {"architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
               "_name_or_path", "sampler"}


class NativeModel(Protocol):
    """What a family's model class offers besides transformers' ``PreTrainedModel`` API."""

    config: Any

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, logits_to_keep=None, maskable=None,
                block_start: int = 0):
        """Masked-diffusion logits; ``mask_ratio``/``maskable``/``block_start`` feed the routing context."""

    def moe_blocks(self) -> list:
        """The routed layers' MoE blocks (``retrofit.models.moe.SparseMoeBlock``), in layer order."""

    def enable_routing_stats(self, enabled: bool = True, block_length: int = 32, mask_ratios=None) -> None: ...

    def routing_stats(self): ...

    def routing_stats_paused(self):
        """A context in which forwards record no routing statistics."""

    def streamed_parts(self):
        """How ``retrofit.verify`` runs the model one layer at a time from its checkpoint."""

    def enable_activation_checkpointing(self, enabled: bool = True) -> None: ...


class ModelFamily:
    name: ClassVar[str] = ""  # short name, e.g. "llada-moe"
    display_name: ClassVar[str] = ""  # for messages and model cards, e.g. "LLaDA-MoE"
    model_type: ClassVar[str] = ""  # retrofit's own model_type, written into converted config.json
    architecture: ClassVar[str] = ""  # architectures[0] of a converted config.json
    config_class: ClassVar[type] = object
    model_class: ClassVar[type] = object
    hub_models: ClassVar[dict[str, str]] = {}  # --src short name -> Hub id
    sampler: ClassVar[str] = "llada"  # the denoising sampler evaluation generates with (retrofit.eval.samplers)
    alternative_samplers: ClassVar[tuple[str, ...]] = ()  # others its checkpoints may generate with (--sampler)
    hub_samplers: ClassVar[dict[str, str]] = {}  # --src/--model short name -> the sampler its line publishes
    hub_routers: ClassVar[dict[str, dict]] = {}  # --model short name -> the router its checkpoint was trained with
    training_block: ClassVar[int | None] = None  # block-diffusion training layout (retrofit.diffusion), or None
    # The family's own config.json size and count fields besides COUNT_FIELDS, and those of them that may be 0.
    count_fields: ClassVar[tuple[str, ...]] = ()
    zero_allowed: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ recognising and building configs

    def recognises(self, raw: dict) -> bool:
        return raw.get("model_type") == self.model_type

    def chat_template(self) -> str | None:
        """The chat template of the family's Instruct checkpoints (``chat_templates/<name>.jinja``, each citing the
        tokenizer files it was written from), which ``create-tiny`` writes so that tests can run it; None for a
        family without one."""
        from pathlib import Path

        path = Path(__file__).parent / "chat_templates" / f"{self.name}.jinja"
        return path.read_text() if path.is_file() else None

    def config_from_checkpoint(self, raw: dict):
        """The config of a checkpoint's raw config.json: settings the family names as unsupported are refused
        (:meth:`refuse`), any other key its config class does not know is kept and named once."""
        unknown = sorted(set(raw) - self.known_config_fields())
        self.check_counts(raw)
        self.refuse(raw, unknown)
        if unknown:
            warn(f"config.json has field(s) retrofit's {self.display_name} does not use: {', '.join(unknown)}; "
                 "kept as they are")
        fields = {k: v for k, v in raw.items() if k not in META_FIELDS}
        try:
            config = self.config_class(**fields)
        except (TypeError, ValueError) as exc:
            raise RetrofitError(f"invalid config.json: {exc}".splitlines()[0]) from None
        if config.num_experts_per_tok > config.num_experts:
            raise RetrofitError(f"invalid config.json: num_experts_per_tok is {config.num_experts_per_tok} but there "
                                f"are only {config.num_experts} experts; a token picks at most num_experts of them")
        return config

    def check_counts(self, raw: dict) -> None:
        """Every size or count field present in ``raw`` is a whole number in range, or one line names it."""
        for name in (*COUNT_FIELDS, *self.count_fields):
            value, least = raw.get(name), 0 if name in self.zero_allowed else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise RetrofitError(f"invalid config.json: {name} is {value!r}; it must be a whole number of at "
                                    f"least {least}")

    def refuse(self, raw: dict, unknown: list[str]) -> None:
        """Raise for fields of ``raw`` that change the computation in ways this family does not implement."""

    def known_config_fields(self) -> set[str]:
        """Every keyword the config class (and its bases) takes, transformers' own fields, and metadata keys."""
        import inspect

        from transformers import PretrainedConfig

        params = {name for cls in self.config_class.__mro__ if "__init__" in vars(cls)
                  for name in inspect.signature(cls.__init__).parameters} - {"self", "kwargs"}
        return params | set(PretrainedConfig().to_dict()) | META_FIELDS

    def sampler_for(self, chosen: str | None, recorded: str | None, origin: str) -> str:
        """The sampler a checkpoint generates with: the user's ``--sampler``, else the one its config.json records
        (``convert`` writes it), else its registry name's (LLaDA2.1's), else the family's."""
        kind = chosen or recorded or self.hub_samplers.get(origin) or self.sampler
        allowed = (self.sampler, *self.alternative_samplers)
        if kind not in allowed:
            raise RetrofitError(f"--sampler {kind}: {self.display_name} checkpoints generate with "
                                f"{' or '.join(allowed)}")
        return kind

    # ------------------------------------------------------------------ routing

    def moe_layers(self, config) -> list[int]:
        return list(range(config.num_hidden_layers))

    def router_tensor_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def scoring(self, config) -> Scoring:
        return SOFTMAX

    def token_choice(self, config) -> RouterSettings:
        return TokenChoiceSettings()

    def tiny_dims(self, hidden_size: int = 64, layers: int = 2, heads: int = 4, experts: int = 8, top_k: int = 2,
                  expert_size: int = 32) -> dict[str, Any]:
        """Config fields of a tiny model of this family with the given generic shape (vocabulary 320, for the
        byte tokenizer; 1,024 positions)."""
        raise NotImplementedError(f"{self.display_name}: no tiny shape")

    # ------------------------------------------------------------------ config.json files

    def hub_config(self, config) -> dict[str, Any]:
        raise NotImplementedError(f"{self.display_name}: no Hub config.json layout")

    def converted_config(self, raw: dict, mask_token_id: int, router: RouterSettings) -> dict[str, Any]:
        """The source config.json, re-typed as retrofit's own model type, with the mask id and router section."""
        out = {k: v for k, v in raw.items() if k != "auto_map"}  # auto_map points at remote code: never carry it
        out.update(model_type=self.model_type, architectures=[self.architecture], mask_token_id=mask_token_id,
                   router=router.model_dump())
        return out


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known to loading, conversion and the command line; its model type to transformers'
    Auto classes when it registers itself there."""
    FAMILIES[family.name] = family
    register = getattr(family, "register_with_transformers", None)
    if register is not None:
        register()
    return family


def family_for_checkpoint(raw: dict, where: str = "") -> ModelFamily:
    """The family whose models a config.json describes; unknown ones are refused, naming the families."""
    for family in FAMILIES.values():
        if family.recognises(raw):
            return family
    arch = raw.get("architectures") or raw.get("model_type")
    names = ", ".join(f.display_name for f in FAMILIES.values())
    raise RetrofitError(f"{where + ': ' if where else ''}not a checkpoint of a supported model family "
                        f"(architectures/model_type: {arch}); retrofit supports {names}")


def family_of(config) -> ModelFamily:
    """The family of a native config (or model) by its model type."""
    config = getattr(config, "config", config)
    for family in FAMILIES.values():
        if family.model_type == config.model_type:
            return family
    raise RetrofitError(f"no model family for model_type {config.model_type!r}")


def hub_models() -> dict[str, str]:
    """Every family's short names and Hub ids, for ``--src``/``--model``."""
    return {name: repo for family in FAMILIES.values() for name, repo in family.hub_models.items()}
