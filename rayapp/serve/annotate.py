"""Write a score into a PNG's text chunks, as the reference WebUI puts it in the image's PNG info."""
from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SCORE_KEY = "ImageReward Score"
# PNG can hold these modes as they are; anything else (CMYK, YCbCr, F, ...) is stored as RGB(A).
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def score_line(score: float) -> str:
    """'ImageReward Score: 0.1234', the text SD-WebUI users look for."""
    return f"{SCORE_KEY}: {score:.4f}"


def annotate_png(img: Image.Image, score: float) -> bytes:
    """The image as PNG with the score appended to `parameters` and in its own text chunk."""
    info = PngInfo()
    texts = {k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)} if img.format == "PNG" else {}
    params = texts.pop("parameters", "")
    texts.pop(SCORE_KEY, None)
    for key, value in texts.items():
        info.add_text(key, value)
    # SD-WebUI reads generation info from `parameters`; the reference WebUI appends the score there.
    info.add_text("parameters", f"{params}\n{score_line(score)}" if params else score_line(score))
    info.add_text(SCORE_KEY, f"{score:.4f}")
    if img.mode not in _PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
