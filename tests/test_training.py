"""Training pipeline: data sources, augmentations, synthetic motion, config, exact resume, CLI,
and the kernels' backward passes inside a training step."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch

import film_fast
from film_fast import cli
from film_fast.training import config as config_lib
from film_fast.training.data import (Augment, DataError, TripletSampler, VideoTriplets,
                                     VimeoTriplets, sample_rng)
from film_fast.training.synthetic import Layer, SceneGenerator, render_layers
from film_fast.training.trainer import (Trainer, TrainingError, learning_rate, list_checkpoints,
                                        load_checkpoint)

TINY_MODEL = {"pyramid_levels": 3, "fusion_pyramid_levels": 3, "specialized_levels": 1,
              "sub_levels": 2, "flow_convs": [1, 1], "flow_filters": [4, 4], "filters": 4}


def _pattern(h, w, shift=0, seed=0):
    """An [H, W, 3] uint8 textured frame; ``shift`` moves it right by that many pixels."""
    g = torch.Generator().manual_seed(seed)
    # Smooth texture (noise on a 6 px grid, bilinearly enlarged): shifts are ordinary motion,
    # not a scene cut, for the cut detector's 64-pixel thumbnails.
    coarse = torch.rand(1, 3, h // 6 + 2, (w + 64) // 6 + 2, generator=g)
    base = torch.nn.functional.interpolate(coarse, size=(h, w + 64), mode="bilinear",
                                           align_corners=False)[0]
    base = (base * 255).round().to(torch.uint8).permute(1, 2, 0)
    return base[:, 32 - shift:32 - shift + w].contiguous()


def _write_video(path, frames, fps=25):
    av = pytest.importorskip("av")
    with av.open(path, "w") as out:
        s = out.add_stream("libx264rgb" if "libx264rgb" in av.codecs_available else "libx264", rate=fps)
        s.width, s.height = frames[0].shape[1], frames[0].shape[0]
        s.pix_fmt = "rgb24" if s.codec_context.name == "libx264rgb" else "yuv444p"
        s.options = {"crf": "0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f.numpy(), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="module")
def frame_folder(tmp_path_factory):
    """12 frames of a texture moving 2 px per frame, then a cut to 6 frames of another scene."""
    root = tmp_path_factory.mktemp("clip")
    from film_fast.imageio import write_image
    frames = [_pattern(40, 48, 2 * k) for k in range(12)] + \
             [_pattern(40, 48, k, seed=7).flip(0).mul(0).add(200) for k in range(6)]
    for k, f in enumerate(frames):
        write_image(str(root / f"f{k}.png"), f.permute(2, 0, 1).float() / 255)
    return str(root), frames


# ---- data --------------------------------------------------------------------------------------
def test_video_triplets_strides_and_cuts(frame_folder):
    root, frames = frame_folder
    src = VideoTriplets([root], strides=(1, 2))
    # stride 1: 16 triplets in 18 frames, minus the 2 that span the cut (i = 10, 11);
    # stride 2: 14, minus the 4 spanning it (i = 8..11).
    assert len(src) == (16 - 2) + (14 - 4)
    assert src.skipped_cuts == 6
    x0, y, x1 = src.get(0, sample_rng(0, 0, 0))
    assert torch.equal((x0 * 255).round().to(torch.uint8).permute(1, 2, 0), frames[0])
    assert torch.equal((y * 255).round().to(torch.uint8).permute(1, 2, 0), frames[1])
    held_out = VideoTriplets([root], strides=(1,), frame_range=(0.5, 1.0))
    assert len(held_out) < len(src)


def test_video_triplets_from_mp4(tmp_path):
    frames = [_pattern(32, 48, k) for k in range(7)]
    path = str(tmp_path / "clip.mp4")
    _write_video(path, frames)
    src = VideoTriplets([str(tmp_path)], strides=(1, 3))
    assert len(src) == 5 + 1
    x0, y, x1 = src.get(5, sample_rng(0, 0, 0))  # the stride-3 triplet: frames 0, 3, 6
    assert x0.shape == (3, 32, 48)
    # Lossless (crf 0) apart from colour conversion: within a few levels of the source frames.
    assert (x1 * 255 - frames[6].permute(2, 0, 1).float()).abs().mean() < 3


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        VideoTriplets([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no videos or frame folders"):
        VideoTriplets([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="tri_trainlist.txt"):
        VimeoTriplets(str(tmp_path))
    with pytest.raises(DataError, match="unknown augmentation"):
        Augment(["random_zoom"])


def test_vimeo_layout(tmp_path):
    from film_fast.imageio import write_image
    for name in ("00001/0001", "00001/0002"):
        d = tmp_path / "sequences" / name
        d.mkdir(parents=True)
        for k in (1, 2, 3):
            write_image(str(d / f"im{k}.png"), torch.full((3, 16, 24), k / 4))
    (tmp_path / "tri_trainlist.txt").write_text("00001/0001\n00001/0002\n\n")
    src = VimeoTriplets(str(tmp_path))
    assert len(src) == 2
    x0, y, x1 = src.get(1, sample_rng(0, 0, 0))
    assert abs(float(y.mean()) - 0.5) < 1 / 255 and abs(float(x1.mean()) - 0.75) < 1 / 255


def test_crop_without_resampling_is_a_slice():
    g = torch.Generator().manual_seed(3)
    trip = tuple(torch.rand(3, 30, 40, generator=g) for _ in range(3))
    stack = Augment([]).crop(trip, 16, np.random.default_rng(5))
    found = [(r, c) for r in range(15) for c in range(25)
             if torch.equal(stack[0], trip[0][:, r:r + 16, c:c + 16])]
    assert len(found) == 1
    r, c = found[0]
    assert torch.equal(stack[1], trip[1][:, r:r + 16, c:c + 16])
    assert torch.equal(stack[2], trip[2][:, r:r + 16, c:c + 16])


def test_augmentations_exact():
    stack = torch.rand(3, 3, 8, 8)
    aug = Augment(["random_image_rot90", "random_flip", "random_reverse"])
    outs = [aug.apply(stack, np.random.default_rng(s)) for s in range(40)]
    reversed_seen = False
    for out in outs:
        # The middle frame never moves in time; the outer ones are swapped together or not at all.
        mid_ok = any(torch.equal(out[1], cand) for cand in _dihedral(stack[1]))
        assert mid_ok
        if any(torch.equal(out[0], cand) for cand in _dihedral(stack[2])):
            reversed_seen = True
            assert any(torch.equal(out[2], cand) for cand in _dihedral(stack[0]))
    assert reversed_seen


def _dihedral(img):
    out = []
    for k in range(4):
        r = torch.rot90(img, k, dims=(-2, -1))
        out += [r, torch.flip(r, dims=(-1,))]
    return out


def test_rotation_and_scale_crop_shapes():
    trip = tuple(torch.rand(3, 50, 70) for _ in range(3))
    aug = Augment(["random_rotate", "random_scale"], max_degrees=45, min_scale=0.5)
    for seed in range(10):
        out = aug.crop(trip, 24, np.random.default_rng(seed))
        assert out.shape == (3, 3, 24, 24)
        assert out.min() >= 0 and out.max() <= 1  # no zero-filled corners pulled below the data
    small = tuple(torch.rand(3, 12, 14) for _ in range(3))  # smaller than the crop: enlarged
    assert aug.crop(small, 24, np.random.default_rng(0)).shape == (3, 3, 24, 24)


def test_sampler_is_a_function_of_seed_and_step(frame_folder):
    root, _ = frame_folder
    video = VideoTriplets([root])
    syn_src = __import__("film_fast.training.data", fromlist=["SyntheticMotion"]).SyntheticMotion(
        video.all_frames(), 32, max_motion=12)
    aug = Augment(["random_image_rot90", "random_flip", "random_rotate", "random_reverse"])
    s1 = TripletSampler([(video, 1.0), (syn_src, 1.0)], 32, 4, aug, seed=11)
    s2 = TripletSampler([(video, 1.0), (syn_src, 1.0)], 32, 4, aug, seed=11)
    a, b = s1.batch(7), s2.batch(7)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(s1.batch(8)[0], a[0])
    assert not torch.equal(TripletSampler([(video, 1.0)], 32, 4, aug, seed=12).batch(7)[0], a[0])
    assert a[0].shape == (4, 3, 32, 32)


# ---- synthetic motion --------------------------------------------------------------------------
def test_synthetic_background_translation_is_exact():
    tex = torch.rand(3, 64, 64)
    layer = Layer(tex, None, centre=(16.0, 16.0), velocity=(8.0, -4.0))
    x0, y, x1 = (render_layers([layer], 32, t) for t in (0.0, 0.5, 1.0))
    # Integer displacements: the frames are exact shifts of one another (4, -2) px per half step.
    # Content moves by v / 2 = (+4, -2) px per half step: y(r, c) = x0(r + 2, c - 4).
    assert torch.allclose(y[:, :30, 4:], x0[:, 2:, :28], atol=1e-5)
    assert torch.allclose(x1[:, :30, 4:], y[:, 2:, :28], atol=1e-5)
    assert not torch.allclose(y, x0, atol=1e-2)


def test_synthetic_foreground_moves_and_occludes():
    bg = Layer(torch.zeros(3, 64, 64), None, centre=(32.0, 32.0), velocity=(0.0, 0.0))
    red = torch.zeros(3, 10, 10)
    red[0] = 1.0
    fg = Layer(red, torch.ones(1, 10, 10), centre=(20.0, 30.0), velocity=(24.0, 0.0))
    frames = [render_layers([bg, fg], 64, t) for t in (0.0, 0.5, 1.0)]
    cols = torch.arange(64, dtype=torch.float32)
    centroids = [float((f[0].sum(0) * cols).sum() / f[0].sum()) + 0.5 for f in frames]
    assert centroids == pytest.approx([8.0, 20.0, 32.0], abs=1e-3)  # centre + v * (t - 1/2)
    assert float(frames[1][0].sum()) == pytest.approx(100.0, abs=1e-3)  # a 10x10 opaque square
    assert float(frames[0][1:].abs().max()) == 0.0  # nothing but red and background


def test_scene_generator_motion_bound():
    gen = SceneGenerator([_pattern(100, 120, seed=1)], max_motion=30, max_layers=3)
    for seed in range(20):
        layers = gen.sample_layers(np.random.default_rng(seed), 48)
        assert math.hypot(*layers[0].velocity) <= 15 + 1e-9
        assert all(math.hypot(*l.velocity) <= 30 + 1e-9 for l in layers[1:])
        x0, y, x1 = gen.render(np.random.default_rng(seed), 48)
        assert y.shape == (3, 48, 48) and 0 <= float(y.min()) and float(y.max()) <= 1
    with pytest.raises(ValueError, match="uint8"):
        SceneGenerator([torch.rand(10, 10, 3)])


# ---- config and schedule -----------------------------------------------------------------------
def test_learning_rate_schedule():
    opt = dict(config_lib.DEFAULTS["optimizer"], learning_rate=1e-3, decay_steps=100)
    assert learning_rate(opt, 0) == 1e-3
    assert learning_rate(opt, 99) == 1e-3
    assert learning_rate(opt, 100) == pytest.approx(1e-3 * 0.464158)
    assert learning_rate(opt, 350) == pytest.approx(1e-3 * 0.464158 ** 3)
    smooth = dict(opt, staircase=False)
    assert learning_rate(smooth, 50) == pytest.approx(1e-3 * 0.464158 ** 0.5)
    warm = dict(opt, warmup_steps=10)
    assert learning_rate(warm, 0) == pytest.approx(1e-4) and learning_rate(warm, 10) == 1e-3


def test_config_errors(tmp_path):
    def load(obj):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(obj))
        return config_lib.load_config(str(path))
    src = [{"kind": "video", "paths": ["x"]}]
    with pytest.raises(config_lib.ConfigError, match="unknown key 'epochs'"):
        load({"epochs": 3, "data": {"train": src}})
    with pytest.raises(config_lib.ConfigError, match=r"data.train\[0\].kind"):
        load({"data": {"train": [{"kind": "webcam"}]}})
    with pytest.raises(config_lib.ConfigError, match="multiple of log_every"):
        load({"data": {"train": src}, "log_every": 7, "checkpoint_every": 10})
    with pytest.raises(config_lib.ConfigError, match="model"):
        load({"data": {"train": src}, "model": {"filters": 0}})
    with pytest.raises(config_lib.ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        config_lib.load_config(str(tmp_path / "bad.json"))
    cfg = load({"data": {"train": src}})
    assert cfg["data"]["train"][0]["paths"] == [str(tmp_path / "x")]  # relative to the file


def test_shipped_default_config_is_valid():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load_config(os.path.join(here, "configs", "film_fast_default.json"))
    assert config_lib.model_options(cfg).filters == 16
    for src in cfg["data"]["train"]:
        for p in src.get("paths", []) + src.get("textures", []):
            assert os.path.isdir(p), p



def test_every_config_in_configs_validates():
    """Every JSON under configs/ (the built-in stages, the GPU continuation, the experiments the
    model card reports) passes the config checks, and its data folders exist in the checkout."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = sorted(n for n in os.listdir(os.path.join(here, "configs")) if n.endswith(".json"))
    assert {"experiment_wide_decoder.json", "experiment_large_crops.json"} <= set(names)
    for name in names:
        cfg = config_lib.load_config(os.path.join(here, "configs", name))
        config_lib.model_options(cfg)
        for src in cfg["data"]["train"] + cfg["data"]["val"]:
            for path in src.get("paths", []) + src.get("textures", []):
                assert os.path.isdir(path), (name, path)
    wide = config_lib.load_config(os.path.join(here, "configs", "experiment_wide_decoder.json"))
    assert wide["model_init"] == "widen" and config_lib.model_options(wide).fusion_filters(0) == 32


