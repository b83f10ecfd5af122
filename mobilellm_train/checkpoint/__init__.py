"""Distributed checkpoints with torch.distributed.checkpoint (DCP): the package's public names.

checkpointer.py holds the code while it is split into files of one concern each.
"""

from mobilellm_train.checkpoint.checkpointer import *  # noqa: F403
from mobilellm_train.checkpoint.checkpointer import _checked_load  # noqa: F401
