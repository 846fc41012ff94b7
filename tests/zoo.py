"""The zoo: public architectures from tiny configs with random weights (nothing is downloaded).

Each case builds a model in eval() and its example inputs; tests shard it
with ``plan="auto"`` and compare with the unsharded model. Sizes are the
smallest that keep every dimension a sharding rule looks at (8 heads, or
4 with 2 KV heads; hidden 64) so that 2, 4 and 8 devices all divide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB, SEQ, BATCH = 128, 8, 2
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=64)


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # decoder, encoder, encoder-decoder, vision, audio, torch
    build: Callable[[], tuple[nn.Module, tuple, dict]]
    #: All-reduces per forward at the Megatron optimum: 2 per block (1 where attention and MLP run in
    #: parallel, +1 per cross-attention), 1 per vocabulary-parallel embedding lookup.
    optimum: int = 5
    #: What torch.compile(backend="openxla") alone raises on this model, when it cannot compile it.
    openxla_fails: str = ""


def _ids(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, seq), generator=torch.Generator().manual_seed(0))


def _hf(cls_name: str, config_name: str, inputs: Callable[[], dict] | None = None, **config) -> Callable:
    def build():
        import transformers as t

        tokens = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, decoder_start_token_id=0)
        cfg = getattr(t, config_name)(**{**tokens, **config})
        torch.manual_seed(0)
        model = getattr(t, cls_name)(cfg).eval()
        return model, (), (inputs() if inputs else {"input_ids": _ids()})

    return build


def _decoder(name: str, cls_name: str, config_name: str = "", *, parallel: bool = False, **config) -> Case:
    """A causal LM of 2 blocks; ``parallel``: attention and MLP read the same input and are summed (one all-reduce)."""
    config_name = config_name or cls_name.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config")
    inputs = lambda: {"input_ids": _ids(), "use_cache": False}  # noqa: E731
    return Case(name, "decoder", _hf(cls_name, config_name, inputs, **config), optimum=3 if parallel else 5)


def _seq2seq() -> dict:
    return {"input_ids": _ids(), "decoder_input_ids": _ids(6), "use_cache": False}


def _pixels(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(0))


def _audio() -> torch.Tensor:
    return torch.randn(BATCH, 400, generator=torch.Generator().manual_seed(0))


def _gqa(**extra) -> dict:
    return {**_SMALL, "num_key_value_heads": 4, **extra}


def _timm(name: str, **kwargs) -> Callable:
    def build():
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        return model, (_pixels(kwargs.get("img_size", 32)),), {}

    return build


def _torchvision_vit() -> tuple[nn.Module, tuple, dict]:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=8, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # zero-initialized: the output would be 0 whatever came before
    return model, (_pixels(),), {}


def _torchvision_swin() -> tuple[nn.Module, tuple, dict]:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[8], window_size=[4, 4],
                            num_classes=10).eval()
    return model, (_pixels(),), {}


class _EncoderClassifier(nn.Module):
    """PyTorch's own nn.TransformerEncoder over embeddings, as its tutorial writes it."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        layer = nn.TransformerEncoderLayer(64, 8, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)))


