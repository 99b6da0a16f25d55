"""Test helpers: real frames from tests/data/video, small videos built with PyAV."""
from __future__ import annotations

import glob
import os
from fractions import Fraction
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

VIDEO_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "video")


def clip(name: str, size=None) -> List[np.ndarray]:
    """The frames of tests/data/video/<name>/ as [H, W, 3] uint8, optionally resized (w, h)."""
    frames = []
    for path in sorted(glob.glob(os.path.join(VIDEO_DATA, name, "*.jpg"))):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize(size, Image.BILINEAR)
            frames.append(np.asarray(img))
    return frames


def write_video(path: str, frames: Sequence[np.ndarray], *, rate: Fraction = Fraction(25),
                pts: Optional[Sequence[int]] = None, time_base: Optional[Fraction] = None,
                audio="aac", codec: str = "libx264",
                container: Optional[str] = None, colorspace: int = 1, color_range: int = 1,
                sample_rate: int = 44100) -> None:
    """Encodes ``frames`` (+ a 440 Hz sine as ``audio`` lasting as long as the video) with PyAV.

    ``audio``: an encoder name (mono at ``sample_rate``), or ``[(encoder, rate, layout), ...]``
    for several tracks, or None.

    ``pts`` in ``time_base`` units gives a variable frame rate; colours are tagged
    (BT.709 / limited range by default) and converted accordingly.
    """
    import av
    height, width = frames[0].shape[:2]
    out = av.open(path, "w", format=container)
    stream = out.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    tb = time_base if time_base is not None else 1 / rate
    stream.codec_context.time_base = tb
    stream.time_base = tb
    cc = stream.codec_context
    cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc = colorspace, color_range, 1, 1
    stamps = list(pts) if pts is not None else list(range(len(frames)))
    tracks = [(audio, sample_rate, "mono")] if isinstance(audio, str) else list(audio or [])
    astreams = []
    for name, rate_hz, layout in tracks:
        astream = out.add_stream(name, rate=rate_hz)
        astream.layout = layout
        astreams.append((astream, rate_hz, layout))
    sws = {1: 1, 5: 5, 6: 5}.get(colorspace, 5)
    for pixels, p in zip(frames, stamps):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(
            format="yuv420p", dst_colorspace=sws, dst_color_range=color_range)
        frame.pts = p
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    last_step = stamps[-1] - stamps[-2] if len(stamps) > 1 else 1
    duration = float((stamps[-1] + last_step) * tb)
    for astream, rate_hz, layout in astreams:
        channels = 1 if layout == "mono" else 2
        n = int(round(duration * rate_hz))
        wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate_hz)
        packed = astream.codec_context.name.startswith("pcm")
        for start in range(0, n, 1024):
            chunk = np.repeat(wave[None, start:start + 1024], channels, axis=0)
            if packed:  # s16 interleaved
                data = (chunk.T.reshape(1, -1) * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
            else:  # float planar
                frame = av.AudioFrame.from_ndarray(chunk.astype(np.float32), format="fltp",
                                                   layout=layout)
            frame.sample_rate = rate_hz
            frame.pts = start
            for packet in astream.encode(frame):
                out.mux(packet)
        for packet in astream.encode(None):
            out.mux(packet)
    out.close()


def read_video(path: str):
    """(frames as uint8 RGB arrays, pts, time base, video stream info, first audio track or None);
    ``info["audio"]`` lists every audio track's codec and channel count."""
    import av
    with av.open(path) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        info = dict(codec=cc.name, pix_fmt=cc.pix_fmt, width=cc.width, height=cc.height,
                    color_range=cc.color_range, colorspace=cc.colorspace,
                    color_primaries=cc.color_primaries, color_trc=cc.color_trc,
                    average_rate=v.average_rate, time_base=Fraction(v.time_base),
                    audio=[(a.codec_context.name, a.codec_context.channels)
                           for a in c.streams.audio])
        frames, pts = [], []
        for f in c.decode(v):
            frames.append(f.to_ndarray(format="rgb24"))
            pts.append(f.pts)
    audio = None
    with av.open(path) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            start, end = None, 0
            for packet in c.demux(a):
                if packet.pts is not None and packet.size:
                    start = packet.pts if start is None else min(start, packet.pts)
                    end = max(end, packet.pts + (packet.duration or 0))
            audio = dict(codec=a.codec_context.name, rate=a.codec_context.sample_rate,
                         start=float(start * a.time_base), end=float(end * a.time_base),
                         seconds=float((end - start) * a.time_base))
    return frames, pts, info["time_base"], info, audio


def gradient_frames(n: int = 5, width: int = 96, height: int = 64) -> List[np.ndarray]:
    """``n`` [H, W, 3] uint16 RGB frames of smooth, slowly moving gradients: values on a 16-bit
    grid, most of them between two 8-bit levels (what 8-bit decoding would quantise)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = []
    for t in range(n):
        r = 0.35 + 0.06 * (xx + 2 * t) / width + 0.02 * np.sin((yy + t) / 9)
        g = 0.45 + 0.05 * yy / height + 0.03 * np.cos((xx - 3 * t) / 13)
        b = 0.40 + 0.04 * (xx + yy + t) / (width + height)
        frames.append(np.round(np.stack([r, g, b], -1) * 65535).astype(np.uint16))
    return frames


def write_deep_video(path: str, frames: Sequence[np.ndarray], codec: str, pix_fmt: str, *,
                     rate: Fraction = Fraction(25), options: Optional[dict] = None) -> None:
    """Encodes [H, W, 3] uint16 RGB ``frames`` as ``pix_fmt`` (BT.709, limited range for YUV),
    no audio."""
    import av
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        cc = stream.codec_context
        cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc = 1, 1, 1, 1
        if options:
            cc.options = dict(options)
        for k, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb48le")
            frame = frame.reformat(format=pix_fmt, dst_colorspace=1, dst_color_range=1)
            frame.pts = k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def read_deep_video(path: str):
    """(frames as [H, W, 3] uint16 RGB (BT.709, limited range), the frames' planes as uint16
    arrays (formats above 8 bits, little endian), pts, time base, stream info)."""
    import av
    frames, planes, pts = [], [], []
    with av.open(path) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        info = dict(codec=cc.name, pix_fmt=cc.pix_fmt, width=cc.width, height=cc.height,
                    color_range=cc.color_range, colorspace=cc.colorspace,
                    color_primaries=cc.color_primaries, color_trc=cc.color_trc,
                    average_rate=v.average_rate, time_base=Fraction(v.time_base),
                    bits=max(comp.bits for comp in av.VideoFormat(cc.pix_fmt).components))
        for f in c.decode(v):
            frames.append(f.to_ndarray(format="rgb48le", src_colorspace=1, src_color_range=1))
            if info["bits"] > 8:
                planes.append([np.frombuffer(p, np.uint16).reshape(p.height, -1)[:, :p.width].copy()
                               for p in f.planes])
            pts.append(f.pts)
    return frames, planes, pts, info["time_base"], info
