"""flax models used by the presets; algorithms never depend on them."""