def test_gpu_continuation_config_starts_from_the_shipped_model():
    """configs/film_fast_default_gpu.json (benchmarks/gpu_session.sh, TRAIN_S): the built-in
    architecture, initialised from the shipped weights, batches made by worker processes."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load_config(os.path.join(here, "configs", "film_fast_default_gpu.json"))
    import film_fast
    shipped = film_fast.load()
    assert config_lib.model_options(cfg) == shipped.options
    assert cfg["init"] == os.path.join(here, "film_fast", "weights", "film_fast_default.safetensors")
    assert os.path.isfile(cfg["init"]) and cfg["data_workers"] == "auto"
    for src in cfg["data"]["train"]:
        for path in src.get("paths", []) + src.get("textures", []):
            assert os.path.isdir(path), path


def test_builtin_stage_configs_chain():
    """The built-in model's four stages (README "The built-in model"): same architecture, and
    each stage's ``init`` is the previous stage's ``--out runs/<name>`` export, as the README's
    one-line reproduction writes them."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stages = [("film_fast_default", None), ("film_fast_default_finetune", "film_fast_default"),
              ("film_fast_default_large_motion", "film_fast_default_ft"),
              ("film_fast_default_passthrough", "film_fast_default_lm")]
    first = None
    for name, previous in stages:
        cfg = config_lib.load_config(os.path.join(here, "configs", name + ".json"))
        options = config_lib.model_options(cfg)
        first = first or options
        assert options == first, name
        want = None if previous is None else os.path.join(here, "runs", previous,
                                                          "model.safetensors")
        assert cfg["init"] == want, (name, cfg["init"])
        for src in cfg["data"]["train"]:
            for path in src.get("paths", []) + src.get("textures", []):
                assert os.path.isdir(path), path
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for cmd in ("--config configs/film_fast_default.json --out runs/film_fast_default ",
                "--config configs/film_fast_default_finetune.json --out runs/film_fast_default_ft ",
                "--config configs/film_fast_default_large_motion.json --out runs/film_fast_default_lm ",
                "--config configs/film_fast_default_passthrough.json --out runs/film_fast_default_pt "
                "--export film_fast/weights/film_fast_default.safetensors"):
        assert cmd in readme, cmd
    # Stage 4 starts by turning the stage-3 decoder into a correction of the warp average.
    assert cfg["model_init"] == "fusion_passthrough"

