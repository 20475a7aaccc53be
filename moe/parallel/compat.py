"""torch.distributed names that moved between the torch versions we support (2.11 to 2.14)."""
from __future__ import annotations

import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (same arguments) and deprecated the old
# name; the GPU machines run 2.11, which has only the old one.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
