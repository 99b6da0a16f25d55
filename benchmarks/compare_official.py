"""Side-by-side CPU comparison of film_fast against the official TF2 FILM code.

The official code is not shipped with film_fast: clone google-research/frame-interpolation
yourself, and run this in an environment that has both TensorFlow (the official code was
checked with TF 2.15.1 and tensorflow-addons 0.23) and film_fast::

    pip install "tensorflow-cpu==2.15.1" "tensorflow-addons==0.23.0" gin-config
    python benchmarks/compare_official.py --official /path/to/frame-interpolation --size 512x512

Both models get the same random published-config weights (film_fast's, written into the
official Keras model by variable name) and the same inputs. Runs alternate in one process,
and the ratio of the median times is reported with the largest output difference. Each
framework keeps its own thread pool (2 threads each on a 2-core machine); TensorFlow's
allocator is its own, and film_fast's CPU malloc policy applies to the process as usual
(it does not change how TensorFlow allocates).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import film_fast
from film_fast import cpu_memory
from film_fast.checkpoints.naming import to_official


def build_official(path: str, height: int, width: int, threads: int):
    """The official film_net (published config) as a Keras model on NHWC inputs."""
    import tensorflow as tf  # noqa: PLC0415 (optional dependency)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    sys.path.insert(0, os.path.abspath(path))
    try:
        from models.film_net import interpolator, options  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    config = options.Options(pyramid_levels=7, fusion_pyramid_levels=5, specialized_levels=3,
                             flow_convs=[3, 3, 3, 3], flow_filters=[32, 64, 128, 256],
                             sub_levels=4, filters=64, use_aux_outputs=False)
    x0 = tf.keras.Input(shape=(height, width, 3), batch_size=1, name="x0")
    x1 = tf.keras.Input(shape=(height, width, 3), batch_size=1, name="x1")
    t = tf.keras.Input(shape=(1,), batch_size=1, name="time")
    return tf, interpolator.create_model(x0, x1, t, config)


def load_weights(model, variables: dict) -> int:
    """Assigns ``{official name: HWIO array}`` to the Keras model's variables by name."""
    by_name = {v.name.split(":")[0]: v for v in model.weights}
    missing = sorted(set(variables) - set(by_name))
    if missing or len(by_name) != len(variables):
        raise SystemExit(f"official model variables do not match film_fast's: missing {missing[:3]}, "
                         f"{len(by_name)} in the model vs {len(variables)} given")
    for name, value in variables.items():
        by_name[name].assign(value)
    return len(variables)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="path of a frame-interpolation checkout")
    p.add_argument("--size", default="512x512", help="HxW (multiples of 64)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    threads = torch.get_num_threads()
    malloc = cpu_memory.ensure()

    torch.manual_seed(0)
    ours = film_fast.FILM().eval()
    tf, official = build_official(args.official, h, w, threads)
    n = load_weights(official, to_official(ours.state_dict()))

    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, h, w, generator=gen)
    x1 = torch.rand(1, 3, h, w, generator=gen)
    feed = {"x0": tf.constant(x0.permute(0, 2, 3, 1).numpy()),
            "x1": tf.constant(x1.permute(0, 2, 3, 1).numpy()),
            "time": tf.constant(np.full((1, 1), 0.5, np.float32))}
    run_official = tf.function(lambda inputs: official(inputs, training=False)["image"])

    def official_frame():
        return run_official(feed).numpy()

    with torch.inference_mode():
        want = official_frame()
        got = ours(x0, x1, 0.5).permute(0, 2, 3, 1).numpy()
        t_off, t_ours = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            official_frame()
            t_off.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours(x0, x1, 0.5)
            t_ours.append(time.perf_counter() - t0)
    diff = float(np.abs(want - got).max())
    result = {"size": [h, w], "device": "cpu", "threads": threads, "cpu_malloc": malloc,
              "tensorflow": tf.__version__, "torch": torch.__version__, "variables": n,
              "official_s": statistics.median(t_off), "film_fast_s": statistics.median(t_ours),
              "speedup": statistics.median(t_off) / statistics.median(t_ours),
              "max_abs_diff": diff, "official_times_s": t_off, "film_fast_times_s": t_ours}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
