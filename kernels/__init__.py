"""fsc.kernels: Triton kernels with their launchers, registration and PyTorch references.

Planned (DESIGN.md): jagged generalized dot-product attention (HSTU SiLU and softmax).
Nothing is implemented here yet; no pass lowers to this package until it is.
"""
