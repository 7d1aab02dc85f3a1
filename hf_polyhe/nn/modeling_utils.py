"""``PolyPreTrainedModel``: what the three families share on top of ``transformers.PreTrainedModel``.

The polynomial state of every :class:`PolyOperator` (mode, interval, coefficients) is plain data, not a tensor:
``save_pretrained`` writes it into the saved ``config.json`` as ``poly_operators`` and ``from_pretrained`` applies
it again. Saving never touches ``model.config`` itself (a config shared with ``from_config`` must not turn later
models polynomial).

Saved directories also carry an ``auto_map`` and two small code files, so that
``AutoModel*.from_pretrained(path, trust_remote_code=True)`` loads them without ``import hf_polyhe`` (as custom-code
models on the Hub do). The code files import the classes of the installed ``hf_polyhe`` package rather than being
copies of it: a copy would define a second ``PolyGPTForCausalLM`` class (which ``export`` and every ``isinstance``
check would reject) frozen at save time on top of the package's current ``hf_polyhe.nn`` layers.
"""

from __future__ import annotations

import copy
import os

from transformers import PreTrainedModel
from transformers.utils.output_capturing import OutputRecorder

from .attention import PolyAttention
from .layers import PolyBlock
from .operators import PolyOperator

REMOTE_CODE_HEADER = '''"""Written by hf_polyhe's save_pretrained: lets `AutoConfig` / `AutoModel*.from_pretrained(..., trust_remote_code=True)`
load this directory without `import hf_polyhe`. The classes are those of the installed hf_polyhe package
(`pip install hf-polyhe`)."""

'''


def poly_operators(model) -> dict[str, PolyOperator]:
    """``{module path: PolyOperator}`` for every operator in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PolyOperator)}


def remote_code(config_class) -> tuple[dict, dict]:
    """``(auto_map, {file name: source})`` for a family's config class: the ``auto_map`` entry of config.json and
    the code files it points to (``configuration_poly_gpt.py``, ``modeling_poly_gpt.py``, ...)."""
    from ..models import AUTO_CLASSES  # the table of the three families (they import this module)

    family = next((c for c in AUTO_CLASSES if issubclass(config_class, c)), None)
    if family is None:
        raise ValueError(f"{config_class.__name__} is not a config of a Poly model family; "
                         f"accepted: {', '.join(c.__name__ for c in AUTO_CLASSES)}")
    files: dict[str, list] = {}
    auto_map = {}
    for auto_name, cls in [("AutoConfig", family), *AUTO_CLASSES[family].items()]:
        module, file = cls.__module__, cls.__module__.rsplit(".", 1)[-1]
        auto_map[auto_name] = f"{file}.{cls.__name__}"
        files.setdefault(file, [module, []])[1].append(cls.__name__)
    sources = {f"{file}.py": REMOTE_CODE_HEADER + f"from {module} import {', '.join(sorted(set(names)))}  # noqa: F401\n"
               for file, (module, names) in files.items()}
    return auto_map, sources


class PolyPreTrainedModel(PreTrainedModel):
    supports_gradient_checkpointing = True  # the blocks are GradientCheckpointingLayers
    _supports_sdpa = False
    _supports_flash_attn = False
    # output_hidden_states / output_attentions, captured by transformers' hooks as in GPT-2 / BERT / ViT: the input
    # of the first block and the output of every block; the (softmax-free) attention weights of every layer
    _can_record_outputs = {"hidden_states": PolyBlock, "attentions": OutputRecorder(PolyAttention, index=1)}

    def _spec_key(self, path: str) -> str:
        """Paths are stored relative to the base model so heads and bare models share them."""
        prefix = self.base_model_prefix + "."
        return path[len(prefix):] if path.startswith(prefix) else path

    def poly_operator_specs(self) -> dict:
        return {self._spec_key(p): op.spec() for p, op in poly_operators(self).items()}

    def apply_poly_operator_specs(self, specs: dict | None) -> None:
        if not specs:
            return
        for path, op in poly_operators(self).items():
            key = self._spec_key(path)
            if key in specs:
                op.load_spec(specs[key])

    def post_init(self):
        super().post_init()
        self.apply_poly_operator_specs(getattr(self.config, "poly_operators", None))

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to do: every saved Poly model carries its ``auto_map`` and code files (see ``save_pretrained``).

        (transformers calls this after loading remote code; the default would copy this module, whose relative
        imports of ``hf_polyhe.nn`` cannot be copied along, into every later save.)"""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, with the operators' polynomial state (``poly_operators``) and an
        ``auto_map`` in the saved config.json, plus the code files that ``auto_map`` names. ``self.config`` is left
        unchanged: the additions go into a copy that is saved in its place."""
        saved = copy.deepcopy(self.config)
        saved.poly_operators = self.poly_operator_specs()
        saved.auto_map, sources = remote_code(type(self.config))
        if kwargs.get("is_main_process", True):  # written first, so that push_to_hub=True uploads them too
            os.makedirs(save_directory, exist_ok=True)
            for name, source in sources.items():
                with open(os.path.join(save_directory, name), "w", encoding="utf-8") as f:
                    f.write(source)
        live = self.config
        self.config = saved
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config = live
