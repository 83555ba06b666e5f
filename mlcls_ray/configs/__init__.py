"""The model presets, one YAML each: the only source of their defaults."""
