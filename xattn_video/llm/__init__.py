"""XAttention in transformers: the `xattn` attention function for the prefill of video LLMs, and
torchvision-free Qwen2-VL video inputs."""
