"""A Llama-family decoder with SkipGPT's routers: gated dense computation for training, real skipping for inference.

`RoutedLM` wraps a Hugging Face causal LM (SmolLM2, or the language model inside a vision-language model)
without a forked modeling file: it keeps the model's own embedding, rotary embedding, decoder layers' norms,
attention and MLP modules, final norm and LM head, adds two routers per layer (`routers.py`), and runs the
decoder loop itself, because each layer needs its own attention mask (the keys of tokens that skip its
attention are dropped, see `cache.py`). The model's own forward is left untouched: it is the dense reference.

Per layer, both routers read the layer input h (before its norm), then

    h <- h + g_attn * Attn(norm h);  h <- h + g_mlp * MLP(norm h)

with g in {0, 1} per token. Padding tokens (attention_mask 0) skip every module: they write no K/V and are
never attended to, so a padded batch computes what its rows compute one by one.

Two ways to compute the same thing:
- gated (`skip=False`, training): every module runs for every token and its output is multiplied by the gate,
  so gradients reach the routers (straight through); the mask drops skipped tokens' keys, but each token
  always sees itself, so a skipped token's (discarded) attention row is never empty;
- real skipping (`skip=True`, inference): the tokens that run a module are gathered (per row, in order, as
  packed slots with their original rotary positions), only they are computed, and the result is scattered
  back; a module no token runs is not called at all, and one every token runs gathers nothing.

Attention goes through each layer's own module (SDPA or eager), with our mask and, when decoding, our cache
(`cache.SkipCache`) in place of Hugging Face's; LoRA layers peft puts inside it are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from efficient_models.skipgpt.cache import SkipCache, attention_bias
from efficient_models.skipgpt.routers import LayerRouters, run_gate
from workbench.errors import InputError

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class RoutedOutput:
    logits: torch.Tensor  # (batch, tokens, vocab)
    attention_gates: list[torch.Tensor]  # per layer, (batch, tokens): 1 where the token ran attention
    mlp_gates: list[torch.Tensor]  # per layer, (batch, tokens): 1 where the token ran the MLP
    real: torch.Tensor  # (batch, tokens) bool: real tokens (not padding)


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder stack, LM head) of a causal LM or a vision-language model (its language model's stack)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    decoder = getattr(decoder, "language_model", decoder)
    layers = getattr(decoder, "layers", None)
    if head is None or layers is None or not all(hasattr(layer, part) for layer in layers for part in LAYER_PARTS):
        raise InputError(f"{type(model).__name__} is not a Llama-family LM: SkipGPT needs decoder layers with "
                         f"{', '.join(LAYER_PARTS)}")
    return decoder, head


class RoutedLM(nn.Module):
    """`model` with SkipGPT routers on every decoder layer; `forward` runs gated or with real skipping."""

    def __init__(self, model: nn.Module, reduction: int = 4) -> None:
        super().__init__()
        self.model = model
        decoder, _ = decoder_parts(model)
        hidden = decoder.config.hidden_size
        parameter = next(model.parameters())
        self.routers = nn.ModuleList(LayerRouters(hidden, reduction) for _ in decoder.layers).to(
            device=parameter.device, dtype=parameter.dtype)

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: SkipCache | None = None, temperature: float | torch.Tensor | None = None,
                noise: float | torch.Tensor = 1.0, skip: bool = False) -> RoutedOutput:
        """Logits and every layer's gates. `temperature` None routes by argmax, else by Gumbel samples with
        their noise scaled by `noise` (see `routers.run_gate`); `skip` computes only the tokens that run each
        module (argmax routing only); `cache` is read and extended.

        Position ids default to each row's count of real tokens before the token (after those in `cache`).
        """
        if skip and temperature is not None:
            raise ValueError("real skipping routes by argmax: pass temperature=None")
        decoder, head = decoder_parts(self.model)
        hidden = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, tokens = hidden.shape[:2]
        real = (torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device) if attention_mask is None
                else attention_mask.bool())
        if position_ids is None:
            seen = 0 if cache is None or cache.real_seen is None else cache.real_seen[:, None]
            position_ids = (seen + real.long().cumsum(1) - 1).clamp(min=0)
        if cache is not None:
            cache.real_seen = real.long().sum(1) + (0 if cache.real_seen is None else cache.real_seen)
        cos, sin = decoder.rotary_emb(hidden, position_ids)
        rotary = (cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
        attention_gates, mlp_gates = [], []
        for index, (layer, routers) in enumerate(zip(decoder.layers, self.routers, strict=True)):
            # Padding's gates are 0: it is never attended to, and real skipping never computes it.
            attention_gate = run_gate(routers.attention(hidden), temperature, noise) * real
            mlp_gate = run_gate(routers.mlp(hidden), temperature, noise) * real
            step = _skipping_layer if skip else _gated_layer
            hidden = step(layer, index, hidden, rotary, attention_gate, mlp_gate, cache)
            attention_gates.append(attention_gate)
            mlp_gates.append(mlp_gate)
        logits = head(decoder.norm(hidden))
        return RoutedOutput(logits, attention_gates, mlp_gates, real)


def _attend(layer, index, states, rotary, valid, cache) -> torch.Tensor:
    """The layer's own attention module over `states`, whose keys count only where `valid` (cached, if a cache)."""
    batch = states.shape[0]
    past = (torch.zeros(batch, 0, dtype=torch.bool, device=states.device) if cache is None
            else cache.past_valid(index, batch, states.device))
    # Nothing to drop (no past, every slot valid): SDPA's own causal mask (mask None), which takes its causal
    # kernel; eager attention reads None as no mask at all, so it always gets ours.
    plain = (layer.self_attn.config._attn_implementation == "sdpa" and past.shape[1] == 0 and bool(valid.all()))
    output, _ = layer.self_attn(hidden_states=layer.input_layernorm(states), position_embeddings=rotary,
                                attention_mask=None if plain else attention_bias(past, valid, states.dtype),
                                past_key_values=None if cache is None else cache.writer(index, valid))
    return output


