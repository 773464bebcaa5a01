"""Commands around training: `omni-train plan` (plan.py), `omni-train pairs` (pairs.py), `omni-demo` (demo.py)
and the tiny stand-in source models the demo and tests compose from (tiny_sources.py)."""