# ---- the loop ----------------------------------------------------------------------------------
def _tiny_config(root, **over):
    cfg = {"model": TINY_MODEL,
           "data": {"crop_size": 32, "batch_size": 2,
                    "train": [{"kind": "video", "paths": [root], "weight": 1.0},
                              {"kind": "synthetic", "textures": [root], "max_motion": 8}],
                    "val": [{"kind": "video", "paths": [root], "frame_range": [0.5, 1.0]}]},
           "loss": {"l1": {"boundaries": [0], "values": [1.0, 1.0]},
                    "l1_warped": {"boundaries": [2], "values": [0.5, 0.0]}},
           "optimizer": {"learning_rate": 1e-3, "decay_steps": 3, "warmup_steps": 2,
                         "weight_decay": 1e-4, "grad_clip": 1.0},
           "num_steps": 6, "log_every": 1, "checkpoint_every": 2, "eval_every": 3,
           "precision": "fp32", "backend": "torch", "keep_checkpoints": 5}
    cfg.update(over)
    return config_lib.from_dict(cfg)


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")}
                for r in csv.DictReader(f)]


def test_resume_is_exact(frame_folder, tmp_path):
    root, _ = frame_folder
    cfg = _tiny_config(root)
    straight = Trainer(cfg, str(tmp_path / "a"), device="cpu", progress=False)
    straight.run()
    first = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False)
    first.run(num_steps=3)  # stops between checkpoints: steps 2 -> 3 are redone on resume
    os.remove(os.path.join(tmp_path, "b", "checkpoints", "step_00000003.safetensors"))
    resumed = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False, resume=True)
    assert resumed.step == 2
    resumed.run()
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")
    state, opt, meta = load_checkpoint(list_checkpoints(str(tmp_path / "b" / "checkpoints"))[-1][1])
    assert meta["step"] == 6 and any(k.endswith("exp_avg_sq") for k in opt)
    # A changed config cannot silently continue a run.
    with pytest.raises(TrainingError, match="differs"):
        Trainer(_tiny_config(root, seed=1), str(tmp_path / "b"), device="cpu", progress=False,
                resume=True)
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False)


