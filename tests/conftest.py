import torch

# `make test` runs two pytest workers on two cores: one intra-op thread each avoids oversubscription,
# which makes tiny-tensor tests many times slower.
torch.set_num_threads(1)