class _Seq2Seq(nn.Module):
    """PyTorch's own nn.Transformer (encoder and decoder with cross-attention), causal target mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.transformer = nn.Transformer(64, 8, 1, 1, 128, dropout=0.1, batch_first=True)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        return self.head(self.transformer(self.embed(src), self.embed(tgt), tgt_mask=mask, tgt_is_causal=True))


def _torch(module: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> Callable:
    def build():
        torch.manual_seed(0)
        return module().eval(), inputs(), {}

    return build


CASES: tuple[Case, ...] = (
    # Decoders.
    _decoder("llama", "LlamaForCausalLM", **_gqa()),
    _decoder("mistral", "MistralForCausalLM", **_gqa()),
    _decoder("qwen2", "Qwen2ForCausalLM", **_gqa()),
    _decoder("qwen3", "Qwen3ForCausalLM", **_gqa(head_dim=8)),
    _decoder("gemma", "GemmaForCausalLM", **_gqa(head_dim=8)),
    _decoder("gemma2", "Gemma2ForCausalLM", **_gqa(head_dim=8, attn_logit_softcapping=2.0)),
    _decoder("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", **_gqa(head_dim=8, sliding_window=4)),
    _decoder("phi3", "Phi3ForCausalLM", **_gqa()),
    _decoder("phi", "PhiForCausalLM", parallel=True, **_SMALL),
    _decoder("falcon-7b", "FalconForCausalLM", parallel=True, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=8, multi_query=True, parallel_attn=True),
    _decoder("falcon-40b", "FalconForCausalLM", parallel=True, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
             num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True),
    _decoder("gpt-neox", "GPTNeoXForCausalLM", parallel=True, **_SMALL),
    _decoder("gpt-j", "GPTJForCausalLM", parallel=True, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_positions=64, rotary_dim=8),
    _decoder("opt", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
             num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=64),
    _decoder("bloom", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=8),
    _decoder("olmo", "OlmoForCausalLM", **_SMALL),
    _decoder("olmo2", "Olmo2ForCausalLM", **_SMALL),
    _decoder("gpt2", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_positions=64),
    _decoder("gpt-bigcode", "GPTBigCodeForCausalLM", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_positions=64),
    _decoder("starcoder2", "Starcoder2ForCausalLM", **_gqa()),
    _decoder("stablelm", "StableLmForCausalLM", **_SMALL, num_key_value_heads=8),
    _decoder("codegen", "CodeGenForCausalLM", parallel=True, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=8, n_positions=64,
             rotary_dim=8),
    # Encoders.
    Case("bert", "encoder", _hf("BertModel", "BertConfig", **_SMALL)),
    Case("roberta", "encoder", _hf("RobertaModel", "RobertaConfig", **{**_SMALL, "max_position_embeddings": 72})),
    Case("distilbert", "encoder", _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=64, hidden_dim=128,
                                      n_layers=2, n_heads=8)),
    Case("electra", "encoder", _hf("ElectraModel", "ElectraConfig", **_SMALL, embedding_size=64)),
    # Encoder-decoders.
    Case("t5", "encoder-decoder", optimum=7, build=_hf("T5Model", "T5Config", _seq2seq, vocab_size=VOCAB, d_model=64, d_ff=128,
                                      num_layers=1, num_heads=8, d_kv=8)),
    Case("bart", "encoder-decoder", optimum=7, build=_hf("BartModel", "BartConfig", _seq2seq, vocab_size=VOCAB, d_model=64,
                                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=8,
                                        decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        max_position_embeddings=64)),
    # Vision.
    Case("hf-vit", "vision", optimum=4, build=_hf("ViTModel", "ViTConfig", lambda: {"pixel_values": _pixels()}, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, image_size=32,
                                 patch_size=8)),
    Case("timm-vit", "vision", optimum=4, build=_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                     num_heads=8, num_classes=10)),
    Case("timm-beit", "vision", optimum=4, build=_timm("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                                      num_heads=8, num_classes=10)),
    Case("timm-swin", "vision", optimum=4, build=_timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4,
                                      embed_dim=32, depths=(2,), num_heads=(8,), num_classes=10)),
    Case("torchvision-vit", "vision", _torchvision_vit, optimum=4),
    Case("torchvision-swin", "vision", _torchvision_swin, optimum=4,
         openxla_fails="Expected XLA tensor"),  # torch_xla 2.9's dynamo bridge, at adaptive_avg_pool2d
    # Audio.
    Case("whisper", "audio", optimum=6, build=_hf("WhisperModel", "WhisperConfig",
                                 lambda: {"input_features": torch.randn(BATCH, 16, 32, generator=torch.Generator().manual_seed(0)),
                                          "decoder_input_ids": _ids(6), "use_cache": False},
                                 vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                                 decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                                 max_target_positions=16)),
    Case("wav2vec2", "audio", optimum=4, build=_hf("Wav2Vec2Model", "Wav2Vec2Config", lambda: {"input_values": _audio()},
                                  hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                  conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
    # PyTorch's own layers.
    Case("nn-encoder", "torch", _torch(lambda: _EncoderClassifier(norm_first=False), lambda: (_ids(),))),
    Case("nn-encoder-prenorm", "torch", _torch(lambda: _EncoderClassifier(norm_first=True), lambda: (_ids(),))),
    Case("nn-transformer", "torch", _torch(_Seq2Seq, lambda: (_ids(), _ids(6))), optimum=7),
)


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def seed(value: int) -> None:
    """Seed every generator a model's training-mode code draws from (wav2vec2's time masks use numpy's)."""
    import numpy

    torch.manual_seed(value)
    numpy.random.seed(value)


def first_tensor(output) -> torch.Tensor:
    """The output tests compare: a tensor, or the first tensor of a tuple / Hugging Face ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if hasattr(output, "values") else output
    return next(v for v in values if isinstance(v, torch.Tensor))
