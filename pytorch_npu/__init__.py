"""TeleChat on PyTorch with torch-npu fused ops (Atlas 800T A2, Atlas 300I Pro), CUDA and CPU."""