def test_worker_processes_make_the_same_batches_and_weights(frame_folder, tmp_path):
    from film_fast.training.batches import batch_stream, resolve_workers
    root, _ = frame_folder
    cfg = _tiny_config(root, data_workers=0)
    inline = Trainer(cfg, str(tmp_path / "a"), device="cpu", progress=False)
    got = list(batch_stream(inline.sampler, 3, 7, workers=2))
    assert [s for s, _ in got] == [3, 4, 5, 6]  # in step order
    for step, batch in got:
        for a, b in zip(batch, inline.sampler.batch(step)):
            assert torch.equal(a, b), step
    # Different steps really are different batches (the comparison above can fail).
    assert not torch.equal(got[0][1][0], got[1][1][0])
    inline.run()
    pooled = Trainer(dict(cfg, data_workers=2), str(tmp_path / "b"), device="cpu", progress=False)
    pooled.run()
    for (k, a), (_, b) in zip(inline.model.state_dict().items(), pooled.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")
    assert resolve_workers("auto", torch.device("cpu")) == 0
    assert 1 <= resolve_workers("auto", torch.device("cuda")) <= 8
    with pytest.raises(config_lib.ConfigError, match="data_workers"):
        _tiny_config(root, data_workers=-1)


def test_weight_average_matches_hand_computation():
    from film_fast.training.ema import WeightAverage
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = WeightAverage(layer, 0.5)
    want = torch.ones(1, 2)
    for step, value in enumerate([3.0, -2.0, 5.0]):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update(layer, step)
        d = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.1818..., 0.25
        want = d * want + (1 - d) * value
        assert torch.allclose(ema.shadow["weight"], want, atol=1e-6), step
    with ema.applied(layer):
        assert torch.equal(layer.weight, ema.shadow["weight"])
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))  # restored
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(layer, 1.0)


