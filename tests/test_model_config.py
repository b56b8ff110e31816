"""KPhi3Config: the original fields and defaults, the released config.json, validation."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kphi3_model
from kphi3_model import KPhi3Config, KPhi3ForCausalLM

# The config.json shipped with the original source (the "released shapes" of docs/performance.md).
RELEASED_CONFIG = {
    "architectures": ["KPhi3ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kphi3.KPhi3Config",
        "AutoModelForCausalLM": "modeling_kphi3.KPhi3ForCausalLM",
    },
    "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "embed_size": 1280,
    "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 1280, "initializer_range": 0.02,
    "intermediate_size": 5120, "max_position_embeddings": 4096, "min_channels_per_group": 256,
    "model_type": "kphi3", "num_attention_heads": 10, "num_hidden_layers": 2, "num_key_value_heads": 10,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.41.2",
    "use_cache": True, "vocab_size": 32064,
}


@pytest.fixture(params=["local", "hub"])
def released_dir(tmp_path, request):
    """A checkpoint directory holding only the original config.json (no remote code files). "hub":
    the `auto_map` form of configs saved from a hub repository ("owner/repo--module.Class")."""
    config = json.loads(json.dumps(RELEASED_CONFIG))
    if request.param == "hub":
        config["auto_map"] = {key: "schuler/experimental-JP47D20--" + value
                              for key, value in config["auto_map"].items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_defaults_are_the_original_ones():
    c = KPhi3Config()
    expected = dict(
        vocab_size=32064, embed_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        hidden_act="silu", max_position_embeddings=4096, original_max_position_embeddings=4096,
        initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, sliding_window=None,
        min_channels_per_group=256, kernel_backend="auto",
    )
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.model_type == "kphi3"
    assert c.rope_theta == 10000.0
    assert c.rope_parameters["rope_type"] == "default"


def test_released_config_loads_without_remote_code(released_dir):
    # No configuration_kphi3.py in the directory: any attempt at remote code would fail.
    for trust in (None, False, True):
        kwargs = {} if trust is None else {"trust_remote_code": trust}
        config = AutoConfig.from_pretrained(released_dir, **kwargs)
        assert type(config) is KPhi3Config
    assert (config.hidden_size, config.intermediate_size, config.min_channels_per_group) == (1280, 5120, 256)
    assert (config.embed_size, config.num_attention_heads, config.sliding_window) == (1280, 10, 2047)
    assert config.rope_theta == 10000.0 and config.rope_parameters["rope_type"] == "default"
    assert config.dtype == torch.float32
    assert config.kernel_backend == "auto"


def test_released_config_builds_the_released_shapes(released_dir):
    config = AutoConfig.from_pretrained(released_dir)
    config.num_hidden_layers = 1
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = AutoModelForCausalLM.from_config(config)
    assert type(model) is KPhi3ForCausalLM
    layer = model.model.layers[0]
    groups = [block.num_groups for block in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                             layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert groups == [5, 5, 5, 20]  # docs/group-count.md: the released shapes
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    p = "model.layers.0."
    assert shapes == {
        "model.embed_tokens.weight": (32064, 1280),
        p + "self_attn.qkv_proj.first_pointwise_conv.weight": (5, 256, 768),
        p + "self_attn.qkv_proj.second_pointwise_conv.weight": (5, 256, 768),
        p + "self_attn.o_proj.first_pointwise_conv.weight": (5, 256, 256),
        p + "self_attn.o_proj.second_pointwise_conv.weight": (5, 256, 256),
        p + "mlp.gate_up_proj.first_pointwise_conv.weight": (5, 256, 2048),
        p + "mlp.gate_up_proj.second_pointwise_conv.weight": (5, 256, 2048),
        p + "mlp.down_proj.first_pointwise_conv.weight": (20, 256, 64),
        p + "mlp.down_proj.second_pointwise_conv.weight": (20, 256, 64),
        p + "input_layernorm.weight": (1280,),
        p + "post_attention_layernorm.weight": (1280,),
        "model.norm.weight": (1280,),
        "lm_head.weight": (32064, 1280),
    }


def test_config_round_trip_keeps_every_field(tmp_path):
    config = KPhi3Config(
        vocab_size=99, embed_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, min_channels_per_group=-1, kernel_backend="torch",
        resid_pdrop=0.1, embd_pdrop=0.2, sliding_window=31, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is KPhi3Config
    a, b = loaded.to_dict(), config.to_dict()
    a.pop("_name_or_path"), b.pop("_name_or_path")
    assert a == b


def test_longrope_rope_scaling_is_accepted():
    factors = dict(short_factor=[1.0, 1.5, 2.0, 2.5], long_factor=[3.0, 3.5, 4.0, 4.5])
    config = KPhi3Config(hidden_size=32, num_attention_heads=4, embed_size=32, max_position_embeddings=8192,
                         rope_scaling={"type": "longrope", **factors})
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["short_factor"] == factors["short_factor"]
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    # The older names of longrope are accepted like the original did.
    su = KPhi3Config(hidden_size=32, num_attention_heads=4, embed_size=32, rope_scaling={"type": "su", **factors})
    assert su.rope_parameters["rope_type"] == "longrope"
    # One factor per rotary frequency (head_dim / 2 = 4 here), as the original checked.
    with pytest.raises(Exception, match="short_factor"):
        KPhi3Config(hidden_size=32, num_attention_heads=2, embed_size=32, rope_scaling={"type": "longrope", **factors})


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=100, num_attention_heads=3), "divisible by `num_attention_heads`"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "divisible by `num_key_value_heads`"),
    (dict(min_channels_per_group=0), "min_channels_per_group"),
    (dict(kernel_backend="cuda"), "kernel_backend"),
])
def test_invalid_values_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        KPhi3Config(**bad)


@pytest.mark.parametrize("field, value, message", [
    ("min_channels_per_group", 0, "min_channels_per_group"),
    ("kernel_backend", "fast", "kernel_backend"),
    ("num_attention_heads", 7, "num_attention_heads"),
])
def test_invalid_values_set_later_raise_when_the_model_is_built(field, value, message):
    config = KPhi3Config(vocab_size=16, embed_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        KPhi3ForCausalLM(config)


def test_kernel_backend_is_normalised_and_reaches_every_block():
    config = KPhi3Config(vocab_size=16, embed_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         min_channels_per_group=4, kernel_backend=" Torch ")
    assert config.kernel_backend == "torch"
    model = KPhi3ForCausalLM(config)
    kernel_modules = [m for m in model.modules() if isinstance(m, kphi3_model.modeling_kphi3.KERNEL_MODULES)]
    assert len(kernel_modules) > 8 and {m.backend for m in kernel_modules} == {"torch"}
    model.set_kernel_backend("triton")
    assert {m.backend for m in kernel_modules} == {"triton"} and model.config.kernel_backend == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        model.set_kernel_backend("cuda")


def test_embed_size_follows_hidden_size_unless_given(tmp_path, released_dir):
    # The small case: no `embed_size` means a model as wide as `hidden_size` (no 1024-wide embedding,
    # no embed_to_hidden / hidden_to_embed blocks).
    small = KPhi3Config(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, min_channels_per_group=16, pad_token_id=0)
    assert small.embed_size == 64
    model = KPhi3ForCausalLM(small)
    assert model.model.embed_to_hidden is None and model.hidden_to_embed is None
    assert model.model.embed_tokens.weight.shape == (32, 64) and model.lm_head.weight.shape == (32, 64)
    # Given explicitly, it is kept, equal to the old default or not.
    for embed_size in (1024, 48):
        assert KPhi3Config(hidden_size=64, num_attention_heads=4, embed_size=embed_size).embed_size == embed_size
    # The defaults are the original's (1024 and 1024), and a released config.json keeps its own value.
    assert KPhi3Config().embed_size == 1024
    assert AutoConfig.from_pretrained(released_dir).embed_size == 1280
    released = json.loads((released_dir / "config.json").read_text())
    for embed_size in (640, 1024):  # the old default among them: it must not be dropped on save
        (released_dir / "config.json").write_text(json.dumps({**released, "embed_size": embed_size}))
        config = AutoConfig.from_pretrained(released_dir)
        assert (config.embed_size, config.hidden_size) == (embed_size, 1280)
        config.save_pretrained(tmp_path / str(embed_size))
        saved = json.loads((tmp_path / str(embed_size) / "config.json").read_text())
        assert saved["embed_size"] == embed_size
        assert AutoConfig.from_pretrained(tmp_path / str(embed_size)).embed_size == embed_size
