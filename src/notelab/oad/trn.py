"""TRN: Temporal Recurrent Network (Xu et al. 2019, "Temporal Recurrent Networks for Online Action
Detection", ICCV, sec. 3) and the plain LSTM / GRU baselines.

At every step ``t`` of the window the encoder reads the frame together with the anticipated future
of the previous step; a temporal decoder, started from the encoder's state, rolls ``Q`` steps
ahead, each step's action scores fed to the next, and the average of its (projected) hidden states
is that anticipated future, fed back at the next step::

    x_t  = ReLU(W_x f_t)                                      the fusion layer, d_in -> d_fusion
    (h_t, c_t) = LSTMCell_enc([x_t ; u_{t-1}], (h_{t-1}, c_{t-1}))          u_0 = 0 (d_fusion)
    s_t  = W_c h_t                                            current-frame scores
    g_0 = ReLU(W_h h_t),  k_0 = ReLU(W_k c_t),  a_0 = 0
    (g_i, k_i) = LSTMCell_dec(a_{i-1}, (g_{i-1}, k_{i-1})),  p_i = W_c g_i,  a_i = ReLU(W_a p_i)   i = 1..Q
    u_t  = (1/Q) sum_i ReLU(W_u g_i)                          d_hidden -> d_fusion

The classifier ``W_c`` is shared by the encoder and the decoder, and the layer sizes follow the
official THUMOS'14 model (4096 LSTM units, the fusion layer as wide as the 3072-d two-stream input).
The detector's output is the last step's ``s_T`` and its anticipated ``p_1..p_Q``; unlike the
official training, which also supervises every earlier step of the window, every detector here is
trained on the current frame and its anticipation only (:mod:`notelab.oad.loss`).

Speed: neither recurrence can run as one ``nn.LSTM`` (cuDNN) call, since each feeds its own output
back as its next input (the encoder reads ``u_{t-1}``, a function of ``h_{t-1}``; the decoder reads
``a_{i-1}``, a function of ``g_{i-1}``), so a window is ``T (Q + 1)`` cell steps, one after the other.
What does not depend on the recurrence is taken out of the loop: the fusion layer over the whole
window in one matmul, ``u`` in one matmul over the stacked ``g_1..g_Q``, the future scores stacked
only at the last step, no dropout calls in evaluation. Streaming on CUDA replays the whole window
as one CUDA graph (:class:`notelab.oad.OnlineDetector`).
"""

from __future__ import annotations

import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.oad.config import RNNDetectorConfig, TRNConfig
from notelab.oad.oadtr import OADOutput, check_window


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class TRN(PretrainedMixin, nn.Module):
    config_class = TRNConfig
    model_type = "trn"

    def __init__(self, config: TRNConfig) -> None:
        super().__init__()
        self.config = c = config
        self.fusion = nn.Linear(c.d_in, c.d_fusion)
        self.enc = nn.LSTMCell(2 * c.d_fusion, c.d_hidden)
        self.h_to_dec = nn.Linear(c.d_hidden, c.d_hidden)
        self.c_to_dec = nn.Linear(c.d_hidden, c.d_hidden)
        self.dec = nn.LSTMCell(c.d_hidden, c.d_hidden)
        self.scores_to_input = nn.Linear(c.n_classes, c.d_hidden)
        self.to_future = nn.Linear(c.d_hidden, c.d_fusion)
        self.classifier = nn.Linear(c.d_hidden, c.n_classes)
        self.drop = nn.Dropout(c.dropout)

    def anticipate(
        self, h: torch.Tensor, c: torch.Tensor, scores: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Roll the decoder ``Q`` steps from the encoder state: ``(future scores (B, Q, C) or None, u (B, d_fusion))``.

        Only ``p_i`` feeds the next step; ``u`` is one matmul over the stacked ``g_1..g_Q`` after the
        roll, and the scores are stacked only when asked for (the detector reads them at the last
        encoder step only): the loop issues as few small kernels as the recurrence allows.
        """
        drop = self.drop if self.training else _identity
        g, k = torch.relu(self.h_to_dec(h)), torch.relu(self.c_to_dec(c))
        a = h.new_zeros(h.shape)
        gs, ps = [], []
        for _ in range(self.config.n_future):
            g, k = self.dec(drop(a), (g, k))
            p = self.classifier(drop(g))
            a = torch.relu(self.scores_to_input(p))
            gs.append(g)
            ps.append(p)
        u = torch.relu(self.to_future(torch.stack(gs))).mean(dim=0)
        return (torch.stack(ps, dim=1) if scores else None), u

    def forward(self, features: torch.Tensor) -> OADOutput:
        check_window("TRN", features, self.config.window, self.config.d_in)
        drop = self.drop if self.training else _identity
        # The fusion layer does not depend on the recurrence: one matmul over the whole window.
        x = drop(torch.relu(self.fusion(features)))
        h = features.new_zeros(features.shape[0], self.config.d_hidden)
        c = h
        u = features.new_zeros(features.shape[0], self.config.d_fusion)
        last = features.shape[1] - 1
        future = None
        for t in range(last + 1):
            h, c = self.enc(torch.cat([x[:, t], drop(u)], dim=-1), (h, c))
            future, u = self.anticipate(h, c, scores=t == last)
        return OADOutput(self.classifier(drop(h)), future)


class RNNDetector(PretrainedMixin, nn.Module):
    """LSTM or GRU (``config.cell``) over the window; the last hidden state classifies the current frame."""

    config_class = RNNDetectorConfig
    model_type = "rnn_detector"
    cells = {"lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, config: RNNDetectorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.rnn = self.cells[c.cell](
            c.d_in, c.d_hidden, c.n_layers, batch_first=True, dropout=c.dropout if c.n_layers > 1 else 0.0
        )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.d_hidden, c.n_classes)

    def forward(self, features: torch.Tensor) -> OADOutput:
        check_window(self.config.cell.upper(), features, self.config.window, self.config.d_in)
        out, _ = self.rnn(features)
        return OADOutput(self.head(self.drop(out[:, -1])), None)