def test_ema_run_resumes_exactly_and_exports_the_average(frame_folder, tmp_path):
    import film_fast
    root, _ = frame_folder
    cfg = _tiny_config(root, ema_decay=0.9)
    straight = Trainer(cfg, str(tmp_path / "a"), device="cpu", progress=False)
    straight.run()
    first = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False)
    first.run(num_steps=2)
    resumed = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False, resume=True)
    resumed.run()
    for name, a in straight.ema.shadow.items():
        assert torch.equal(a, resumed.ema.shadow[name]), name
    # (b's row 2 also validated: run(num_steps=2) ended there)
    assert ([r for r in _rows(tmp_path / "a" / "metrics.csv") if r["step"] != "2"]
            == [r for r in _rows(tmp_path / "b" / "metrics.csv") if r["step"] != "2"])
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert rows[2]["val_ema_psnr"] and rows[2]["val_psnr"] != rows[2]["val_ema_psnr"]
    # The export and a checkpoint both load as the average, not the raw weights.
    raw = dict(straight.model.named_parameters())
    last = list_checkpoints(str(tmp_path / "a" / "checkpoints"))[-1][1]
    for path in (str(tmp_path / "a" / "model.safetensors"), last):
        loaded = dict(film_fast.load(path, dtype="fp32").named_parameters())
        differs = False
        for name, avg in straight.ema.shadow.items():
            # export_dtype fp32 in the tiny config: exact
            assert torch.equal(loaded[name], avg), (path, name)
            differs |= not torch.equal(avg, raw[name].detach())
        assert differs  # the average is not the raw weights
    # Switching EMA on is a config change: a plain run cannot be resumed with it.
    plain = Trainer(_tiny_config(root), str(tmp_path / "c"), device="cpu", progress=False)
    plain.run(num_steps=2)
    with pytest.raises(TrainingError, match="differs"):
        Trainer(cfg, str(tmp_path / "c"), device="cpu", progress=False, resume=True)
    with pytest.raises(config_lib.ConfigError, match="ema_decay"):
        _tiny_config(root, ema_decay=1.5)


