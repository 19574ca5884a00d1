"""ftcli's Triton kernels: one op per module, each with its autograd Function and a plain-PyTorch reference."""
