"""Sequence-to-sequence models: the Transformer and its RNN / LSTM / GRU baselines (issue 3)."""

from notelab.seq.decoding import beam_search, generate, gnmt_length_penalty, greedy_decode
from notelab.seq.losses import label_smoothed_ce, noam_lr, noam_peak_lr, noam_schedule, seq2seq_loss
from notelab.seq.rnn import RNNCache, RNNMemory, RNNSeq2Seq, RNNSeq2SeqConfig
from notelab.seq.transformer import (
    DecoderLayer,
    EncoderLayer,
    MultiHeadAttention,
    PostNorm,
    PreNorm,
    Transformer,
    TransformerCache,
    TransformerConfig,
)

__all__ = [
    "DecoderLayer",
    "EncoderLayer",
    "MultiHeadAttention",
    "PostNorm",
    "PreNorm",
    "RNNCache",
    "RNNMemory",
    "RNNSeq2Seq",
    "RNNSeq2SeqConfig",
    "Transformer",
    "TransformerCache",
    "TransformerConfig",
    "beam_search",
    "generate",
    "gnmt_length_penalty",
    "greedy_decode",
    "label_smoothed_ce",
    "noam_lr",
    "noam_peak_lr",
    "noam_schedule",
    "seq2seq_loss",
]
