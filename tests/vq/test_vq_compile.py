"""Under torch.compile (what fit does on CUDA) a training step equals the eager one: the statistics run
eagerly (compiler.disable) and updates land in the same buffers."""

import torch

from notelab.vq import VQVAE, VQVAEConfig, vqvae_loss


def test_compiled_training_steps_equal_eager_ones():
    torch.manual_seed(0)
    config = VQVAEConfig(hidden=8, res_blocks=1, code_dim=4, codebook_size=8, ema=True, dead_code_threshold=1.0)
    compiled_model, eager = VQVAE(config), VQVAE(config)
    eager.load_state_dict(compiled_model.state_dict())
    compiled = torch.compile(compiled_model)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    for step in range(3):
        torch.manual_seed(step)  # the restarts draw from the global generator
        loss_c, _ = vqvae_loss(compiled, x)
        loss_c.backward()
        torch.manual_seed(step)
        loss_e, _ = vqvae_loss(eager, x)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(compiled_model.quantizer.codebook, eager.quantizer.codebook)
    assert int(compiled_model.quantizer.steps) == 3
    for a, b in zip(compiled_model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
