"""Opening a `Pipeline` from a pipeline bundle and a reference.

A pipeline bundle is a folder holding one SAM2 bundle and, optionally, one VLM bundle:

    BUNDLE/sam2/   rau-rt export sam2 ... --out BUNDLE/sam2
    BUNDLE/vlm/    rau-rt export vlm ... --out BUNDLE/vlm

The reference's regions that carry a mask or polygon are encoded once into SAM2's reference
memory (the tracker follows them from the first frame); the VLM localizes every requested
region on keyframes and its boxes re-prompt the tracker. Without `vlm/` there are no keyframes
and every region must carry a mask or polygon. Several references (views of the same anatomy)
get one localizer each and a `ReferenceBank` that picks, per frame, the one the VLM is asked
with (`Pipeline`'s `bank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rau_rt.bundle import MANIFEST, load_bundle, read_manifest
from rau_rt.config import EngineConfig
from rau_rt.errors import BundleError, InputError
from rau_rt.localization import Localizer, LocalizerConfig, LocalizerWorker
from rau_rt.localization.remote import RemoteConfig, RemoteLocalizer, is_remote
from rau_rt.pipeline.pipeline import Pipeline, PipelineConfig
from rau_rt.reference import BankConfig, Reference, ReferenceBank
from rau_rt.tracking import Tracker, TrackerConfig
from rau_rt.types import Frame

SAM2_PART, VLM_PART = "sam2", "vlm"
# ONNX Runtime threads that spin after a run take the cores from the other engine and NumPy in
# between (a tracker and a VLM worker share the host): off by default for pipelines.
PIPELINE_ENGINE_CONFIG = EngineConfig(spin_wait=False)


@dataclass(frozen=True)
class PipelineBundle:
    """Where a pipeline bundle's parts are."""

    directory: Path
    sam2: Path
    vlm: Path | None

    @classmethod
    def find(cls, directory: str | Path) -> PipelineBundle:
        """Check the layout (module docstring); raises BundleError saying what is missing."""
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory}: no such bundle folder")
        if (directory / MANIFEST).exists():
            raise BundleError(
                f"{directory}: this is a single-model bundle; a pipeline bundle holds one in "
                f"{SAM2_PART}/ and optionally one in {VLM_PART}/ (rau-rt export sam2 --out "
                f"{directory.name}/{SAM2_PART}, rau-rt export vlm --out "
                f"{directory.name}/{VLM_PART})")
        sam2 = directory / SAM2_PART
        if not (sam2 / MANIFEST).exists():
            raise BundleError(f"{directory}: no SAM2 bundle at {sam2} (build it with rau-rt "
                              f"export sam2 --out {sam2})")
        vlm = directory / VLM_PART
        return cls(directory, sam2, vlm if (vlm / MANIFEST).exists() else None)


