"""Configuration: `schema` (the structured config groups, a leaf), `compose` (Hydra composition for every entry
point) and `validate` (semantic checks, above the model)."""