def test_time_limit_stops_on_a_log_step_and_resumes_exactly(frame_folder, tmp_path):
    root, _ = frame_folder
    cfg = _tiny_config(root, num_steps=8, log_every=2, checkpoint_every=4, eval_every=0)
    straight = Trainer(cfg, str(tmp_path / "a"), device="cpu", progress=False)
    straight.run()
    assert not straight.stopped_early
    timed = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False)
    timed.run(max_seconds=0.0)  # out of time at once: stops at the first log step
    assert timed.stopped_early and timed.step == 2
    assert [s for s, _ in list_checkpoints(str(tmp_path / "b" / "checkpoints"))] == [2]
    assert os.path.isfile(tmp_path / "b" / "model.safetensors")
    resumed = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False, resume=True)
    assert resumed.step == 2
    resumed.run(max_seconds=3600.0)
    assert not resumed.stopped_early and resumed.step == 8
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")


def test_training_reduces_the_loss(frame_folder, tmp_path):
    root, _ = frame_folder
    cfg = _tiny_config(root, num_steps=40, log_every=20, checkpoint_every=40, eval_every=0)
    cfg["data"]["train"] = cfg["data"]["train"][:1]
    cfg["optimizer"].update(decay_steps=1000, learning_rate=3e-3)
    trainer = Trainer(cfg, str(tmp_path / "run"), device="cpu", progress=False)
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[-1]["loss"]) < 0.7 * float(rows[0]["loss"])


def test_train_cli_end_to_end(frame_folder, tmp_path, capsys):
    root, _ = frame_folder
    cfg = _tiny_config(root, num_steps=4, log_every=2, checkpoint_every=2, eval_every=2)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(path), "--out", str(out), "--quiet",
                     "--export", str(tmp_path / "m.safetensors")]) == 0
    import film_fast
    model = film_fast.load(str(out / "model.safetensors"))
    assert model.options.filters == 4
    same = film_fast.load(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    from film_fast.training.tensorboard import read_scalars
    events = [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    scalars = read_scalars(str(out / events[0]))
    assert {("loss", 2), ("loss", 4), ("val_psnr", 4)} <= {(t, s) for t, s, _ in scalars}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["step"] for r in rows] == ["2", "4"] and rows[-1]["val_avg_psnr"]
    # Re-running into the same folder without --resume is refused with a clear message.
    capsys.readouterr()
    assert cli.main(["train", "--config", str(path), "--out", str(out), "--quiet"]) != 0
    assert "--resume" in capsys.readouterr().err
    # A broken config names the problem and exits non-zero.
    path.write_text(json.dumps({"data": {"train": []}}))
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "x"), "--quiet"]) != 0
    assert "data.train" in capsys.readouterr().err
    # Time limit and workers from the command line: stop at the first log step, resume to the end.
    path.write_text(json.dumps(cfg))
    timed = tmp_path / "timed"
    assert cli.main(["train", "--config", str(path), "--out", str(timed), "--max-time", "1e-9",
                     "--workers", "1"]) == 0
    assert "stopped (time limit) at step 2" in capsys.readouterr().out
    assert cli.main(["train", "--config", str(path), "--out", str(timed), "--resume", "--quiet",
                     "--workers", "0"]) == 0
    assert [r["step"] for r in csv.DictReader(open(timed / "metrics.csv"))] == ["2", "4"]
    for bad, message in ((["--workers", "many"], "--workers"), (["--max-time", "0"], "--max-time"),
                         (["--workers", "-2"], "data_workers")):
        assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "y"),
                         "--quiet"] + bad) != 0
        assert message in capsys.readouterr().err


