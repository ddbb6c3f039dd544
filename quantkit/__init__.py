"""quantkit: StableLM-Tuned-Alpha (GPT-NeoX) to GPTQ 4-bit and fp16 ONNX, with quality and speed measured."""
import logging

# torchao (pulled in by gptqmodel) warns about its own enums on every transformers import; not actionable for users.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
