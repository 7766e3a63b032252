"""Structural pruning: coupled channel groups read from the program, their
importance, and a physically smaller model (params, program, NNX/Equinox modules).
"""

from jaxprune._src.structural.channel_groups import (
    WIDTH_KINDS,
    ChannelGroups,
    Group,
    Member,
    channel_groups,
)
from jaxprune._src.structural.group_importance import (
    activation_importance,
    magnitude_importance,
    taylor_importance,
)
from jaxprune._src.structural.layer_importance import block_influence, layer_importance
from jaxprune._src.structural.shrinking import keep_top, kept_units, shrink
from jaxprune._src.structural.shrunk_modules import equinox_module, nnx_module
from jaxprune._src.structural.shrunk_program import shrunk_program

__all__ = [
    "WIDTH_KINDS",
    "ChannelGroups",
    "Group",
    "Member",
    "activation_importance",
    "block_influence",
    "channel_groups",
    "equinox_module",
    "keep_top",
    "kept_units",
    "layer_importance",
    "magnitude_importance",
    "nnx_module",
    "shrink",
    "shrunk_program",
    "taylor_importance",
]
