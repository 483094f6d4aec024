"""The central localizer: wire format, service and Triton model repository in process, then a
real PyTriton server on loopback, started and stopped here, driven through the client.

The server runs from its own environment (PyTriton 0.7 needs numpy < 2): `.ci/run` creates
it with `rau-rt serve-localizer --make-env .venv-server`; without it the server tests skip,
naming that command, and the in-process tests above them run the same service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.errors import InputError, ServerUnavailableError
from rau_rt.localization import Localizer, LocalizerWorker, prompts, wire
from rau_rt.localization.remote import RemoteConfig, RemoteLocalizer, is_remote
from rau_rt.pipeline import KeyframeConfig, PipelineConfig, open_pipeline
from rau_rt.reference import Reference
from rau_rt.serving import environment, repository
from rau_rt.serving.process import ServerProcess, free_ports
from rau_rt.serving.server import READY_LINE
from rau_rt.serving.service import STALE, UNKNOWN_REFERENCE, LocalizerService, ServiceConfig
from rau_rt.serving.service import _round_robin as round_robin
from rau_rt.synthetic import generate_sequence
from rau_rt.synthetic import make_reference as synthetic_reference
from rau_rt.types import Frame, Region

INPUT = 112
ROOT = Path(__file__).resolve().parents[1]


def make_reference(seed: int = 0, size=(INPUT, INPUT), gray: bool = False) -> Reference:
    rng = np.random.default_rng(seed)
    shape = size if gray else (*size, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = np.zeros(size, bool)
    mask[size[0] // 4:size[0] // 2, size[1] // 3:size[1] - 5] = True
    return Reference(image, (Region("lad", box=(10, 20, 100, 90)),
                             Region("lcx", polygon=((30.5, 40), (100, 60), (60, 100))),
                             Region("rca", mask=mask)), name=f"ref{seed}")


def make_frame(seed: int, size=(INPUT, INPUT)) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from rau_rt.export import vlm
    from rau_rt.export.vlm import model as vlm_model

    root = tmp_path_factory.mktemp("serving")
    model = vlm_model.build_random(root / "model", "tiny")
    vlm.export_vlm(vlm.VlmExportConfig(out=root / "bundle", model=model, input_size=INPUT))
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as loaded:
        yield loaded


# -- wire format ------------------------------------------------------------------------------
@pytest.mark.parametrize("gray", [False, True])
def test_a_reference_survives_the_wire(gray):
    reference = make_reference(3, size=(60, 90), gray=gray)
    request, data = wire.encode_reference(reference)
    back, annotated = wire.decode_reference(request, data)
    np.testing.assert_array_equal(annotated, prompts.annotated_image(reference))
    assert back.name == reference.name and back.channel_order == reference.channel_order
    np.testing.assert_array_equal(back.image, reference.image)
    for a, b in zip(back.regions, reference.regions, strict=True):
        assert (a.name, a.box, a.polygon) == (b.name, b.box, b.polygon)
        assert (a.mask is None) == (b.mask is None)
        if a.mask is not None:
            np.testing.assert_array_equal(a.mask, b.mask)
    # the id is the content's: the same reference, the same id; another region, another id
    assert wire.reference_id(request, data) == wire.reference_id(*wire.encode_reference(back))
    other = Reference(reference.image, reference.regions[:2], name=reference.name)
    assert wire.reference_id(*wire.encode_reference(other)) != wire.reference_id(request, data)


def test_a_frame_keeps_its_depth_and_window():
    image = np.random.default_rng(0).integers(0, 4096, (40, 50), dtype=np.uint16)
    frame = Frame(7, 0.5, image, "gray", 12, (2000.0, 1500.0))
    request, data = wire.encode_frame(frame, "abc", ["lad"], stream="s1", deadline_unix_s=5.0)
    header = wire.read_header(request)
    assert (header["op"], header["reference_id"], header["regions"], header["stream"],
            header["deadline_unix_s"]) == ("locate", "abc", ["lad"], "s1", 5.0)
    back = wire.decode_frame(header, data)
    np.testing.assert_array_equal(back.image, image)
    assert (back.channel_order, back.bits_stored, back.window) == ("gray", 12, (2000.0, 1500.0))


def _locate_header(**image) -> np.ndarray:
    header = {"protocol": wire.PROTOCOL, "op": "locate", "reference_id": "x",
              "channel_order": "gray", "bits_stored": 8, **image}
    return np.array([json.dumps(header).encode()], dtype=object)


@pytest.mark.parametrize("request_, data, message", [
    (np.array([b"\x00\xffnot json"], dtype=object), np.zeros(4, np.uint8), "not a JSON header"),
    (np.array([b'{"protocol": 99, "op": "locate"}'], dtype=object), np.zeros(4, np.uint8),
     "protocol 99"),
    (np.array([b'{"protocol": 1, "op": "delete"}'], dtype=object), np.zeros(4, np.uint8),
     "op must be one of"),
    (_locate_header(image={"shape": [4, 4], "dtype": "float32"}), np.zeros(64, np.uint8),
     "dtype must be one of"),
    (_locate_header(image={"shape": [4, 4, 4], "dtype": "uint8"}), np.zeros(64, np.uint8),
     "shape must be"),
    (_locate_header(image={"shape": [4, 4], "dtype": "uint16"}), np.zeros(16, np.uint8),
     "needs 32 bytes"),
    (_locate_header(image={"shape": [4, 4], "dtype": "uint8"}), np.zeros(20, np.uint8),
     "the image needs 16"),
    (_locate_header(image={"shape": [8193, 2], "dtype": "uint8"}), np.zeros(2, np.uint8),
     "1 to 8192 pixels a side"),
])
def test_malformed_requests_are_input_errors(request_, data, message):
    with pytest.raises(InputError, match=message):
        wire.decode_frame(wire.read_header(request_), data)


def test_a_truncated_reference_mask_is_an_input_error():
    request, data = wire.encode_reference(make_reference())
    with pytest.raises(InputError, match="mask"):
        wire.decode_reference(request, data[:-3])


def test_an_annotated_rendering_of_another_size_is_an_input_error(bundle):
    reference = make_reference()
    with pytest.raises(InputError, match="annotated"):
        wire.decode_reference(*wire.encode_reference(reference, np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InputError, match="annotated"):
        Localizer(bundle, reference, annotated=np.zeros((*reference.size, 3), np.uint16))


# -- the service (what the server runs), in process -------------------------------------------
def test_service_answers_as_the_local_localizer(bundle):
    reference, frame = make_reference(), make_frame(0)
    service = LocalizerService(bundle)
    registered = service.register(*wire.encode_reference(reference))
    assert registered["regions"] == ["lad", "lcx", "rca"] and not registered["known"]
    assert service.register(*wire.encode_reference(reference))["known"]  # kept, not rebuilt
    ref_id = registered["reference_id"]
    [answer] = service.answer([wire.encode_frame(frame, ref_id, ["lcx", "lad"])])
    local = Localizer(bundle, reference).locate_result(frame, ["lcx", "lad"])
    result = wire.result_from_payload(answer)
    assert (result.text, dict(result.boxes), result.generated_tokens) == (
        local.text, dict(local.boxes), local.generated_tokens)
    assert answer["server_ms"]["compute"] > 0


def test_service_answers_errors_per_request_and_keeps_serving(bundle):
    now = [1000.0]
    service = LocalizerService(bundle, clock=lambda: now[0])
    ref_id = service.register(*wire.encode_reference(make_reference()))["reference_id"]
    frame = make_frame(1)
    answers = service.answer([
        wire.encode_frame(frame, "0" * 64, None),  # never registered
        wire.encode_frame(frame, ref_id, None, deadline_unix_s=999.0),  # already stale
        wire.encode_frame(frame, ref_id, ["nope"]),
        (np.array([b"garbage"], dtype=object), np.zeros(3, np.uint8)),
        wire.encode_frame(frame.astype(np.float32), ref_id, None),
        wire.encode_frame(frame, ref_id, None, deadline_unix_s=1001.0),
    ])
    kinds = [a.get("error", {}).get("type") for a in answers]
    assert kinds == [UNKNOWN_REFERENCE, STALE, "InputError", "InputError", "InputError", None]
    assert "not on the reference" in answers[2]["error"]["message"]
    assert set(answers[5]["boxes"]) == {"lad", "lcx", "rca"}
    assert service.counts["answered"] == 1 and service.counts[STALE] == 1


def test_service_evicts_the_least_recently_used_reference(bundle):
    service = LocalizerService(bundle, ServiceConfig(max_references=2))
    ids = [service.register(*wire.encode_reference(make_reference(s)))["reference_id"]
           for s in range(2)]
    service.answer([wire.encode_frame(make_frame(0), ids[0], ["lad"])])  # ids[0] used last
    third = service.register(*wire.encode_reference(make_reference(2)))["reference_id"]
    assert service.reference_ids == (ids[0], third) and service.counts["evicted"] == 1
    [answer] = service.answer([wire.encode_frame(make_frame(0), ids[1], ["lad"])])
    assert answer["error"]["type"] == UNKNOWN_REFERENCE


def test_a_batch_is_served_round_robin_by_stream():
    assert round_robin(["a", "a", "a", "b", "c", "b"]) == [0, 3, 4, 1, 5, 2]
    assert round_robin([]) == []


def test_service_config_and_client_config_reject_bad_bounds():
    with pytest.raises(InputError, match="max_references"):
        ServiceConfig(max_references=0)
    with pytest.raises(InputError, match="timeout_s"):
        RemoteConfig(timeout_s=0)
    with pytest.raises(InputError, match="triton://"):
        RemoteLocalizer("http://127.0.0.1:8000", make_reference())
    assert is_remote("triton://h:1") and is_remote("triton+grpc://h") and not is_remote("h:1")


# -- the generated Triton model repository ----------------------------------------------------
def test_triton_repository_serves_the_same_model(bundle_dir, bundle, tmp_path, monkeypatch):
    out = tmp_path / "repo"
    written = repository.write_repository(bundle_dir, out, repository.RepositoryConfig(
        max_batch=4, max_references=5, copy_bundle=True))
    model = out / wire.MODEL
    assert {p.relative_to(out).as_posix() for p in written} == {
        f"{wire.MODEL}/config.pbtxt", f"{wire.MODEL}/1/model.py", f"{wire.MODEL}/bundle"}
    config = (model / "config.pbtxt").read_text()
    for line in (f'name: "{wire.MODEL}"', 'backend: "python"', "max_batch_size: 4",
                 '{ name: "request" data_type: TYPE_STRING dims: [ 1 ] }',
                 '{ name: "data" data_type: TYPE_UINT8 dims: [ -1 ] }',
                 '{ name: "response" data_type: TYPE_STRING dims: [ 1 ] }',
                 "instance_group [ { count: 1 kind: KIND_CPU } ]",
                 "dynamic_batching { max_queue_delay_microseconds: 2000 }",
                 '{ key: "bundle" value: { string_value: "bundle" } }',
                 '{ key: "max_references" value: { string_value: "5" } }'):
        assert line in config
    assert (model / "bundle" / "manifest.json").exists()
    with pytest.raises(InputError, match="exists"):
        repository.write_repository(bundle_dir, out)

    # the Python backend's model, under a stand-in for the stub's triton_python_backend_utils
    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class Response:
        def __init__(self, output_tensors):
            self.output_tensors = output_tensors

    utils = types.SimpleNamespace(
        Tensor=Tensor, InferenceResponse=Response,
        get_input_tensor_by_name=lambda request, name: request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    namespace: dict[str, object] = {}
    exec((model / "1" / "model.py").read_text(), namespace)
    triton_model = namespace["TritonPythonModel"]()
    parameters = {k: {"string_value": v} for k, v in (("bundle", "bundle"),
                                                      ("max_references", "5"))}
    triton_model.initialize({"model_config": json.dumps({"parameters": parameters}),
                             "model_repository": str(model), "model_version": "1"})
    reference, frame = make_reference(), make_frame(2)
    request = dict(zip(("request", "data"), wire.encode_reference(reference), strict=True))
    [registered] = triton_model.execute([{k: Tensor(k, v[None]) for k, v in request.items()}])
    ref_id = wire.decode_response(registered.output_tensors[0].array)["reference_id"]
    query = dict(zip(("request", "data"), wire.encode_frame(frame, ref_id, None), strict=True))
    [answer] = triton_model.execute([{k: Tensor(k, v[None]) for k, v in query.items()}])
    triton_model.finalize()
    result = wire.result_from_payload(wire.decode_response(answer.output_tensors[0].array))
    assert result.text == Localizer(bundle, reference).locate_result(frame).text


# -- a real server ------------------------------------------------------------------------------
def server_env() -> Path | None:
    for candidate in (os.environ.get(environment.ENV_VARIABLE), ROOT / environment.DEFAULT_ENV):
        if candidate and environment.env_python(candidate).exists():
            return Path(candidate)
    return None


needs_server = pytest.mark.skipif(
    server_env() is None, reason="no server environment: create it with `rau-rt "
    "serve-localizer --make-env .venv-server` (.ci/run does); the service's CPU twin runs in "
    "tests/test_serving.py")


def make_server(bundle_dir, workspace) -> ServerProcess:
    return ServerProcess(bundle_dir, server_env(), workspace, ["--threads", "1"])


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    running = make_server(bundle_dir, tmp_path_factory.mktemp("triton"))
    running.start()
    yield running
    running.stop()


@needs_server
@pytest.mark.parametrize("scheme", ["triton", "triton+grpc"])
def test_server_answers_as_the_local_localizer(server, bundle, scheme):
    reference = make_reference(0)
    port = server.http if scheme == "triton" else server.grpc
    client = RemoteLocalizer(f"{scheme}://127.0.0.1:{port}", reference)
    local = Localizer(bundle, reference)
    for seed in range(2):
        frame = make_frame(seed)
        remote, expected = client.locate_result(frame), local.locate_result(frame)
        assert (remote.text, dict(remote.boxes), remote.generated_tokens) == (
            expected.text, dict(expected.boxes), expected.generated_tokens)
        assert remote.timings_ms["total"] >= remote.timings_ms["network"] >= 0
    client.close()


@needs_server
def test_four_concurrent_streams_are_isolated(server, bundle):
    references = [make_reference(s) for s in range(4)]
    frames = [make_frame(s) for s in range(3)]
    expected = [[Localizer(bundle, r).locate_result(f).text for f in frames]
                for r in references]
    clients = [RemoteLocalizer(server.url, r, RemoteConfig(stream=f"tower{n}"))
               for n, r in enumerate(references)]
    got: list[list[str | None]] = [[None] * len(frames) for _ in clients]

    def stream(n):
        for k, frame in enumerate(frames):
            got[n][k] = clients[n].locate_result(frame).text

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert len({c.reference_id for c in clients}) == 4


@needs_server
def test_bad_requests_get_typed_errors_and_the_server_stays_up(server):
    reference = make_reference(0)
    client = RemoteLocalizer(server.url, reference)
    with pytest.raises(InputError, match="dtype must be one of"):
        client.locate_result(make_frame(0).astype(np.float32))
    with pytest.raises(InputError, match="shape must be"):
        client.locate_result(np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(InputError, match="8192 pixels a side"):
        client.locate_result(np.zeros((8200, 8), np.uint8))
    with pytest.raises(InputError, match="not on the reference"):
        client.locate_result(make_frame(0), ["no such region"])
    # garbage and an unknown id, below the client (which never sends either)
    header = np.array([b"\x89PNG garbage"], dtype=object)
    assert client._call((header, np.zeros(5, np.uint8)))["error"]["type"] == "InputError"
    unknown = wire.encode_frame(make_frame(0), "f" * 64, None)
    assert client._call(unknown)["error"]["type"] == "UnknownReference"
    assert set(client.locate(make_frame(0))) == {"lad", "lcx", "rca"}  # still serving
    client.close()


@needs_server
def test_a_server_lost_mid_stream_is_survived_and_reported(bundle_dir, micro_bundle,
                                                           tmp_path):
    pipeline_dir = tmp_path / "pipeline"
    pipeline_dir.mkdir()
    (pipeline_dir / "sam2").symlink_to(micro_bundle.directory)
    sequence = generate_sequence(seed=4, frames=20, size=256, contrast_delay_frames=1,
                                 segments=("6", "7"))
    still = synthetic_reference(seed=4, size=256, segments=("6", "7"))
    reference = Reference(still.image_8bit(), still.regions, name="synthetic")
    server = make_server(bundle_dir, tmp_path / "triton")
    server.start()
    config = PipelineConfig(KeyframeConfig(every=2), wait_for_localizer=True,
                            localizer_timeout_s=8.0)
    results = []
    with open_pipeline(pipeline_dir, reference, config=config,
                       localizer=server.url) as pipeline:
        for i in range(20):
            if i == 6:
                server.kill()
            if i == 12:
                server.start()
            results.append(pipeline.process(Frame(i, i / 15, sequence.frames[i], "gray", 12)))
        health = pipeline.workers[0].localizer.health()
        stats = pipeline.stats
    server.stop()
    assert [r.index for r in results] == list(range(20))  # tracking never stopped
    assert all(set(r.regions) == {"6", "7"} for r in results)
    counts = (health["lost"], health["recovered"], health["registrations"])
    assert counts == (1, 1, 2), health["outages"]
    assert health["online"] and health["outages"][0]["gap_s"] > 0
    failed = [frame for frame, _ in stats.localizer_errors]
    assert failed and all(6 <= f < 13 for f in failed), stats.localizer_errors
    assert any(frame >= 12 for frame, _, _ in stats.answers)  # answered again after restart


def test_an_unreachable_server_fails_fast_and_typed():
    [port] = free_ports(1)
    with pytest.raises(ServerUnavailableError, match="unreachable after 2 tries"):
        RemoteLocalizer(f"triton://127.0.0.1:{port}", make_reference(0),
                        RemoteConfig(timeout_s=2.0, retries=1, backoff_s=0.05))


@needs_server
def test_a_worker_over_a_remote_localizer_keeps_the_tracker_free(server):
    with LocalizerWorker(RemoteLocalizer(server.url, make_reference(1)), timeout_s=30) as worker:
        started = time.perf_counter()
        worker.submit(0, make_frame(0))
        submitted_ms = (time.perf_counter() - started) * 1e3
        result = worker.wait(60)
    assert submitted_ms < 50 and result is not None and result.ok


def test_serve_localizer_binds_loopback_unless_told_otherwise(capsys):
    from rau_rt.cli import main
    from rau_rt.commands.serve import _forwarded
    from rau_rt.serving.server import check_bind

    assert main(["serve-localizer", "--bundle", "b", "--host", "10.1.2.3"]) == 1
    assert "--allow-remote" in capsys.readouterr().err
    with pytest.raises(InputError, match="expected an IP address"):
        check_bind("server.example", allow_remote=True)
    check_bind("127.0.0.1", allow_remote=False)
    check_bind("::1", allow_remote=False)
    # what the launcher hands to the server environment: everything but its own --env
    assert _forwarded(["serve-localizer", "--env", "e", "--bundle", "b", "--env=x", "--port",
                       "9"]) == ["--bundle", "b", "--port", "9"]


@needs_server
def test_serve_localizer_runs_the_server_from_its_environment(bundle_dir, tmp_path):
    [http, grpc, metrics] = free_ports(3)
    command = [sys.executable, "-m", "rau_rt", "serve-localizer", "--env", str(server_env()),
               "--bundle", str(bundle_dir), "--port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--workspace", str(tmp_path / "w")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if READY_LINE in line:
                break
        else:
            pytest.fail("serve-localizer ended without serving")
        client = RemoteLocalizer(f"triton://127.0.0.1:{http}", make_reference(0))
        assert set(client.locate(make_frame(0))) == {"lad", "lcx", "rca"}
        client.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server stops its tritonserver
        process.wait(60)
        process.stdout.close()


@needs_server
def test_rau_rt_run_with_a_central_localizer_records_it(server, micro_bundle, tmp_path, capsys):
    import cv2

    from rau_rt.cli import main
    from rau_rt.io.annotations import write_reference_annotation
    from rau_rt.synthetic import formats

    pipeline_dir = tmp_path / "bundle"
    pipeline_dir.mkdir()
    (pipeline_dir / "sam2").symlink_to(micro_bundle.directory)  # no vlm/: the server's
    still = synthetic_reference(seed=3, size=256, segments=("6", "7"))
    cv2.imwrite(str(tmp_path / "reference.png"), still.image_8bit())
    write_reference_annotation(tmp_path / "reference.json", "reference.png", (256, 256),
                               still.regions)
    cine = generate_sequence(seed=3, frames=6, size=256, segments=("6", "7"))
    formats.write_video(tmp_path / "cine.mkv", cine.frames, 15.0)
    out = tmp_path / "out"
    code = main(["run", "--bundle", str(pipeline_dir), "--reference",
                 str(tmp_path / "reference.json"), "--source", str(tmp_path / "cine.mkv"),
                 "--out", str(out), "--keyframe-every", "2", "--localizer", server.url,
                 "--no-overlay", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    [service] = summary["localizer_service"]
    assert service["url"] == server.url and service["online"] and service["lost"] == 0
    assert [a["frame"] for a in summary["pipeline"]["answers"]] == [0, 2, 4]
    assert "vlm" not in summary["engines"]  # no local VLM was loaded
