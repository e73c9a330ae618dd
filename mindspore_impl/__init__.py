"""TeleChat as a MindSpore Cell with Ascend fused ops, trained under msrun."""
