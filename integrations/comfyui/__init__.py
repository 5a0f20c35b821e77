"""ImageReward custom nodes for ComfyUI, backed by rayapp. Copy this folder into ComfyUI/custom_nodes/.

Nodes (keys with the Rayapp prefix): "ImageReward Loader (rayapp)" (model name / path, device, dtype, or
an endpoint URL), "ImageReward Score (rayapp)" (images + prompt -> scores and a summary; an output node)
and "ImageReward Filter (rayapp)" (images + prompt + lower limit + top-k -> surviving images best first,
their scores, which were kept). See README.md.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
