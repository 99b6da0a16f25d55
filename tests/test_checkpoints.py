"""Checkpoint reading: formats, name maps, and clear errors for every kind of bad file."""
from __future__ import annotations

import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

import film_fast
from film_fast.checkpoints.naming import from_official, from_port, to_official, to_port
from film_fast.checkpoints.protowire import decode, encode_varint, read_varint
from film_fast.checkpoints.tf_savedmodel import split_checkpoint_key

from conftest import GOLDEN, PHOTOS, SMALL_PYRAMID_LEVELS
from tf_writer import write_saved_model


def test_safetensors_roundtrip_keeps_config_and_weights(small_model, small_safetensors):
    model = film_fast.load(small_safetensors, device="cpu")  # no pyramid_levels: stored in metadata
    assert model.options == small_model.options
    assert "safetensors (film_fast)" in model.source
    for key, value in small_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_name_maps_roundtrip(small_model):
    state = small_model.state_dict()
    for key, value in from_port(to_port(state)).items():
        assert torch.equal(value, state[key])
    for key, value in from_official(to_official(state)).items():
        assert torch.equal(value, state[key])


def test_fusion_numbering_may_start_above_zero(small_model):
    """Keras numbers fusion convs conv2d_K.. in a process that made other layers first."""
    official = to_official(small_model.state_dict())
    shifted = {}
    for name, value in official.items():
        if name.startswith("fusion/conv2d"):
            base = name.split("/")[1]
            number = int(base.split("_")[1]) if "_" in base else 0
            name = name.replace(base, f"conv2d_{number + 17}")
        shifted[name] = value
    for key, value in from_official(shifted).items():
        assert torch.equal(value, small_model.state_dict()[key]), key


def test_dtype_and_device_arguments(small_safetensors):
    m = film_fast.load(small_safetensors, device="cpu", dtype="bf16")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    with pytest.raises(ValueError, match="unsupported dtype"):
        film_fast.load(small_safetensors, device="cpu", dtype="int8")


def test_builtin_model_missing_says_how_to_pass_weights():
    if os.path.isfile(film_fast.api.BUILTIN_MODEL):
        pytest.skip("a built-in model ships")
    with pytest.raises(film_fast.CheckpointError, match=r"film_fast.load\('film_net_fp32.pt'\)"):
        film_fast.load()


