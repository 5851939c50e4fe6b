"""RPO's NLL term on the chosen answer (train.py --dpo-nll), fused, against plain autograd."""
import pytest
import torch
import torch.nn.functional as F

from losses import fused_dpo_loss


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_fused_dpo_with_nll_term_matches_autograd(alpha):
    torch.manual_seed(0)
    lengths = [(3, 5), (4, 2), (6, 6)]                      # (chosen, rejected) tokens of each pair
    seq = torch.tensor([2 * i + j for i, (c, r) in enumerate(lengths) for j, n in enumerate((c, r))
                        for _ in range(n)])
    N, H, V, beta = len(seq), 8, 11, 0.1
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    ref_c, ref_r = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    loss, _, _ = fused_dpo_loss(hidden, weight, targets, seq, ref_c, ref_r, beta=beta, nll_weight=alpha)
    loss.backward()
    fused = loss.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    token = F.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)  # the naive way
    seqlp = torch.zeros(6, dtype=torch.float64).index_add(0, seq, token)
    pc, pr = seqlp[0::2], seqlp[1::2]
    chosen_len = torch.tensor([c for c, _ in lengths], dtype=torch.float64)
    naive = (-F.logsigmoid(beta * ((pc - ref_c) - (pr - ref_r))) - alpha * pc / chosen_len).mean()
    naive.backward()
    torch.testing.assert_close(fused[0], naive.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[1], hidden.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fused[2], weight.grad, rtol=1e-9, atol=1e-10)
