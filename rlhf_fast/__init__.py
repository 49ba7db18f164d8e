"""rlhf_fast: a performance-engineered RLHF trainer for GPT-2.

Importing the package is cheap on purpose: only the version lives here. Import the subpackages you
use (`rlhf_fast.model`, `rlhf_fast.kernels`, ...); heavy optional dependencies (transformers,
datasets, deepspeed, flash-attn) are imported where they are used.
"""

__version__ = "0.1.0"
