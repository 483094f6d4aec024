"""`rau-rt export vlm --precision fp16`: GPU graphs converted from fp32, checked on ORT CPU.

Tiny random-init Qwen2.5-VL and Qwen3-VL at 224 px. The conversion keeps norms, Softmax and
the rotary embedding fp32 and the KV cache float16; the runtime casts its feeds to what each
graph declares, so the same decode loop drives fp32 and fp16 bundles.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rau_rt import cli
from rau_rt.bundle import load_bundle, read_manifest
from rau_rt.config import EngineConfig
from rau_rt.errors import ShapeError
from rau_rt.export.verify import VLM_GRAPH_TOLERANCES, VLM_MIN_LOGIT_COSINE
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.localization import Decoder
from rau_rt.vlm_layout import DECODER, EMBED, VISION, cast_feeds, read_layout

pytest.importorskip("torch")
pytest.importorskip("transformers")

INPUT = 224
FLOAT16 = onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def bundle_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / request.param
    assert cli.main(["export", "vlm", "--random-init", "tiny", "--family", request.param,
                     "--input-size", str(INPUT), "--precision", "fp16", "--keep-reference",
                     "--out", str(out), "--json"]) == 0
    return out


def test_manifest_prefers_fp16_and_records_its_drift(bundle_dir):
    manifest = read_manifest(bundle_dir)
    for graph in (VISION, EMBED, DECODER):
        fp16, fp32 = manifest.entries(graph)[:2]
        assert (fp16.precision, fp32.precision) == ("fp16", "fp32")
        assert fp16.parity["passed"] and fp16.parity["reference_graph"] == fp32.file
        assert fp16.parity["conversion"]["kept_fp32_ops"] == "LayerNormalization,Softmax"
    gate = VLM_GRAPH_TOLERANCES["fp16"].min_cosine
    for graph in (VISION, EMBED):
        parity = manifest.entries(graph)[0].parity
        assert parity["verified_on"] == "onnxruntime CPUExecutionProvider"
        assert all(o["cosine"] >= gate for o in parity["outputs"].values())
        assert all(o["max_abs"] > 0 for o in parity["outputs"].values())  # really fp16
    drift = manifest.entries(DECODER)[0].parity
    assert drift["prefill_logits_cosine"] >= VLM_MIN_LOGIT_COSINE["fp16"]
    assert 0 < drift["prefill_logits_max_abs"] < 0.1 and drift["top1_agreement"] >= 0.9
    assert drift["positions"] == 24


def test_kv_cache_is_float16_and_the_rest_of_the_boundary_float32(bundle_dir):
    layout = read_layout(bundle_dir)
    entry = read_manifest(bundle_dir).entries(DECODER)[0]
    dtypes = {s.name: s.dtype for s in (*entry.inputs, *entry.outputs)}
    for name in (*layout.past_names, *layout.present_names):
        assert dtypes[name] == "float16", name
    assert dtypes["inputs_embeds"] == dtypes["logits"] == "float32"
    if layout.deepstack_layers:
        assert dtypes["deepstack_embeds"] == "float32"


def test_sensitive_ops_stay_fp32_and_weights_are_fp16(bundle_dir):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle_dir
                                                           / "vlm_decoder.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info,
                                                            *model.graph.output)}
    nodes = model.graph.node
    kept = [n for n in nodes if n.op_type in ("Softmax", "ReduceMean", "Pow", "Cos", "Sin")]
    assert kept and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in kept)
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    assert sum(types.get(n.output[0]) == FLOAT16 for n in matmuls) > len(matmuls) // 2
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == FLOAT16 for i in weights)


def test_runtime_decodes_the_fp16_bundle_like_the_fp32_one(bundle_dir):
    layout = read_layout(bundle_dir)
    images = vlm_verify.sample_images(layout.input_size)
    ids, patches = vlm_verify.runtime_inputs(images, layout, bundle_dir / "tokenizer.json")
    fp32_tokens = read_manifest(bundle_dir).entries(DECODER)[1].parity["end_to_end"]["tokens"]
    with load_bundle(bundle_dir) as bundle:  # the preferred entries: fp16
        assert bundle.entry(DECODER).precision == "fp16"
        decoder = Decoder(bundle, layout)
        assert decoder.empty_cache().past[layout.past_names[0]].dtype == np.float16
        ours = decoder.generate(ids, decoder.image_features(patches), max_new_tokens=12,
                                min_new_tokens=12)
        assert len(ours.tokens) == 12
        # with uncast float32 feeds the engine refuses the fp16 cache: casting is what runs
        feeds = {"inputs_embeds": np.zeros((1, 1, layout.hidden_size), np.float32),
                 "attention_mask": np.ones((1, 1), np.int64),
                 "position_ids": np.zeros((3, 1, 1), np.int64),
                 **layout.no_deepstack(1, 1), **layout.empty_past(1)}
        with pytest.raises(ShapeError, match="float16"):
            bundle.run(DECODER, feeds)
        dtypes = {s.name: s.dtype for s in bundle.entry(DECODER).inputs}
        bundle.run(DECODER, cast_feeds(feeds, dtypes))
    # free-running, one near tie flipped by fp16 sends the rest elsewhere (the manifest's
    # teacher-forced top-1 agreement is the drift measure); the path starts the same
    assert list(ours.tokens[:3]) == fp32_tokens[:3]


def test_fp32_bundle_still_loads_by_precision(bundle_dir):
    with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as bundle:
        assert Decoder(bundle, read_layout(bundle_dir)).empty_cache().past[
            "past_key_values.0.key"].dtype == np.float32
