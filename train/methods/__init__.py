"""The quantization methods `mixq train --method` knows: one file each, registered here.

    csq.py     CSQ and CSQ-Uniform (the bit-level relaxation, with and without the mask)
    bsq.py     BSQ (bit planes, STE, group Lasso, precision adjustment)
    clado.py   CLADO (measured cross-layer sensitivities, bits allocated by a quadratic program)
    sdq.py     SDQ (DBPs choosing stochastically between adjacent bit-widths; EBR and distillation)
    ste.py     STE-uniform (the fixed-precision baseline; its layers are CLADO's too)

The interface and the registry are in base.py. Adding a method is its file (layers with
integer_weight() and bit_info(), options, a Method subclass) and one register() line below: its
--method name, options, flags and optimizer roles come from the class (README "Adding a
method"). The order of the lines is the order `--method` lists the choices in."""
from mixq.train.methods.base import METHODS, Method, Option, options, register
from mixq.train.methods.bsq import BSQ
from mixq.train.methods.clado import CLADO
from mixq.train.methods.csq import CSQ, CSQUniform
from mixq.train.methods.sdq import SDQ
from mixq.train.methods.ste import STEUniform

register(CSQ)
register(BSQ)
register(CLADO)
register(SDQ)
register(STEUniform)
register(CSQUniform)

__all__ = ["METHODS", "Method", "Option", "options", "register"]