# ---- bad files -------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(film_fast.CheckpointError, match="no such file"):
        film_fast.load(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("content", ["png", "random", "empty", "text"])
def test_files_of_the_wrong_kind(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "png":
        shutil.copy(os.path.join(PHOTOS, "one.png"), path)
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("hello\n")
    with pytest.raises(film_fast.CheckpointError, match=str(path).replace(".", r"\.")):
        film_fast.load(str(path))


def test_truncated_torchscript(tmp_path, small_model):
    from port_modules import PortLikeInterpolator
    port = to_port(small_model.state_dict())
    module = PortLikeInterpolator(port, SMALL_PYRAMID_LEVELS, 4)
    module.load_state_dict(port)
    full = tmp_path / "full.pt"
    torch.jit.script(module).save(str(full))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(film_fast.CheckpointError, match="cut.pt"):
        film_fast.load(str(cut))


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_torchscript_with_malicious_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": _Boom()}, protocol=2))
        z.writestr("evil/code/__torch__.py", "")
        z.writestr("evil/version", "3\n")
    with pytest.raises(film_fast.CheckpointError, match=r"refusing to load .*system"):
        film_fast.load(str(path))
    assert not (tmp_path / "pwned.txt").exists()


def test_state_dict_with_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil_state.pt"
    torch.save({"extract.stages.0.convs.0.weight": _Boom()}, path)
    with pytest.raises(film_fast.CheckpointError, match="weights-only"):
        film_fast.load(str(path))
    assert not (tmp_path / "pwned.txt").exists()


def test_mismatching_tensor_is_named(tmp_path, small_model):
    state = dict(small_model.state_dict())
    state["fuse.levels.1.convs.0.weight"] = state["fuse.levels.1.convs.0.weight"][:, :-1]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(film_fast.CheckpointError, match=r"'fuse\.levels\.1\.convs\.0\.weight' has shape"):
        film_fast.load(str(tmp_path / "bad.pt"), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_missing_and_unexpected_tensors_are_named(tmp_path, small_model):
    state = dict(small_model.state_dict())
    del state["predict_flow.shared.convs.1.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(film_fast.CheckpointError, match=r"predict_flow\.shared\.convs\.1\.bias"):
        film_fast.load(str(tmp_path / "missing.pt"), pyramid_levels=SMALL_PYRAMID_LEVELS)
    state = dict(small_model.state_dict(), **{"extra.weight": torch.zeros(1)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(film_fast.CheckpointError, match=r"extra\.weight"):
        film_fast.load(str(tmp_path / "extra.pt"), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_port_keys_for_a_different_architecture_fail_on_first_mismatch(tmp_path, small_model):
    port = to_port(small_model.state_dict())
    port["predict_flow._predictor._convs.0.0.weight"] = torch.zeros(32, 99, 3, 3)
    torch.save(port, tmp_path / "port.pt")
    with pytest.raises(film_fast.CheckpointError, match=r"predict_flow\.shared\.convs\.0\.weight"):
        film_fast.load(str(tmp_path / "port.pt"), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_tf_bundle_truncated_data_names_tensor(tmp_path):
    dst = tmp_path / "sm"
    shutil.copytree(os.path.join(GOLDEN, "official_small_variables"), dst / "variables")
    data = dst / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(film_fast.CheckpointError, match=r"past the end of its data shard"):
        film_fast.load(str(dst), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_tf_bundle_corrupt_tensor_fails_checksum(tmp_path):
    dst = tmp_path / "sm"
    shutil.copytree(os.path.join(GOLDEN, "official_small_variables"), dst / "variables")
    data = dst / "variables" / "variables.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(film_fast.CheckpointError, match="checksum mismatch"):
        film_fast.load(str(dst), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_tf_index_with_bad_magic(tmp_path):
    dst = tmp_path / "sm" / "variables"
    dst.mkdir(parents=True)
    (dst / "variables.index").write_bytes(b"\x00" * 100)
    with pytest.raises(film_fast.CheckpointError, match="bad table magic"):
        film_fast.load(str(tmp_path / "sm"), pyramid_levels=SMALL_PYRAMID_LEVELS)


def test_directory_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(film_fast.CheckpointError, match="not a TF SavedModel"):
        film_fast.load(str(tmp_path))


def test_savedmodel_without_any_names(tmp_path, small_model):
    write_saved_model(str(tmp_path / "sm"), to_official(small_model.state_dict()), with_pb=False)
    with pytest.raises(film_fast.CheckpointError, match="cannot resolve the layer name"):
        film_fast.load(str(tmp_path / "sm"), pyramid_levels=SMALL_PYRAMID_LEVELS)


# ---- protobuf / key helpers ---------------------------------------------------------------
def test_varint_roundtrip_and_escaped_keys():
    for v in (0, 1, 127, 128, 300, 2 ** 35, 2 ** 63 - 1):
        assert read_varint(encode_varint(v), 0) == (v, len(encode_varint(v)))
    assert split_checkpoint_key("variables/12/.ATTRIBUTES/VARIABLE_VALUE") == ["variables", "12"]
    assert split_checkpoint_key("a../b.//c/.ATTRIBUTES/X") == ["a.", "b/", "c"]
    with pytest.raises(ValueError):
        decode(b"\x0a\x05ab")  # length runs past the end


def test_fusion_widths_option_serialises_validates_and_is_inferred(tmp_path, small_model):
    """``Options.fusion_widths`` (a wider decoder than ``filters << level``) survives every
    format: safetensors metadata, a bare state dict (inferred from the weight shapes), and
    the port and official name maps. Film_net configs serialise exactly as before."""
    base = small_model.options
    assert "fusion_widths" not in base.to_dict()  # film_net configs: unchanged JSON
    wide_options = film_fast.Options.from_dict(dict(base.to_dict(), fusion_widths=[
        2 * base.fusion_filters(0)]))
    assert wide_options.fusion_filters(0) == 2 * base.fusion_filters(0)
    assert wide_options.fusion_filters(1) == base.fusion_filters(1)
    assert film_fast.Options.from_dict(wide_options.to_dict()) == wide_options
    torch.manual_seed(0)
    wide = film_fast.FILM(wide_options, backend="torch").eval()
    assert wide.fuse.output.weight.shape[1] == 2 * base.fusion_filters(0)

    path = str(tmp_path / "wide.safetensors")
    film_fast.save_safetensors(wide, path)
    assert film_fast.load(path, device="cpu").options == wide_options
    torch.save(wide.state_dict(), tmp_path / "wide.pt")  # no metadata: inferred from shapes
    loaded = film_fast.load(str(tmp_path / "wide.pt"), pyramid_levels=SMALL_PYRAMID_LEVELS)
    assert loaded.options == wide_options
    state = wide.state_dict()
    for key, value in from_port(to_port(state)).items():
        assert torch.equal(value, state[key]), key
    for key, value in from_official(to_official(state)).items():
        assert torch.equal(value, state[key]), key

    with pytest.raises(ValueError, match="fusion_widths has 3 entries"):
        film_fast.Options.from_dict(dict(base.to_dict(), fusion_pyramid_levels=3,
                                         fusion_widths=[8, 8, 8]))
    with pytest.raises(ValueError, match="fusion_widths entries must be positive"):
        film_fast.Options.from_dict(dict(base.to_dict(), fusion_widths=[0]))
