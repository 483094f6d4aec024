"""Model bundles: a directory of graph files plus `manifest.json`, which describes them.

Per graph file the manifest records the backend, precision, device, input/output specs, the
file's sha256, the source checkpoint's sha256, the exporter and tool versions (torch, onnx,
onnxruntime, tensorrt, CUDA, GPU compute capability), the parity results of export
verification and the dynamic-dimension ranges (TensorRT optimization profiles). `load_bundle`
checks all of it before anything runs and says how to rebuild what does not fit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rau_rt._version import __version__
from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines import registry
from rau_rt.engines.base import Engine
from rau_rt.errors import BundleError, EngineMismatchError, InputError, ShapeError
from rau_rt.sidecar import read_json, write_json
from rau_rt.types import TensorSpec, format_shape

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Distributions whose versions an entry records (None where not installed).
TOOL_DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions(**extra: str | None) -> dict[str, str | None]:
    """Installed versions of the export/runtime tools (read from metadata, nothing imported).

    Args:
        **extra: Facts only the caller knows, e.g. cuda="13.0", compute_capability="8.9".
    """
    versions: dict[str, str | None] = {"rau_rt": __version__}
    for name in TOOL_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions.update({"cuda": None, "compute_capability": None, "gpu": None})
    versions.update(extra)
    return versions


@dataclass(frozen=True)
class GraphEntry:
    """One graph file of a bundle, as `manifest.json` records it."""

    graph: str  # the role, e.g. "image_encoder"; several entries may share it (onnx, engine)
    file: str  # relative to the bundle directory
    backend: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    device: str = "any"  # "cpu", "cuda" or "any" (ONNX graphs run on either)
    source_checkpoint_sha256: str | None = None
    exporter: dict[str, str] = field(default_factory=dict)  # name, version, command
    tools: dict[str, str | None] = field(default_factory=dict)
    parity: dict[str, object] | None = None
    # input name -> {"min": [...], "opt": [...], "max": [...]}: the shapes export verified and a
    # TensorRT optimization profile is built for.
    dynamic_ranges: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    lint: dict[str, object] | None = None  # TensorRT readiness of an ONNX graph (export lint)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["inputs"] = [s.to_dict() for s in self.inputs]
        data["outputs"] = [s.to_dict() for s in self.outputs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> GraphEntry:
        try:
            values = dict(data)
            values["inputs"] = tuple(TensorSpec.from_dict(s) for s in data["inputs"])
            values["outputs"] = tuple(TensorSpec.from_dict(s) for s in data["outputs"])
            return cls(**values)
        except (KeyError, TypeError, InputError) as exc:
            raise BundleError(f"manifest entry {data.get('file', '?')!r} is malformed ({exc}); "
                              "re-export the bundle") from exc


@dataclass(frozen=True)
class Manifest:
    """The whole `manifest.json`."""

    name: str
    graphs: tuple[GraphEntry, ...]
    format_version: int = FORMAT_VERSION
    # Files the graphs need besides themselves (relative path -> sha256): a VLM's vlm.json and
    # tokenizer, ONNX external weights (`<graph>.onnx.data`). `load_bundle` checks them too.
    files: dict[str, str] = field(default_factory=dict)

    def entries(self, graph: str) -> list[GraphEntry]:
        """Every entry for the graph `graph`, in manifest order (the preferred one first)."""
        return [e for e in self.graphs if e.graph == graph]

    @property
    def graph_names(self) -> list[str]:
        return list(dict.fromkeys(e.graph for e in self.graphs))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `directory` (sorted keys, so diffs stay readable)."""
    return write_json(Path(directory) / MANIFEST, {
        "format_version": manifest.format_version, "name": manifest.name,
        "graphs": [e.to_dict() for e in manifest.graphs], "files": dict(manifest.files)})