def open_pipeline(bundle: str | Path, reference: Reference | Sequence[Reference],
                  regions: Sequence[str] | None = None, config: PipelineConfig | None = None, *,
                  backend: str | None = None,
                  engine: EngineConfig = PIPELINE_ENGINE_CONFIG,
                  vlm_engine: EngineConfig | None = None,
                  tracker: TrackerConfig | None = None,
                  localizer: LocalizerConfig | str | None = None,
                  bank: BankConfig | None = None,
                  localize: bool = True) -> Pipeline:
    """Load the bundle's engines, encode the reference(s), and return the stream's Pipeline.

    Args:
        bundle: a pipeline bundle folder (module docstring).
        reference: the annotated reference image, or several (views of the same anatomy, e.g.
            one per C-arm angle): each frame then chooses the most similar one
            (`ReferenceBank`) and the VLM is asked with it; the first one's polygons/masks
            are SAM2's reference memory.
        regions: the regions to follow (default: all of the first reference's); each must be
            marked on at least one reference.
        config: pipeline settings (without a VLM there are no keyframes).
        backend: engine backend for both parts (None: each graph's first manifest entry).
        engine: SAM2 engine settings (device, precision, threads).
        vlm_engine: VLM engine settings (default: `engine` without its precision, since the
            VLM bundle's precisions differ from SAM2's).
        tracker, bank: their settings.
        localizer: the bundle VLM's localizer settings, or the URL of a central localizer
            server (`triton://host:port`, `triton+grpc://host:port`; `rau-rt
            serve-localizer`) that answers the keyframes instead; the bundle then needs no
            VLM, and the references are registered there.
        localize: False runs without keyframes even when the bundle has a VLM (it is not
            loaded; e.g. an untrained one): regions are tracked from the reference memory.

    Raises:
        BundleError: the folder is not a pipeline bundle; EngineMismatchError / BundleError
            from loading a part.
        InputError: a requested region is on no reference, or cannot be followed (a box-only
            region without a VLM); several references without a VLM.
    """
    paths = PipelineBundle.find(bundle)
    config = config or PipelineConfig()
    references = (reference,) if isinstance(reference, Reference) else tuple(reference)
    if not references:
        raise InputError("reference: at least one annotated reference")
    primary = references[0]
    names = tuple(regions) if regions else primary.region_names
    marked = {n for r in references for n in r.region_names}
    unknown = [n for n in names if n not in marked]
    if unknown:
        raise InputError(f"regions {unknown} are not in the reference"
                         f"{'s' if len(references) > 1 else ''} "
                         f"{[r.name for r in references]}; marked: {sorted(marked)}")
    by_name = {r.name: r for r in primary.regions}
    masks = {n: m for n in names if n in by_name
             and (m := primary.mask(by_name[n])) is not None}
    remote = localizer if isinstance(localizer, str) else None
    if remote is not None and not is_remote(remote):
        raise InputError(f"localizer {remote!r}: expected a LocalizerConfig or a triton:// URL")
    vlm_path = paths.vlm if localize and remote is None else None
    if vlm_path is None and remote is None:
        why = (f"{paths.directory} has no VLM ({VLM_PART}/)" if paths.vlm is None
               else "localization is off (localize=False)")
        if len(references) > 1:
            raise InputError(f"{why}: several references choose the VLM's reference per view "
                             "and need one")
        boxes_only = [n for n in names if n not in masks]
        if boxes_only:
            raise InputError(f"{why}, so regions {boxes_only} marked by box only cannot be "
                             "found; give them a polygon or mask, or add a VLM bundle")
    opened, workers = {}, []
    try:
        tracker = tracker or TrackerConfig()
        # Only the graphs the tracker runs; one the bundle lacks is left to the Tracker, which
        # says how to get it.
        exported = read_manifest(paths.sam2).graph_names
        sam2 = opened[SAM2_PART] = load_bundle(
            paths.sam2, backend, engine, graphs=[g for g in tracker.graphs if g in exported])
        stream_tracker = Tracker(sam2, tracker)
        if masks:
            stream_tracker.add_reference(_frame(primary), masks)
        views = None
        if len(references) > 1:
            views = ReferenceBank(references, [stream_tracker.describe(_frame(r))
                                               for r in references], bank or BankConfig())
        if remote is not None:
            for ref in references:
                workers.append(LocalizerWorker(
                    RemoteLocalizer(remote, ref, RemoteConfig(
                        timeout_s=config.localizer_timeout_s,
                        deadline_s=config.localizer_timeout_s)),
                    timeout_s=config.localizer_timeout_s))
        elif vlm_path is not None:
            vlm = opened[VLM_PART] = load_bundle(vlm_path, backend,
                                                 vlm_engine or replace(engine, precision=None))
            for ref in references:
                workers.append(LocalizerWorker(
                    Localizer(vlm, ref, localizer or LocalizerConfig()),
                    timeout_s=config.localizer_timeout_s))
        pipeline = Pipeline(stream_tracker, workers or None, names, config, bank=views)
    except BaseException:
        for worker in workers:
            worker.close()
        for part in opened.values():
            part.close()
        raise
    pipeline.bundles.update(opened)
    return pipeline


def _frame(reference: Reference) -> Frame:
    image = reference.image
    return Frame(0, 0.0, image, "gray" if image.ndim == 2 else reference.channel_order, 8)
