"""End-to-end `film-fast video` timings on real footage, up to 4K, with the built-in model.

    python benchmarks/video_timings.py                       # the README's table
    python benchmarks/video_timings.py --jobs 2x 4K-2x --threads 2

Each job builds its input clip from a real video in the repo (``data/train/cafe_960x507.mp4``
by default): the first ``frames`` frames, resized to the job's size with a bicubic filter, H.264
at CRF 12, plus a 440 Hz AAC tone so that the audio path is exercised too. Then it runs the CLI
exactly as a user would (``python -m film_fast video IN -o OUT --factor F``) in a child process
and reports its wall time, its peak resident memory (``os.wait4``), and checks the output: frame
count ``(n - 1) * F + 1``, frame rate ``F x`` the input's, and that the audio stream is there.

Rows go to stdout as a Markdown table and to ``benchmarks/results/video-timings-<device>.json``
with the machine, versions and commit. Timings on a shared machine are noisy: the JSON records
the load average before and after each job.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(ROOT, "data", "train", "cafe_960x507.mp4")

# name -> (width, height, input frames, factor, extra CLI arguments)
JOBS: Dict[str, tuple] = {
    "2x": (960, 506, 9, 2, []),
    "4x": (960, 506, 9, 4, []),
    "8x": (960, 506, 5, 8, []),
    "1080p-2x": (1920, 1080, 3, 2, []),
    "4K-2x": (3840, 2160, 3, 2, []),
    "4K-2x-tile1024": (3840, 2160, 3, 2, ["--tile", "1024"]),
}


def make_clip(source: str, path: str, width: int, height: int, frames: int) -> fractions.Fraction:
    """Writes ``frames`` frames of ``source`` at ``width x height`` with a tone; returns the rate."""
    import av

    with av.open(source) as inp:
        stream = inp.streams.video[0]
        rate = stream.average_rate or fractions.Fraction(25)
        pictures = []
        for frame in inp.decode(stream):
            pictures.append(frame.reformat(width, height, "yuv420p", interpolation="BICUBIC"))
            if len(pictures) == frames:
                break
    if len(pictures) < frames:
        raise SystemExit(f"{source}: only {len(pictures)} frames, the job needs {frames}")
    with av.open(path, "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"crf": "12"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "mono"
        for index, picture in enumerate(pictures):
            picture.pts = index
            picture.time_base = fractions.Fraction(1) / rate
            for packet in video.encode(picture):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        seconds = len(pictures) / float(rate)
        t = np.arange(int(seconds * 48000)) / 48000.0
        tone = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None, :]
        for start in range(0, tone.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, start:start + 1024]),
                                               format="fltp", layout="mono")
            chunk.sample_rate = 48000
            chunk.pts = start
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return rate


def probe(path: str):
    """(decoded video frames, the video stream's average rate, whether an audio stream exists)."""
    import av

    with av.open(path) as f:
        video = f.streams.video[0]
        has_audio = len(f.streams.audio) > 0
        count = sum(1 for _ in f.decode(video))
        return count, video.average_rate, has_audio


def run_job(name: str, source: str, workdir: str, threads: int, dtype: str) -> dict:
    width, height, frames, factor, extra = JOBS[name]
    clip = os.path.join(workdir, f"{name}-in.mp4")
    out = os.path.join(workdir, f"{name}-out.mp4")
    rate = make_clip(source, clip, width, height, frames)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "film_fast", "video", clip, "-o", out, "--factor", str(factor),
           "--dtype", dtype, "--overwrite", "--quiet", *extra]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"job {name}: {' '.join(cmd)} exited with {proc.returncode}")
    count, out_rate, has_audio = probe(out)
    expected = (frames - 1) * factor + 1
    if count != expected or out_rate != rate * factor or not has_audio:
        raise SystemExit(f"job {name}: output has {count} frames at {out_rate} fps, audio "
                         f"{has_audio}; expected {expected} at {rate * factor} with audio")
    new_frames = expected - frames
    return {
        "job": name, "command": "film-fast video IN -o OUT --factor %d %s" % (factor, " ".join(extra)),
        "size": f"{width}x{height}", "input_frames": frames, "output_frames": count,
        "new_frames": new_frames, "threads": threads, "dtype": dtype,
        "wall_s": round(seconds, 2), "s_per_new_frame": round(seconds / new_frames, 2),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "audio_kept": has_audio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="real video the clips are cut from")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the CLI")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--save", default=None, metavar="JSON",
                        help="default: benchmarks/results/video-timings-cpu.json")
    args = parser.parse_args()
    rows: List[dict] = []
    print("| job | input | frames in -> out | threads | wall time | per new frame | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="film-fast-video-timings-") as workdir:
        for name in args.jobs:
            row = run_job(name, args.source, workdir, args.threads, args.dtype)
            rows.append(row)
            print(f"| `{row['command'].strip()}` | {row['size']} | {row['input_frames']} -> "
                  f"{row['output_frames']} | {row['threads']} | {row['wall_s']:.1f} s | "
                  f"{row['s_per_new_frame']:.1f} s | {row['peak_rss_gib']:.1f} GiB |", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import av
    import torch

    record = {"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "av": av.__version__, "commit": commit,
              "model": "built-in (film_fast/weights/film_fast_default.safetensors)",
              "source": os.path.relpath(args.source, ROOT), "rows": rows}
    path = args.save or os.path.join(ROOT, "benchmarks", "results", "video-timings-cpu.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
