"""RNN / LSTM / GRU encoder-decoders with attention: the pre-Transformer baselines.

Cells (PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, cuDNN on GPU):

    rnn:   h_t = tanh(W x_t + U h_{t-1} + b)                                    (Elman 1990)
    lstm:  i, f, o = sigma(.), g = tanh(.);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)   (Hochreiter & Schmidhuber 1997)
    gru:   z, r = sigma(.);  n = tanh(W x_t + r (U h_{t-1}));  h_t = (1 - z) n + z h_{t-1}   (Cho et al. 2014)

Encoder: an (optionally bidirectional) RNN over the source, run on packed sequences so that
padding never reaches a real token's state; its annotations h_j concatenate both directions.
The decoder's initial state is s_0 = tanh(W_s [h_fwd_final; h_bwd_final]) per layer (Bahdanau et
al. 2015, appendix A.2.2; for the LSTM the memory cell gets its own projection).

Attention over the annotations, with the additive score of Bahdanau et al. (2015, "Neural Machine
Translation by Jointly Learning to Align and Translate", eq. 6 and appendix A.1.2)::

    e_ij = v^T tanh(W s_i + U h_j)        a_ij = softmax_j(e_ij)        c_i = sum_j a_ij h_j

``attention="general"`` uses Luong et al.'s (2015) bilinear score e_ij = s_i^T W h_j (through
``F.scaled_dot_product_attention``, memory linear in length), ``"none"`` none at all (Sutskever et
al. 2014: the decoder sees the source only through s_0).

Placement (a deliberate choice): Bahdanau et al. feed c_i into the recurrence at step i, and so
does Luong's "input feeding"; both make teacher forcing a Python loop over time. Here the decoder
RNN runs over the whole target in one fused call and attention is applied on top of its states,
as in Luong et al. (2015, sec. 3, the "global attention" model without input feeding)::

    s_i = RNN(s_{i-1}, E y_{i-1})    c_i = Attend(s_i, h)    o_i = tanh(W_c [s_i; c_i])    p(y_i) = softmax(W_o o_i)

so the RNN baselines are as parallel as they can be and the comparison with the Transformer is
about recurrence itself. The interface matches ``notelab.seq.transformer.Transformer``:
``encode(src, src_pad) -> RNNMemory``, ``init_cache``, ``decode(tgt, memory, src_pad, cache=...)``,
``forward(src, tgt_in) -> logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.seq.transformer import check_ids, check_pad

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
ATTENTIONS = ("additive", "general", "none")


@dataclass
class RNNSeq2SeqConfig:
    src_vocab: int = 8000
    tgt_vocab: int = 8000
    cell: str = "lstm"  # "rnn" | "lstm" | "gru"
    d_embed: int = 256
    d_hidden: int = 512  # decoder state size; each encoder direction has the same size
    n_layers: int = 1  # stacked layers, encoder and decoder alike
    bidirectional: bool = True  # encoder only
    attention: str = "additive"  # "additive" (Bahdanau) | "general" (Luong bilinear) | "none"
    d_attn: int = 256  # size of the additive score's hidden layer
    dropout: float = 0.1  # on embeddings, between stacked layers, before the output layer
    max_len: int = 512
    tie_embeddings: bool = False  # output projection == target embedding (needs d_hidden == d_embed)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise unknown_name("cell", self.cell, CELLS)
        if self.attention not in ATTENTIONS:
            raise unknown_name("attention", self.attention, ATTENTIONS)
        for name in ("src_vocab", "tgt_vocab", "d_embed", "d_hidden", "n_layers", "d_attn", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"RNNSeq2SeqConfig.{name}: expected an integer >= 1, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"RNNSeq2SeqConfig.dropout: expected a number in [0, 1), got {self.dropout!r}")
        if self.tie_embeddings and self.d_hidden != self.d_embed:
            raise ConfigError(
                f"RNNSeq2SeqConfig.tie_embeddings: needs d_hidden == d_embed, got {self.d_hidden} and {self.d_embed}"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab, self.tgt_vocab):
                raise ConfigError(
                    f"RNNSeq2SeqConfig.{name}: expected an id in [0, {min(self.src_vocab, self.tgt_vocab)}), "
                    f"got {value!r}"
                )


class RNNMemory(NamedTuple):
    """What the decoder needs from the encoder; every tensor is batch-first (beam search repeats rows)."""

    states: torch.Tensor  # (B, S, E) annotations h_j, zero at padding
    keys: torch.Tensor  # (B, S, A) U h_j, precomputed once (additive) or W h_j (general); (B, S, 0) for none
    h0: torch.Tensor  # (B, L, H) the decoder's initial state s_0
    c0: torch.Tensor  # (B, L, H) the LSTM's initial memory cell; (B, L, 0) for the other cells


class RNNCache:
    """The decoder's recurrent state ``(L, B, H)`` between decoding steps (and the LSTM cell)."""

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None, max_len: int) -> None:
        self.h, self.c = h, c
        self.max_len = max_len
        self.length = 0

    def set(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        if isinstance(state, tuple):
            self.h, self.c = state
        else:
            self.h = state

    def reorder(self, index: torch.Tensor) -> None:
        self.h = self.h.index_select(1, index)
        if self.c is not None:
            self.c = self.c.index_select(1, index)


class AdditiveAttention(nn.Module):
    """Bahdanau's score e_ij = v^T tanh(W s_i + U h_j); ``keys`` = U h_j are computed once per source."""

    def __init__(self, d_query: int, d_value: int, d_attn: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(d_value, d_attn, bias=False)  # U
        self.query_proj = nn.Linear(d_query, d_attn)  # W (its bias is Bahdanau's b)
        self.v = nn.Linear(d_attn, 1, bias=False)

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        return self.key_proj(states)

    def forward(self, s: torch.Tensor, keys: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Context ``(B, T, E)`` for decoder states ``s`` ``(B, T, H)``; ``mask`` ``(B, 1, S)`` True = real."""
        # (B, T, S, A): memory grows as T * S * A, the cost of this score at long lengths.
        e = self.v(torch.tanh(self.query_proj(s)[:, :, None] + keys[:, None])).squeeze(-1)
        a = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=-1)
        return a @ states


class BilinearAttention(nn.Module):
    """Luong's "general" score e_ij = s_i^T W h_j, through the fused scaled-dot-product kernel."""

    def __init__(self, d_query: int, d_value: int, d_attn: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(d_value, d_query, bias=False)  # W

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        return self.key_proj(states)

    def forward(self, s: torch.Tensor, keys: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # One head; SDPA's 1/sqrt(d) temperature is a constant the learned W absorbs. Values (the
        # annotations) may be wider than the keys, which SDPA allows.
        return F.scaled_dot_product_attention(s[:, None], keys[:, None], states[:, None], attn_mask=mask[:, None])[:, 0]


ATTENTION_CLASSES = {"additive": AdditiveAttention, "general": BilinearAttention}


class RNNSeq2Seq(PretrainedMixin, nn.Module):
    """RNN / LSTM / GRU encoder-decoder with attention: ``forward(src, tgt_in) -> logits (B, T, tgt_vocab)``.

    Padding must be on the right (real tokens first): the encoder packs each source to its length,
    and the decoder reads left to right, so right padding never changes a real token's output.
    """

    config_class = RNNSeq2SeqConfig
    model_type = "rnn_seq2seq"

    def __init__(self, config: RNNSeq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        rnn = CELLS[c.cell]
        dirs = 2 if c.bidirectional else 1
        inner_dropout = c.dropout if c.n_layers > 1 else 0.0
        d_states = dirs * c.d_hidden
        self.src_embed = nn.Embedding(c.src_vocab, c.d_embed)
        self.tgt_embed = nn.Embedding(c.tgt_vocab, c.d_embed)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = rnn(
            c.d_embed, c.d_hidden, c.n_layers, batch_first=True, dropout=inner_dropout, bidirectional=c.bidirectional
        )
        self.bridge_h = nn.Linear(d_states, c.d_hidden)
        self.bridge_c = nn.Linear(d_states, c.d_hidden) if c.cell == "lstm" else None
        self.decoder = rnn(c.d_embed, c.d_hidden, c.n_layers, batch_first=True, dropout=inner_dropout)
        attn = ATTENTION_CLASSES.get(c.attention)
        self.attn = None if attn is None else attn(c.d_hidden, d_states, c.d_attn)
        self.combine = nn.Linear(c.d_hidden + (d_states if self.attn is not None else 0), c.d_hidden)
        self.lm_head = nn.Linear(c.d_hidden, c.tgt_vocab, bias=False)
        self.reset_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        # PyTorch's default U(-1/sqrt(H), 1/sqrt(H)) for the cells; LSTM forget-gate bias 1 (Gers et al.
        # 2000; Jozefowicz et al. 2015) so that the cell remembers by default, the usual strong baseline.
        if self.config.cell == "lstm":
            h = self.config.d_hidden
            for rnn in (self.encoder, self.decoder):
                for name, p in rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        nn.init.zeros_(p)
                        nn.init.ones_(p.data[h : 2 * h])  # gate order i, f, g, o
                    elif name.startswith("bias_hh"):
                        nn.init.zeros_(p)

    def source_padding(self, src: torch.Tensor, src_pad: torch.Tensor | None) -> torch.Tensor:
        return src == self.config.pad_id if src_pad is None else src_pad

    def _bridge(self, final: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """Final encoder states ``(L * dirs, B, H)`` -> ``(B, L, dirs * H)`` projected to the decoder size."""
        c = self.config
        dirs = 2 if c.bidirectional else 1
        final = final.view(c.n_layers, dirs, final.shape[1], c.d_hidden).permute(2, 0, 1, 3)
        return proj(final.reshape(final.shape[0], c.n_layers, dirs * c.d_hidden))

    def encode(self, src: torch.Tensor, src_pad: torch.Tensor | None = None) -> RNNMemory:
        """Annotations and the decoder's initial state for ``src`` ``(B, S)`` (right-padded)."""
        c = self.config
        check_ids("src", src, c.src_vocab, c.max_len)
        src_pad = self.source_padding(src, src_pad)
        check_pad("src_pad", src_pad, src)
        check_right_padded("src_pad", src_pad)
        b, s = src.shape
        x = self.drop(self.src_embed(src))
        lengths = (~src_pad).sum(1).cpu()
        if bool((lengths < s).any()):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, final = self.encoder(packed)
            states = pad_packed_sequence(out, batch_first=True, total_length=s)[0]
        else:
            states, final = self.encoder(x)
        h_final, c_final = final if isinstance(final, tuple) else (final, None)
        h0 = torch.tanh(self._bridge(h_final, self.bridge_h))
        c0 = h0.new_zeros(b, c.n_layers, 0) if c_final is None else self._bridge(c_final, self.bridge_c)
        keys = states.new_zeros(b, s, 0) if self.attn is None else self.attn.keys(states)
        return RNNMemory(states, keys, h0, c0)

    def init_cache(
        self, memory: RNNMemory, src_pad: torch.Tensor | None = None, max_len: int | None = None
    ) -> RNNCache:
        """A ``RNNCache`` holding s_0 (the decoder state before BOS)."""
        max_len = self.config.max_len if max_len is None else max_len
        if max_len > self.config.max_len:
            raise ShapeError(f"init_cache: max_len {max_len} is beyond the configured max_len {self.config.max_len}")
        return RNNCache(*self._initial_state(memory), max_len)

    def _initial_state(self, memory: RNNMemory) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = memory.h0.transpose(0, 1).contiguous()
        c = memory.c0.transpose(0, 1).contiguous() if self.config.cell == "lstm" else None
        return h, c

    def decode(
        self,
        tgt: torch.Tensor,
        memory: RNNMemory,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
        cache: RNNCache | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, tgt_vocab)`` of the next token after each of ``tgt`` ``(B, T)``.

        One fused RNN call over all ``T`` inputs; with ``cache`` it starts from (and updates) the
        cached state. ``src_pad`` is the source padding (None: none); ``tgt_pad`` may only mark
        right padding, which cannot change earlier outputs of a left-to-right decoder.
        """
        c = self.config
        start = 0 if cache is None else cache.length
        check_ids("tgt", tgt, c.tgt_vocab, c.max_len if cache is None else cache.max_len, offset=start)
        if memory.states.shape[0] != tgt.shape[0]:
            raise ShapeError(
                f"decode: expected memory for a batch of {tgt.shape[0]}, got {memory.states.shape[0]} rows"
            )
        if tgt_pad is not None:
            check_pad("tgt_pad", tgt_pad, tgt)
            check_right_padded("tgt_pad", tgt_pad)
        h, cell = self._initial_state(memory) if cache is None else (cache.h, cache.c)
        s, state = self.decoder(self.drop(self.tgt_embed(tgt)), h if cell is None else (h, cell))
        if cache is not None:
            cache.set(state)
            cache.length += tgt.shape[1]
        if self.attn is not None:
            b, n = memory.states.shape[:2]
            real = torch.ones(b, 1, n, dtype=torch.bool, device=s.device) if src_pad is None else ~src_pad[:, None]
            s = torch.cat([s, self.attn(s, memory.keys, memory.states, real)], dim=-1)
        return self.lm_head(self.drop(torch.tanh(self.combine(s))))

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        src_pad: torch.Tensor | None = None,
        tgt_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, tgt_vocab)`` for decoder input ``tgt_in`` (BOS y_1 .. y_{T-1})."""
        src_pad = self.source_padding(src, src_pad)
        return self.decode(tgt_in, self.encode(src, src_pad), src_pad, tgt_pad)


def check_right_padded(name: str, pad: torch.Tensor) -> None:
    """Padding must follow every real token: a real token after a pad breaks packing."""
    if not torch.compiler.is_compiling() and bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        raise ShapeError(f"{name}: expected padding on the right (real tokens first), got a real token after a pad")
