"""The loader side of the data flow: shards -> decoded samples -> mixed, packed micro-batches (loader.py), model
inputs from media (features.py), packing and collation (batch.py). Imports no model and no engine."""
