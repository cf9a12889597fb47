"""Quantized linear methods (one module per precision), registered in ``linear.LINEAR_METHODS``.

Importing this package registers every method it holds; ``linear.linear_method_for`` imports
it, so the registry is complete whenever a model picks its method.
"""

from kiln.runtime.linear import LINEAR_METHODS
from kiln.runtime.quant.fp8 import Fp8Linear
from kiln.runtime.quant.int4 import Int4Linear, Int4RtnLinear

for _method in (Fp8Linear, Int4Linear, Int4RtnLinear):
    LINEAR_METHODS[_method.quant_algo] = _method

__all__ = ["Fp8Linear", "Int4Linear", "Int4RtnLinear"]
