"""Metrics shared by the families: Frechet distance (FD-digits), MMD, log-likelihood under known densities,
token log-probabilities / entropy / perplexity, ranking (AUC-PR, AUC-ROC), plots."""

from notelab.eval.digits import (
    DigitsClassifier,
    DigitsClassifierConfig,
    digits_accuracy,
    digits_classifier,
    digits_features,
    fd_digits,
    train_digits_classifier,
)
from notelab.eval.frechet import fd_from_features, feature_statistics, frechet_distance
from notelab.eval.likelihood import bits_per_dim
from notelab.eval.logprobs import perplexity, score_sequences, token_entropy, token_logprobs
from notelab.eval.plots import image_grid, line_png, save_image_grid, scatter_png
from notelab.eval.points import mean_log_likelihood, median_bandwidth, mmd, rbf_kernel
from notelab.eval.ranking import auc_pr, auc_roc

__all__ = [
    "auc_pr",
    "auc_roc",
    "bits_per_dim",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "digits_accuracy",
    "digits_classifier",
    "digits_features",
    "fd_digits",
    "fd_from_features",
    "feature_statistics",
    "frechet_distance",
    "image_grid",
    "line_png",
    "mean_log_likelihood",
    "median_bandwidth",
    "mmd",
    "perplexity",
    "rbf_kernel",
    "save_image_grid",
    "scatter_png",
    "score_sequences",
    "token_entropy",
    "token_logprobs",
    "train_digits_classifier",
]
