"""Quantized linear methods (one module per precision), registered in ``linear.LINEAR_METHODS``.

Importing this package registers every method it holds; ``linear.linear_method_for`` imports
it, so the registry is complete whenever a model picks its method.
"""

from kiln.runtime.linear import LINEAR_METHODS
from kiln.runtime.quant.fp8 import Fp8Linear

LINEAR_METHODS[Fp8Linear.quant_algo] = Fp8Linear

__all__ = ["Fp8Linear"]
