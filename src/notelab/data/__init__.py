"""Data sets behind one loader (toy 2-D densities, scikit-learn digits, image folders, arrays), the stdlib text
corpus, and the byte-level BPE tokenizer shared by every text model."""

from notelab.data.datasets import ArrayDataset, dataset_names, load_dataset
from notelab.data.images import load_image_folder
from notelab.data.text import FunctionRecord, stdlib_corpus, stdlib_files, stdlib_functions
from notelab.data.tokenizer import Tokenizer
from notelab.data.toy import TOY_DENSITIES, Checkerboard, GaussianMixture2D, NoisyCurve, Rings, ToyDensity, toy_density

__all__ = [
    "TOY_DENSITIES",
    "ArrayDataset",
    "Checkerboard",
    "FunctionRecord",
    "GaussianMixture2D",
    "NoisyCurve",
    "Rings",
    "Tokenizer",
    "ToyDensity",
    "dataset_names",
    "load_dataset",
    "load_image_folder",
    "stdlib_corpus",
    "stdlib_files",
    "stdlib_functions",
    "toy_density",
]
