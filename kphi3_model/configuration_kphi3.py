"""KPhi-3 model configuration.

Every field of the original ``KPhi3Config`` (the remote code shipped with the released checkpoints),
with its original default, plus ``kernel_backend`` and ``fused_decoder``. A released ``config.json`` loads unchanged:
its legacy ``rope_theta`` / ``rope_scaling`` keys are folded into ``rope_parameters`` as
transformers 5 does for Phi-3, and its ``auto_map`` is kept but never needed, because importing
``kphi3_model`` registers this class for ``model_type = "kphi3"``.
"""
from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from kphi3_kernels.backend import validate_backend


def check_kphi3_config(config: "KPhi3Config") -> None:
    """Raise a ValueError naming the first field that cannot build a KPhi-3 model.

    Runs when the config is created and again when a model is built from it, so values changed
    after creation are caught too.
    """
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name in ("vocab_size", "embed_size", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"KPhi3Config: `{name}` must be a positive integer, got {value!r}")
    if config.hidden_size % heads != 0:
        raise ValueError(
            f"KPhi3Config: `hidden_size` ({config.hidden_size}) must be divisible by "
            f"`num_attention_heads` ({heads})"
        )
    if heads % kv_heads != 0:
        raise ValueError(
            f"KPhi3Config: `num_attention_heads` ({heads}) must be divisible by "
            f"`num_key_value_heads` ({kv_heads})"
        )
    if not isinstance(config.min_channels_per_group, int) or config.min_channels_per_group == 0:
        raise ValueError(
            "KPhi3Config: `min_channels_per_group` must be a non-zero integer (a positive value gives "
            "grouped projections, a negative one plain nn.Linear projections), got "
            f"{config.min_channels_per_group!r}"
        )
    if not isinstance(config.fused_decoder, bool):
        raise ValueError(
            f"KPhi3Config: `fused_decoder` must be True or False, got {config.fused_decoder!r}")
    try:
        config.kernel_backend = validate_backend(config.kernel_backend)
    except ValueError as err:
        raise ValueError(f"KPhi3Config: `kernel_backend`: {err}") from None


@strict
class KPhi3Config(PreTrainedConfig):
    r"""
    Configuration of a KPhi-3 model: a Phi-3 decoder whose dense projections are grouped pointwise
    convolution blocks.

    Args beyond Phi-3's:
        embed_size (`int`, *optional*):
            Width of the token embeddings and of `lm_head`'s input. When it differs from `hidden_size`,
            `model.embed_to_hidden` and `hidden_to_embed` blocks map between the two. Not given (or
            None): equal to `hidden_size` (so 1024 with the defaults, the original's default), so that a
            small `KPhi3Config(hidden_size=64, ...)` is a small model. Released `config.json` files and
            every saved config carry it explicitly.
        min_channels_per_group (`int`, defaults to 256):
            Minimum input channels per group of every grouped block; the group count of a block
            `in -> out` is the largest divisor of both not above `in // min_channels_per_group`.
            A negative value makes the four projections of each layer plain `nn.Linear` (the model is
            then Phi-3). Zero is invalid.
        kernel_backend (`str`, defaults to `"auto"`):
            The flag that picks the fused Triton kernels or the PyTorch reference for every grouped
            layer of the model: `"auto"` (Triton on CUDA tensors, PyTorch otherwise), `"triton"` or
            `"torch"`. Change it on a built model with `model.set_kernel_backend(...)`.
        fused_decoder (`bool`, defaults to `False`):
            Fuse the layer across its projections, on either kernel backend: the MLP's
            `silu(gate) * up` writes `down_proj`'s input in the block-residue layout that both of
            the IO block's GEMMs read, and `down_proj`'s backward computes the activation's
            gradient in its epilogue; each RMSNorm writes its projection's input as both GEMMs
            read it; the residual adds run in the norm after the attention and in `down_proj`'s
            epilogue (not while residual dropout is active). Same parameters, state dict and
            results (within rounding). On the torch backend the same fused operators run in
            PyTorch; where a projection is not a grouped IO block or `hidden_act` is not
            `"silu"`, that part runs the op-level path.
            `model.model.explain_fused_decoder(device)` says which path runs.
        rope_theta / rope_scaling (legacy keys):
            Accepted as in the original config (`rope_scaling` may be a longrope dict with
            `short_factor` / `long_factor`); stored in `rope_parameters`.

    Defaults of the other fields are those of the original KPhi-3 (and Phi-3) configuration.
    """

    model_type = "kphi3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32064
    embed_size: int | None = None
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    resid_pdrop: float | int = 0.0
    embd_pdrop: float | int = 0.0
    attention_dropout: float | int = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    sliding_window: int | None = None
    min_channels_per_group: int = 256
    kernel_backend: str = "auto"
    fused_decoder: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.embed_size is None:
            self.embed_size = self.hidden_size
        super().__post_init__(**kwargs)
        check_kphi3_config(self)

    @property
    def rope_theta(self) -> float | None:
        """The RoPE base (kept for code written against the original config)."""
        return (self.rope_parameters or {}).get("rope_theta")

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        if self.rope_parameters is None:
            self.rope_parameters = {}
        self.rope_parameters["rope_theta"] = value

    def convert_rope_params_to_dict(self, default_theta: int | float = 10_000.0, ignore_keys: set | None = None,
                                    **kwargs):
        # As Phi-3: the legacy `rope_scaling` dict (or None) and `rope_theta` become `rope_parameters`.
        rope_scaling = kwargs.pop("rope_scaling", None)
        self.rope_parameters = dict(rope_scaling or self.rope_parameters or {})
        # The original accepted the older names of longrope ("su", "yarn").
        for key in ("type", "rope_type"):
            if self.rope_parameters.get(key) in ("su", "yarn"):
                self.rope_parameters[key] = "longrope"
        self.rope_parameters.setdefault("rope_theta", kwargs.pop("rope_theta", default_theta))
        self.rope_parameters.setdefault("partial_rotary_factor", kwargs.get("partial_rotary_factor", 1.0))
        self.standardize_rope_params()
        return kwargs

    def validate_rope(self):
        """Validate `rope_parameters`: `default`, or `longrope` with one factor per rotary frequency."""
        super().validate_rope()
        if not isinstance(self.rope_parameters, dict):
            raise ValueError(f"`rope_parameters` must be a dictionary, got {self.rope_parameters!r}")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"`rope_parameters`' type must be 'default' or 'longrope', got {rope_type!r}")
        if rope_type != "longrope":
            return
        head_dim = self.hidden_size // self.num_attention_heads
        rotary_half = int(head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0)) // 2
        for name in ("short_factor", "long_factor"):
            factor = self.rope_parameters.get(name)
            if not (isinstance(factor, list) and all(isinstance(x, (int, float)) for x in factor)):
                raise ValueError(f"`rope_parameters`' {name} must be a list of numbers, got {factor!r}")
            if len(factor) != rotary_half:
                raise ValueError(
                    f"`rope_parameters`' {name} must have length {rotary_half}, got {len(factor)}"
                )


__all__ = ["KPhi3Config", "check_kphi3_config"]
