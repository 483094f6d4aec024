"""Image augmentation for training on synthetic cines so the models survive real ones.

notes/real_angiography.md: real cines arrive blurred and compressed (H.264), with other display
curves. Each is applied with its own chance to the 8-bit view the model would see. Random
collimation is drawn by the generator's clinical look instead, where the truth under a blade is
known to be empty (a blade painted on here would leave truth pixels under it).
"""

from __future__ import annotations

import cv2
import numpy as np


def augment_8bit(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A randomly degraded copy of an 8-bit gray frame: gamma, blur, JPEG compression."""
    out = view
    if rng.uniform() < 0.5:  # another display curve
        lut = (255.0 * (np.arange(256) / 255.0) ** rng.uniform(0.7, 1.4) + 0.5).astype(np.uint8)
        out = lut[out]
    if rng.uniform() < 0.3:  # focal spot, motion or a smoother detector
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.3) * out.shape[0] / 512)
    if rng.uniform() < 0.3:  # compression as a video export leaves it
        ok, data = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 90))])
        if ok:
            out = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    return out
