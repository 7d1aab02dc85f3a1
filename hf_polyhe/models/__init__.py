"""The three model families, and which Auto class loads which of their classes."""

from .poly_bert import PolyBertConfig, PolyBertForMaskedLM, PolyBertForSequenceClassification, PolyBertModel
from .poly_gpt import PolyGPTConfig, PolyGPTForCausalLM, PolyGPTModel
from .poly_vit import PolyViTConfig, PolyViTForImageClassification, PolyViTModel

# {config class: {transformers Auto class name: model class}}. `import hf_polyhe` registers these with the Auto
# classes; `save_pretrained` writes them as the `auto_map` of config.json (see PolyPreTrainedModel.save_pretrained).
AUTO_CLASSES = {
    PolyGPTConfig: {"AutoModel": PolyGPTModel, "AutoModelForCausalLM": PolyGPTForCausalLM},
    PolyBertConfig: {
        "AutoModel": PolyBertModel,
        "AutoModelForMaskedLM": PolyBertForMaskedLM,
        "AutoModelForSequenceClassification": PolyBertForSequenceClassification,
    },
    PolyViTConfig: {"AutoModel": PolyViTModel, "AutoModelForImageClassification": PolyViTForImageClassification},
}
