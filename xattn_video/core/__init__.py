"""The XAttention core: validated parameters, the block estimate and selection, and block-sparse attention
over the torch, flex and triton backends. Knows nothing of any model library."""
