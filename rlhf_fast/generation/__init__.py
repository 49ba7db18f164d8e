"""Batched KV-cached generation: prefill + decode loop and sampling. Depends on model/."""
