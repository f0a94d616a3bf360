"""Networks of the pipeline: one generator body for teacher, student and compact model, and the discriminator.

`QUANT_BITS` is the bit width of the student and compact generators (weights and activations); 32 means float.
"""
QUANT_BITS = 8

from models.quant import QuantConv2d, QuantConvTranspose2d, quantize_activation, quantize_weight  # noqa: E402
from models.shapes import IMAGE_CHANNELS, IMAGE_SIZES, prunable_layers  # noqa: E402
from models.generator import Generator, PRUNABLE_LAYERS  # noqa: E402
from models.discriminator import Discriminator  # noqa: E402

__all__ = ["QUANT_BITS", "Generator", "PRUNABLE_LAYERS", "Discriminator", "QuantConv2d", "QuantConvTranspose2d",
           "quantize_weight", "quantize_activation", "IMAGE_SIZES", "IMAGE_CHANNELS", "prunable_layers"]
