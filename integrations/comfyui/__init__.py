"""ImageReward custom nodes for ComfyUI, backed by rayapp. Copy this folder into ComfyUI/custom_nodes/.

Nodes: "ImageReward Loader" (model name / path, device, dtype, or an endpoint URL), "ImageReward Score"
(images + prompt -> scores and a summary) and "ImageReward Filter" (images + prompt + lower limit +
top-k -> surviving images best first, their scores, which were kept). See README.md.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
