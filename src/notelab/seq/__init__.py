"""Sequence-to-sequence models: the Transformer and its RNN / LSTM / GRU baselines, tasks, training, probes."""

from notelab.seq.decoding import beam_search, generate, gnmt_length_penalty, greedy_decode
from notelab.seq.factory import build_model, load_model
from notelab.seq.losses import label_smoothed_ce, noam_lr, noam_peak_lr, noam_schedule, seq2seq_loss
from notelab.seq.rnn import RNNCache, RNNMemory, RNNSeq2Seq, RNNSeq2SeqConfig
from notelab.seq.tasks import StdlibDocTask, SyntheticTask, corpus_bleu, exact_match, make_task, sequence_accuracy
from notelab.seq.training import evaluate, train_seq, translate
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
    "StdlibDocTask",
    "SyntheticTask",
    "Transformer",
    "TransformerCache",
    "TransformerConfig",
    "beam_search",
    "build_model",
    "corpus_bleu",
    "evaluate",
    "exact_match",
    "generate",
    "gnmt_length_penalty",
    "greedy_decode",
    "label_smoothed_ce",
    "load_model",
    "make_task",
    "noam_lr",
    "noam_peak_lr",
    "noam_schedule",
    "seq2seq_loss",
    "sequence_accuracy",
    "train_seq",
    "translate",
]
