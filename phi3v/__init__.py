"""phi3v: a readable pure-PyTorch Phi-3.5-vision with native LoRA/QLoRA fine-tuning."""
from .config import Phi3VConfig, VisionConfig
from .lora import LoRALinear, apply_lora, load_adapter, lora_parameters, lora_state_dict, merge_lora, save_adapter
from .model import Phi3V, Phi3VOutput
from .nf4 import NF4Linear, quantize_nf4
from .optim import ZeroAdamW
from .processor import ImageProcessor, Processor, num_image_tokens

__all__ = ["Phi3VConfig", "VisionConfig", "Phi3V", "Phi3VOutput", "Processor", "ImageProcessor",
           "num_image_tokens", "apply_lora", "load_adapter", "save_adapter", "merge_lora", "LoRALinear",
           "lora_parameters", "lora_state_dict", "quantize_nf4", "NF4Linear", "ZeroAdamW"]
