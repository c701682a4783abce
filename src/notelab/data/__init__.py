"""Data sets behind one loader (toy 2-D densities, scikit-learn digits, image folders, arrays), the stdlib text
corpus, the byte-level BPE tokenizer shared by every text model, and BM25 retrieval over a folder of passages."""

from notelab.data.datasets import ArrayDataset, dataset_names, load_dataset
from notelab.data.images import load_image_folder
from notelab.data.retrieval import BM25Index, Passage, chunk_text
from notelab.data.text import FunctionRecord, stdlib_corpus, stdlib_files, stdlib_functions
from notelab.data.tokenizer import Tokenizer
from notelab.data.toy import TOY_DENSITIES, Checkerboard, GaussianMixture2D, NoisyCurve, Rings, ToyDensity, toy_density

__all__ = [
    "TOY_DENSITIES",
    "ArrayDataset",
    "BM25Index",
    "Checkerboard",
    "FunctionRecord",
    "GaussianMixture2D",
    "NoisyCurve",
    "Passage",
    "Rings",
    "Tokenizer",
    "ToyDensity",
    "chunk_text",
    "dataset_names",
    "load_dataset",
    "load_image_folder",
    "stdlib_corpus",
    "stdlib_files",
    "stdlib_functions",
    "toy_density",
]
