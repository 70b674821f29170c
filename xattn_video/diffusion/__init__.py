"""XAttention in diffusers: the HunyuanVideo processor, the `xattn` attention backend and denoising-step
tracking."""
