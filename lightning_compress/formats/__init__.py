"""On-disk formats: safetensors + JSON only, never pickle."""
