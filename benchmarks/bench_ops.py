"""Native pre/post-processing vs the best OpenCV+NumPy composition and the naive one.

    python -m benchmarks.bench_ops [--quick] [--json PATH]

Cases (issue "Native pre/post-processing extension"): 1080p BGR uint8 -> 1024² SAM2 input;
512² uint16 (12-bit) -> 512²; 3 regions x 256² logits -> 1080p masks with box/area/score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt import ops

MEAN = np.asarray(ops.IMAGENET_MEAN, dtype=np.float32)
STD = np.asarray(ops.IMAGENET_STD, dtype=np.float32)


def preprocess_best_opencv(image: np.ndarray, size: int, max_value: float,
                           out: np.ndarray) -> np.ndarray:
    """The fastest composition found: SIMD resize, split, one fused scale+offset pass per plane."""
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    planes = cv2.split(resized) if resized.ndim == 3 else [resized] * 3
    if len(planes) == 3 and resized.ndim == 3:
        planes = planes[::-1]  # BGR -> RGB planes
    for k in range(3):
        scale = 1.0 / (max_value * STD[k])
        cv2.addWeighted(planes[k], scale, planes[k], 0.0, -MEAN[k] / STD[k], dst=out[k],
                        dtype=cv2.CV_32F)
    return out


def preprocess_naive(image: np.ndarray, size: int, max_value: float) -> np.ndarray:
    """What most code does: resize, colour convert, normalize in NumPy, transpose."""
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB) if resized.ndim == 3 else \
        np.repeat(resized[:, :, None], 3, axis=2)
    x = (rgb.astype(np.float32) / max_value - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def postprocess_best_opencv(logits: np.ndarray, size: tuple[int, int],
                            out: np.ndarray) -> list:
    results = []
    for n, plane in enumerate(logits):
        up = cv2.resize(plane, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        np.greater(up, 0.0, out=out[n].view(bool))
        area = cv2.countNonZero(out[n])
        if area == 0:
            results.append((None, 0, 0.0))
            continue
        x, y, w, h = cv2.boundingRect(out[n])
        score = float(np.mean(1.0 / (1.0 + np.exp(-up[out[n].view(bool)].astype(np.float64)))))
        results.append(((x, y, x + w, y + h), area, score))
    return results


def postprocess_naive(logits: np.ndarray, size: tuple[int, int]) -> list:
    results = []
    for plane in logits:
        up = cv2.resize(plane, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        mask = (up > 0).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            results.append((mask, None, 0, 0.0))
            continue
        with np.errstate(over="ignore"):  # exp(-logit) overflows to inf -> probability 0
            probs = 1.0 / (1.0 + np.exp(-up))
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        results.append((mask, box, int(ys.size), float(probs[mask > 0].mean())))
    return results


def blob_logits(rng: np.random.Generator, regions: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    planes = []
    for _ in range(regions):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.05, 0.2) * size
        planes.append(6.0 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
                      + rng.normal(0, 0.3, (size, size)))
    return np.stack(planes).astype(np.float32)


@dataclass
class OpCase:
    """One benchmark case: the calls timed side by side (interleaved), which of them is ours,
    which rows compare it with which baseline, and the fidelity of the outputs."""

    name: str
    calls: dict[str, Callable[[], object]]
    rows: list[tuple[str, str, str]]  # (our call, baseline call, baseline's description)
    fidelity: Callable[[], dict[str, object]]
    ours: dict[str, str] = field(default_factory=lambda: {"native": "native",
                                                          "native-1": "native (1 thread)"})


def _one_thread(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        ops.set_num_threads(1)
        try:
            return call()
        finally:
            ops.set_num_threads(None)
    return run


def cases(rng: np.random.Generator) -> list[OpCase]:
    """The three cases, each with its inputs and output buffers made once."""
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)  # SAM2 at 1024
    hd_ours, hd_best = (np.empty((3, 1024, 1024), np.float32) for _ in range(2))
    xray = rng.integers(0, 4096, (512, 512), dtype=np.uint16)  # 12-bit X-ray at 512
    x_ours, x_best = (np.empty((3, 512, 512), np.float32) for _ in range(2))
    logits = blob_logits(rng, 3, 256)  # 3 regions -> 1080p masks + box/area/score
    masks, best_masks = (np.empty((3, 1080, 1920), np.uint8) for _ in range(2))

    def preprocess_fidelity(ours, best, reference) -> Callable[[], dict[str, object]]:
        return lambda: {"native_max_abs_vs_reference": float(np.abs(ours - reference()).max()),
                        "opencv_max_abs_vs_reference": float(np.abs(best - reference()).max())}

    def postprocess_fidelity() -> dict[str, object]:
        ours = ops.postprocess_masks(logits, (1080, 1920), out=masks)
        best = postprocess_best_opencv(logits, (1080, 1920), best_masks)
        return {"mask_pixels_differing_vs_opencv": int(np.count_nonzero(masks != best_masks)),
                "boxes_equal_opencv": ours.boxes == [r[0] for r in best]}

    def native_hd() -> np.ndarray:
        return ops.preprocess(frame, (1024, 1024), out=hd_ours)

    return [
        OpCase("preprocess 1080p BGR u8 -> 1024²",
               {"native": native_hd, "native-1": _one_thread(native_hd),
                "best": lambda: preprocess_best_opencv(frame, 1024, 255.0, hd_best),
                "naive": lambda: preprocess_naive(frame, 1024, 255.0)},
               [("native", "best", "OpenCV resize+split+addWeighted"),
                ("native", "naive", "OpenCV resize + NumPy normalize/transpose"),
                ("native-1", "best", "OpenCV resize+split+addWeighted")],
               preprocess_fidelity(hd_ours, hd_best,
                                   lambda: ops.preprocess_reference(frame, (1024, 1024)))),
        OpCase("preprocess 512² u16 (12-bit) -> 512²",
               {"native": lambda: ops.preprocess(xray, (512, 512), bits_stored=12, out=x_ours),
                "best": lambda: preprocess_best_opencv(xray, 512, 4095.0, x_best),
                "naive": lambda: preprocess_naive(xray, 512, 4095.0)},
               [("native", "best", "OpenCV resize+addWeighted"),
                ("native", "naive", "NumPy normalize + repeat")],
               preprocess_fidelity(x_ours, x_best, lambda: ops.preprocess_reference(
                   xray, (512, 512), bits_stored=12))),
        OpCase("postprocess 3 x 256² -> 1080p",
               {"native": lambda: ops.postprocess_masks(logits, (1080, 1920), out=masks),
                "best": lambda: postprocess_best_opencv(logits, (1080, 1920), best_masks),
                "naive": lambda: postprocess_naive(logits, (1080, 1920))},
               [("native", "best", "OpenCV resize/countNonZero/boundingRect + NumPy"),
                ("native", "naive", "OpenCV resize + NumPy nonzero")],
               postprocess_fidelity),
    ]


def run(repeat: int, warmup: int) -> list[dict[str, object]]:
    records = []
    for case in cases(np.random.default_rng(0)):
        times = time_interleaved(case.calls, warmup=warmup, repeat=repeat)
        fidelity = case.fidelity()
        records += [case_record(case.name, case.ours[ours], "fp32", times[ours], description,
                                times[baseline], fidelity)
                    for ours, baseline, description in case.rows]
    return records


def main(argv: list[str] | None = None) -> int:
    return run_suite("bench_ops", __doc__, "benchmarks/results/ops_cpu.json",
                     lambda args, workdir: run(repeat=args.repeat or (15 if args.quick else 60),
                                               warmup=3), argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
