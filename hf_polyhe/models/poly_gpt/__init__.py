from .configuration_poly_gpt import PolyGPTConfig
from .modeling_poly_gpt import PolyGPTForCausalLM, PolyGPTModel, PolyGPTPreTrainedModel
