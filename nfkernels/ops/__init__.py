"""The fused ops: one module per op, each with its Triton kernels, launchers, autograd.Function
and plain-torch reference. The public, validated entry points live in nfkernels.functional."""
