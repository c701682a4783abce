"""VQ-VAE: vector quantisation with a straight-through estimator, EMA codebook and dead-code restart,
a convolutional image autoencoder over integer codes, and a ``notelab.lm`` Llama prior over them."""

from notelab.vq.model import VQVAE, ResidualBlock, VQVAEConfig, vqvae_loss
from notelab.vq.prior import (
    bits_per_dim_bound,
    code_nll,
    code_sequences,
    encode_dataset,
    prior_bits_per_dim,
    prior_config,
    sample_codes,
    train_prior,
)
from notelab.vq.quantizer import VectorQuantizer, ema_codebook, laplace_smooth, nearest_codes, squared_distances
from notelab.vq.train import config_for, evaluate, fit_vqvae, train_vqvae

__all__ = [
    "VQVAE",
    "ResidualBlock",
    "VQVAEConfig",
    "VectorQuantizer",
    "bits_per_dim_bound",
    "code_nll",
    "code_sequences",
    "config_for",
    "ema_codebook",
    "encode_dataset",
    "evaluate",
    "fit_vqvae",
    "laplace_smooth",
    "nearest_codes",
    "prior_bits_per_dim",
    "prior_config",
    "sample_codes",
    "squared_distances",
    "train_prior",
    "train_vqvae",
    "vqvae_loss",
]
