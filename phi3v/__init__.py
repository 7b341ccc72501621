"""phi3v: a readable pure-PyTorch Phi-3.5-vision with native LoRA/QLoRA fine-tuning."""
from .config import Phi3VConfig, VisionConfig
from .model import Phi3V, Phi3VOutput
from .processor import ImageProcessor, Processor, num_image_tokens

__all__ = ["Phi3VConfig", "VisionConfig", "Phi3V", "Phi3VOutput", "Processor", "ImageProcessor",
           "num_image_tokens"]
