"""mixq: mixed-precision quantized CNNs (CSQ) shipped as exact integer programs via TVM."""
__version__ = "0.1.0"