def test_training_step_through_triton_kernels_matches_torch(frame_folder, tmp_path):
    """The Triton kernels' backward passes drive a real training step (the interpreter on CPU):
    the same batch and initial weights give the same gradients and update as the torch backend."""
    pytest.importorskip("triton")
    root, _ = frame_folder
    grads = {}
    for backend in ("torch", "triton"):
        cfg = _tiny_config(root, backend=backend, num_steps=1, log_every=1, checkpoint_every=1)
        cfg["loss"] = {"l1": {"boundaries": [0], "values": [1.0, 1.0]}}
        trainer = Trainer(cfg, str(tmp_path / backend), device="cpu", progress=False)
        trainer.train_step(0)
        grads[backend] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    for name, g in grads["torch"].items():
        ref = g.abs().max().clamp_min(1e-12)
        assert float((grads["triton"][name] - g).abs().max() / ref) < 1e-4, name


def test_init_from_weights(frame_folder, tmp_path):
    """`init` starts a run (fine-tuning) from existing weights, e.g. the built-in model's."""
    root, _ = frame_folder
    first = Trainer(_tiny_config(root, num_steps=2, log_every=1, checkpoint_every=2), str(tmp_path / "a"),
                    device="cpu", progress=False)
    first.run()
    cfg = _tiny_config(root, seed=5, init=str(tmp_path / "a" / "model.safetensors"))
    tuned = Trainer(cfg, str(tmp_path / "b"), device="cpu", progress=False)
    for (k, a), (_, b) in zip(first.model.state_dict().items(), tuned.model.state_dict().items()):
        assert torch.equal(a, b), k
    fresh = Trainer(_tiny_config(root, seed=5), str(tmp_path / "c"), device="cpu", progress=False)
    assert not torch.equal(fresh.model.fuse.output.weight, tuned.model.fuse.output.weight)
    bad = _tiny_config(root, init=str(tmp_path / "missing.safetensors"))
    with pytest.raises(Exception, match="missing.safetensors"):
        Trainer(bad, str(tmp_path / "d"), device="cpu", progress=False)


def test_average_fusion_init_starts_at_frame_averaging(frame_folder, tmp_path):
    root, _ = frame_folder
    model_cfg = dict(TINY_MODEL, pyramid_levels=4, fusion_pyramid_levels=3)
    trainer = Trainer(_tiny_config(root, model=model_cfg, model_init="average_fusion"),
                      str(tmp_path / "run"), device="cpu", progress=False)
    model = trainer.model.eval()
    x0, x1 = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x0, x1, 0.5), (x0 + x1) / 2, rtol=0, atol=1e-5)
    default = Trainer(_tiny_config(root, model=model_cfg), str(tmp_path / "d"), device="cpu",
                      progress=False).model.eval()
    with torch.no_grad():
        assert (default(x0, x1, 0.5) - (x0 + x1) / 2).abs().max() > 0.05
    # It trains: a step changes the zero-initialised flow heads.
    trainer.model.train()
    trainer.train_step(0)
    trainer.train_step(1)
    assert trainer.model.predict_flow.shared.convs[-1].weight.abs().max() > 0
    with pytest.raises(config_lib.ConfigError, match="model_init"):
        _tiny_config(root, model_init="xavier")