def _gated_layer(layer, index, hidden, rotary, attention_gate, mlp_gate, cache):
    """Every module for every token, times its gate (differentiable in the gates)."""
    hidden = hidden + attention_gate[..., None] * _attend(layer, index, hidden, rotary, attention_gate.bool(), cache)
    return hidden + mlp_gate[..., None] * layer.mlp(layer.post_attention_layernorm(hidden))


def _skipping_layer(layer, index, hidden, rotary, attention_gate, mlp_gate, cache):
    """Only the tokens that run each module, gathered and scattered back."""
    runs = attention_gate.bool()
    counts = runs.sum(1)
    width = int(counts.max())
    if bool(runs.all()):  # every token runs: nothing to gather
        hidden = hidden + _attend(layer, index, hidden, rotary, runs, cache)
    elif width:
        rows, columns = runs.nonzero(as_tuple=True)
        slots = (runs.long().cumsum(1) - 1)[rows, columns]  # each running token's place in its row's pack
        packed = hidden.new_zeros(hidden.shape[0], width, hidden.shape[2])
        packed[rows, slots] = hidden[rows, columns]
        packed_rotary = []
        for table in rotary:
            packed_table = table.new_zeros(table.shape[0], width, table.shape[2])
            packed_table[rows, slots] = table[rows, columns]
            packed_rotary.append(packed_table)
        valid = torch.arange(width, device=hidden.device)[None, :] < counts[:, None]
        output = _attend(layer, index, packed, tuple(packed_rotary), valid, cache)
        # index_put does not promote as `+` does: under bf16 autocast the module's output is bf16, the stream fp32.
        hidden = hidden.index_put((rows, columns), output[rows, slots].to(hidden.dtype), accumulate=True)
    runs = mlp_gate.bool()
    if bool(runs.all()):
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    elif runs.any():
        rows, columns = runs.nonzero(as_tuple=True)
        output = layer.mlp(layer.post_attention_layernorm(hidden[rows, columns]))
        hidden = hidden.index_put((rows, columns), output.to(hidden.dtype), accumulate=True)
    return hidden
