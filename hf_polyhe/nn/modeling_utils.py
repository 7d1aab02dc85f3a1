"""``PolyPreTrainedModel``: what the three families share on top of ``transformers.PreTrainedModel``.

It keeps the polynomial state of every :class:`PolyOperator` in ``config.poly_operators`` so that
``save_pretrained`` / ``from_pretrained`` round-trip fitted ranges, coefficients and modes."""

from __future__ import annotations

from transformers import PreTrainedModel

from .operators import PolyOperator


def poly_operators(model) -> dict[str, PolyOperator]:
    """``{module path: PolyOperator}`` for every operator in ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PolyOperator)}


class PolyPreTrainedModel(PreTrainedModel):
    supports_gradient_checkpointing = False
    _supports_sdpa = False
    _supports_flash_attn = False

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.poly_operators = self.poly_operator_specs()
        return super().save_pretrained(save_directory, *args, **kwargs)