def test_fusion_passthrough_starts_at_the_warp_average(frame_folder, tmp_path):
    """`model_init: fusion_passthrough` edits the `init` weights so that the model outputs the
    average of its two warped inputs, keeping every flow and feature weight as loaded."""
    root, _ = frame_folder
    first = Trainer(_tiny_config(root, num_steps=2, log_every=1, checkpoint_every=2),
                    str(tmp_path / "a"), device="cpu", progress=False)
    first.run()
    init = str(tmp_path / "a" / "model.safetensors")
    plain = Trainer(_tiny_config(root, init=init), str(tmp_path / "p"), device="cpu",
                    progress=False).model.eval()
    edited = Trainer(_tiny_config(root, init=init, model_init="fusion_passthrough"),
                     str(tmp_path / "b"), device="cpu", progress=False)
    model = edited.model.eval()
    # The 3 level-0 channels the loaded output conv weighs least carry the average.
    weight = plain.fuse.output.weight.flatten(1)
    least = sorted(torch.argsort(weight.norm(dim=0))[:3].tolist())
    out = model.fuse.output.weight.flatten(1)
    assert torch.equal(out[:, least], torch.eye(3))
    assert not out[:, [k for k in range(out.shape[1]) if k not in least]].any()
    changed = {"fuse.output.weight", "fuse.output.bias"} | {
        f"fuse.levels.0.convs.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b) == (name not in changed), name
    x0, x1 = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        o = model.debug_forward(x0, x1, 0.5)
        flow = o["forward_flow_pyramid"][0]
        assert flow.abs().max() > 0.1  # the warps are not the inputs: the test can tell them apart
        average = (o["x0_warped"] + o["x1_warped"]) / 2
        torch.testing.assert_close(o["image"][0], average, rtol=0, atol=1e-6)
        assert (average - (x0 + x1) / 2).abs().max() > 0.01
        assert (plain(x0, x1, 0.5) - average).abs().max() > 0.01
    # It trains: the zeroed output weights get gradients from the first step.
    edited.model.train()
    edited.train_step(0)
    assert edited.model.fuse.output.weight.flatten(1)[:, [k for k in range(out.shape[1])
                                                          if k not in least]].abs().max() > 0
    with pytest.raises(config_lib.ConfigError, match="fusion_passthrough.*init"):
        _tiny_config(root, model_init="fusion_passthrough")


def test_widen_starts_as_exactly_the_narrow_model_and_trains_the_new_channels(frame_folder,
                                                                              tmp_path):
    """`model_init: widen` loads a narrower model's `init` weights into a model with a wider
    decoder (`fusion_widths`): leading blocks copied, the new channels' outgoing weights 0,
    so the wide model computes what the narrow one did; training then uses the new width."""
    root, _ = frame_folder
    first = Trainer(_tiny_config(root, num_steps=2, log_every=1, checkpoint_every=2),
                    str(tmp_path / "a"), device="cpu", progress=False)
    first.run()
    init = str(tmp_path / "a" / "model.safetensors")
    narrow = film_fast.load(init).float().eval()
    width = narrow.options.fusion_filters(0)
    wide_model = dict(TINY_MODEL, fusion_widths=[3 * width, narrow.options.fusion_filters(1) + 2])
    trainer = Trainer(_tiny_config(root, model=wide_model, init=init, model_init="widen"),
                      str(tmp_path / "w"), device="cpu", progress=False)
    wide = trainer.model.eval()
    assert wide.options.fusion_filters(0) == 3 * width
    out = wide.fuse.output.weight.flatten(1)
    assert torch.equal(out[:, :width], narrow.fuse.output.weight.flatten(1))
    assert not out[:, width:].any()
    conv1 = wide.fuse.levels[0].convs[1].weight
    assert not conv1[:width, width:].any() and conv1[width:].abs().sum() > 0  # new rows: random
    x0, x1 = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        want = narrow(x0, x1, 0.5)
        torch.testing.assert_close(wide(x0, x1, 0.5), want, rtol=0, atol=1e-6)
    trainer.model.train()
    trainer.train_step(0)
    assert trainer.model.fuse.output.weight.flatten(1)[:, width:].abs().max() > 0
    with pytest.raises(config_lib.ConfigError, match="widen.*init"):
        _tiny_config(root, model=wide_model, model_init="widen")
    # Other widths (here `filters`) would interleave old and new channels: refused, named.
    with pytest.raises(TrainingError, match=r"differs from the config's model in \['filters'\]"):
        Trainer(_tiny_config(root, model=dict(TINY_MODEL, filters=8), init=init,
                             model_init="widen"), str(tmp_path / "f"), device="cpu",
                progress=False)
    # Weights that do not fit (the wide ones into the narrow model) are named.
    from film_fast.training.init import embed_narrower
    with pytest.raises(ValueError, match=r"'fuse\.levels\.0\.up\.weight' has shape"):
        embed_narrower(narrow, wide.state_dict(), source="wide")
    with pytest.raises(ValueError, match="missing tensor"):
        embed_narrower(wide, {k: v for k, v in narrow.state_dict().items()
                              if k != "fuse.output.bias"})


def test_bf16_autocast_training_step(frame_folder, tmp_path):
    """Mixed precision on CPU (the built-in model's recipe): bf16 convs write into the model's
    fp32 concat buffers; the step must run and give a finite loss close to the fp32 step's."""
    root, _ = frame_folder
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(_tiny_config(root, precision=precision), str(tmp_path / precision),
                          device="cpu", progress=False)
        losses[precision] = trainer.train_step(0)["loss"]
    assert math.isfinite(losses["bf16"])
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