def read_manifest(directory: str | Path) -> Manifest:
    """Parse `manifest.json` (no file checks; `load_bundle` does those)."""
    path = Path(directory) / MANIFEST
    data = read_json(path, "a bundle is a directory written by `rau-rt export ...` (graph files "
                           "+ manifest.json)")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {data.get('format_version')!r}, this rau-rt "
                          f"{__version__} reads {FORMAT_VERSION}; re-export the bundle")
    graphs, files = data.get("graphs"), data.get("files", {})
    if not isinstance(graphs, list) or not graphs or not all(isinstance(g, dict) for g in graphs):
        raise BundleError(f"{path}: 'graphs' must list at least one graph entry, got "
                          f"{json.dumps(graphs)[:80]}; re-export the bundle")
    if not isinstance(files, dict):
        raise BundleError(f"{path}: 'files' must map file names to sha256; re-export the bundle")
    return Manifest(str(data.get("name", "")), tuple(GraphEntry.from_dict(g) for g in graphs),
                    files=dict(files))


def side_files(directory: str | Path, names: Sequence[str]) -> dict[str, str]:
    """`Manifest.files` for `names` (relative to `directory`) plus every ONNX external-data
    file (`*.onnx.data`) in the bundle."""
    directory = Path(directory)
    rels = set(names) | {p.name for p in directory.glob("*.onnx.data")}
    return {rel: file_sha256(directory / rel) for rel in sorted(rels)}


def check_side_files(directory: str | Path, manifest: Manifest) -> None:
    """Every file in `manifest.files` present and unchanged since export."""
    for rel, digest in manifest.files.items():
        path = Path(directory) / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing; re-export the bundle")
        if file_sha256(path) != digest:
            raise BundleError(f"{path}: sha256 does not match the manifest's (changed or "
                              "truncated after export); re-export the bundle")


def rebuild_command(directory: str | Path, entry: GraphEntry) -> str:
    """The command that rebuilds `entry`'s file."""
    if entry.backend == "tensorrt":
        return f"rau-rt export trt --bundle {directory} --precision {entry.precision}"
    return entry.exporter.get("command") or (
        f"the exporter recorded in the manifest ({entry.exporter.get('name', 'unknown')})")


def check_file(directory: str | Path, entry: GraphEntry) -> Path:
    """The entry's file, present and unchanged since export."""
    path = Path(directory) / entry.file
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST} but missing; rebuild it: "
                          f"{rebuild_command(directory, entry)}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise BundleError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                          f"{entry.sha256[:12]}... (changed or truncated after export); rebuild "
                          f"it: {rebuild_command(directory, entry)}")
    return path


def _version_key(version: str | None) -> tuple[str, ...]:
    # Engines are tied to major.minor.patch (TensorRT's serialization tag); the build number
    # does not matter.
    return tuple((version or "").split(".")[:3])


def check_host(directory: str | Path, entry: GraphEntry, host: Mapping[str, str]) -> None:
    """Raise when a TensorRT entry was built for another TensorRT version or GPU than `host`."""
    built_trt, built_cc = entry.tools.get("tensorrt"), entry.tools.get("compute_capability")
    if (_version_key(built_trt) != _version_key(host.get("tensorrt"))
            or built_cc != host.get("compute_capability")):
        raise EngineMismatchError(
            f"{Path(directory) / entry.file}: engine built with TensorRT {built_trt} for "
            f"sm_{str(built_cc).replace('.', '')}; this host has {host.get('tensorrt')} / "
            f"sm_{str(host.get('compute_capability')).replace('.', '')}: engines are not "
            f"portable, rebuild it here: {rebuild_command(directory, entry)}")


