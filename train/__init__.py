"""Training of the demo models on the project's synthetic angiography (`rau-rt train`).

Installed as `rau_rt.train`, beside `rau_rt.export` and on the same layer (torch side): it
imports core, `rau_rt.synthetic` and the exporter's model builders, and only the CLI imports it.
The runtime never does. The models it trains stay plain: a SAM2 checkpoint is sam2's own
`{"model": state_dict}` that `rau-rt export sam2 --checkpoint` and `SAM2VideoPredictor` load.

Seeds: training clips draw generator seeds from `TRAIN_SEEDS`, validation from
`VALIDATION_SEEDS`; the accuracy benchmark's held-out cines use seeds below 10,000
(`benchmarks/bench_accuracy.py`), which training never touches.
"""

TRAIN_SEEDS = range(10_000_000, 2**31 - 1)
VALIDATION_SEEDS = range(9_000_000, 9_000_100)
HELD_OUT_SEEDS = range(0, 10_000)