def check_ranges(directory: str | Path, entry: GraphEntry,
                 feeds: Mapping[str, np.ndarray]) -> None:
    """Raise `ShapeError` when a feed's shape is outside the entry's dynamic ranges."""
    for name, bounds in entry.dynamic_ranges.items():
        if name not in feeds:
            continue
        shape = feeds[name].shape
        low, high = bounds["min"], bounds["max"]
        if len(shape) != len(low) or any(
                s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
            raise ShapeError(
                f"input {name!r} of {entry.graph} ({entry.file}): shape {tuple(shape)} is outside "
                f"the exported range {tuple(low)}..{tuple(high)}; re-export with a wider range "
                f"(then {rebuild_command(directory, entry)} for TensorRT)")


def _agree(a: tuple[TensorSpec, ...], b: tuple[TensorSpec, ...]) -> bool:
    # Dynamic dims agree whatever their names (TensorRT reports -1 where ONNX had "batch").
    def key(specs):
        return [(s.name, s.dtype, tuple(d if isinstance(d, int) else None for d in s.shape))
                for s in specs]
    return key(a) == key(b)


def check_specs(directory: str | Path, entry: GraphEntry, engine: Engine) -> None:
    """Raise when the loaded graph's inputs/outputs are not the ones the manifest records."""
    if not (_agree(engine.inputs, entry.inputs) and _agree(engine.outputs, entry.outputs)):
        def text(specs):
            return ", ".join(f"{s.name}{format_shape(s.shape)}:{s.dtype}" for s in specs)
        raise BundleError(
            f"{Path(directory) / entry.file}: the graph's tensors {text(engine.inputs)} -> "
            f"{text(engine.outputs)} do not match the manifest's {text(entry.inputs)} -> "
            f"{text(entry.outputs)}; the manifest belongs to another export: rebuild with "
            f"{rebuild_command(directory, entry)}")


class Bundle:
    """Loaded engines for the graphs of one bundle; `run` also checks the profile ranges."""

    def __init__(self, directory: Path, manifest: Manifest,
                 selected: dict[str, tuple[GraphEntry, Engine]]) -> None:
        self.directory = directory
        self.manifest = manifest
        self._selected = selected

    @property
    def engines(self) -> dict[str, Engine]:
        """Graph name -> its engine."""
        return {graph: engine for graph, (_, engine) in self._selected.items()}

    def entry(self, graph: str) -> GraphEntry:
        """The manifest entry each graph was loaded from."""
        return self._selected[graph][0]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph `graph` after checking its feeds against the manifest's ranges."""
        if graph not in self._selected:
            raise InputError(f"graph {graph!r} is not loaded; loaded: {sorted(self._selected)}")
        entry, engine = self._selected[graph]
        check_ranges(self.directory, entry, feeds)
        return engine.run(feeds)

    def terminate(self, thread: int | None = None) -> None:
        """Stop the engine calls in flight on `thread` (all, when None) where the backend can
        (`Engine.terminate`)."""
        for _, engine in self._selected.values():
            engine.terminate(thread)

    def close(self) -> None:
        """Close every engine (idempotent)."""
        for _, engine in self._selected.values():
            engine.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _missing_precision(directory: Path, graph: str, precision: str,
                       exported: list[GraphEntry]) -> str:
    """Why `graph` cannot run at `precision`: what it has, the exporter's reason where it
    kept the graph at another precision (an int8 export keeps a graph fp32 when int8 misses
    its parity gate), and the two ways out."""
    have = sorted({e.precision for e in exported})
    reasons = sorted({e.exporter["precision_choice"] for e in exported
                      if precision in e.exporter.get("precision_choice", "")})
    why = f"; the exporter's choice: {'; '.join(reasons)}" if reasons else ""
    return (f"{directory}: no {precision} entry for graph {graph!r} (has {have}{why}); export "
            f"that precision, or leave the precision unset (--precision, "
            f"EngineConfig.precision) to run each graph's first entry, the exporter's choice")


def _choose(directory: Path, graph: str, candidates: list[GraphEntry], backend: str | None,
            config: EngineConfig, host_info) -> tuple[GraphEntry, str | None]:
    """(entry, backend to open it with) for one graph, following ARCHITECTURE.md rule 5."""
    if config.precision is not None:
        exported, candidates = candidates, [e for e in candidates
                                            if e.precision == config.precision]
        if not candidates:
            raise BundleError(_missing_precision(directory, graph, config.precision, exported))
    if backend is None:  # the manifest's preferred entry, with the backend it names
        return candidates[0], candidates[0].backend
    if backend != registry.AUTO:
        matching = [e for e in candidates if e.backend == backend]
        if not matching:
            have = sorted({e.backend for e in candidates})
            hint = (f"; build engines with: rau-rt export trt --bundle {directory}"
                    if backend == "tensorrt" else "")
            raise BundleError(f"{directory}: graph {graph!r} has no {backend} entry (has "
                              f"{have}){hint}")
        return matching[0], backend
    trt = [e for e in candidates if e.backend == "tensorrt"]
    host = None
    if trt and registry.backend_class("tensorrt").available():
        try:
            host = host_info(config.device_index)
        except Exception as exc:  # a driver or CUDA library failing to answer
            log.warning("backend auto: %s: probing this host for TensorRT failed (%s: %s); "
                        "TensorRT skipped, trying the ONNX graph", graph, type(exc).__name__,
                        exc)
    if host is not None:
        fitting = [e for e in trt if _version_key(e.tools.get("tensorrt"))
                   == _version_key(host.get("tensorrt"))
                   and e.tools.get("compute_capability") == host.get("compute_capability")]
        if fitting:
            log.info("backend auto: %s: tensorrt (%s, engine built for this host)", graph,
                     fitting[0].file)
            return fitting[0], registry.AUTO  # the registry moves it to CUDA and logs it
        log.warning("backend auto: %s: TensorRT engines in %s were built for another host "
                    "(%s); skipped; rebuild with: %s", graph, directory, host,
                    rebuild_command(directory, trt[0]))
    onnx = [e for e in candidates if e.backend == "onnxruntime"]
    if not onnx:
        raise BundleError(f"{directory}: backend='auto' found no usable entry for {graph!r} "
                          f"(tensorrt missing or mismatched, no ONNX graph)")
    return onnx[0], registry.AUTO  # the registry picks CUDA or CPU for the ONNX file


def load_bundle(directory: str | Path, backend: str | None = None,
                config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
                graphs: Sequence[str] | None = None, host_info=None) -> Bundle:
    """Validate a bundle and open one engine per graph.

    Args:
        directory: The bundle directory.
        backend: A registered backend, "auto", or None for each graph's first manifest entry.
        config: Engine settings; `config.precision` selects among entries.
        graphs: Only these graphs (default: all).
        host_info: Returns {"tensorrt", "compute_capability"} for a device index; defaults to
            the TensorRT engine's probe (tests pass a stand-in).

    Raises:
        BundleError: no manifest, a missing or changed file, no entry for the request.
        EngineMismatchError: a TensorRT engine built for another TensorRT version or GPU.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_side_files(directory, manifest)
    if host_info is None:
        host_info = registry.backend_class("tensorrt").host_info
    names = list(graphs) if graphs is not None else manifest.graph_names
    selected: dict[str, tuple[GraphEntry, Engine]] = {}
    try:
        for graph in names:
            candidates = manifest.entries(graph)
            if not candidates:
                raise BundleError(f"{directory}: no graph {graph!r}; it has "
                                  f"{manifest.graph_names}")
            entry, chosen = _choose(directory, graph, candidates, backend, config, host_info)
            path = check_file(directory, entry)
            if entry.backend == "tensorrt":
                check_host(directory, entry, host_info(config.device_index))
            engine = registry.open_engine(path, chosen, config, precision=entry.precision)
            selected[graph] = (entry, engine)
            check_specs(directory, entry, engine)
    except BaseException:
        for _, engine in selected.values():
            engine.close()
        raise
    return Bundle(directory, manifest, selected)
