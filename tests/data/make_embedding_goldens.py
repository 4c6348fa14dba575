"""Writes golden_embedding_losses.npz: the EGA reference's comparison losses on fixed inputs.

Not part of the test run (it needs PyTorch and a checkout of the reference code). Run as

    python make_embedding_goldens.py /path/to/yccm-EGA golden_embedding_losses.npz

with the reference at commit 0963f8e (its distiller_zoo/ and crd/ packages are imported as they
are). The file holds the inputs, each loss and its gradients with respect to the student inputs,
and for CRD two consecutive steps of the memory (banks, normalisation constants, embeddings).
"""

import sys

import numpy as np
import torch


def main(reference_dir: str, out_path: str) -> None:
  sys.path.insert(0, reference_dir)
  import crd.memory
  crd.memory.AliasMethod.cuda = lambda self: None  # CPU only; the sampler is not used here.
  from crd.criterion import CRDLoss
  from distiller_zoo import CCL, HintLoss, NCELoss, PKT, RKDLoss

  torch.manual_seed(0)
  rng = np.random.RandomState(0)
  b, d, c = 8, 16, 4
  g = {"B": b, "D": d, "C": c}
  g["fs"] = rng.randn(b, d).astype(np.float32)
  g["ft"] = (0.6 * g["fs"] + 0.8 * rng.randn(b, d)).astype(np.float32)
  g["labels"] = np.array([0, 1, 2, 3, 0, 1, 2, 0], np.int64)
  g["logit_s"] = rng.randn(b, c).astype(np.float32)
  g["logit_t"] = (2.0 * rng.randn(b, c)).astype(np.float32)

  def run(name, fn, with_logits=False):
    fs = torch.tensor(g["fs"], requires_grad=True)
    ft = torch.tensor(g["ft"])
    logit_s = torch.tensor(g["logit_s"], requires_grad=True)
    logit_t = torch.tensor(g["logit_t"])
    labels = torch.tensor(g["labels"])
    loss = fn(fs, ft, labels, logit_s, logit_t)
    loss.backward()
    g[f"{name}_loss"] = loss.detach().numpy().astype(np.float32)
    g[f"{name}_grad_fs"] = fs.grad.numpy()
    if with_logits:
      g[f"{name}_grad_logit_s"] = logit_s.grad.numpy()

  run("hint", lambda fs, ft, y, ls, lt: HintLoss()(fs, ft))
  run("rkd", lambda fs, ft, y, ls, lt: RKDLoss()(fs, ft))
  run("pkt", lambda fs, ft, y, ls, lt: PKT()(fs, ft))
  run("nce", lambda fs, ft, y, ls, lt: NCELoss(temperature=0.1)(fs, ft, y))
  run("ccl", lambda fs, ft, y, ls, lt: CCL()(fs, ft, y, ls, lt), with_logits=True)

  # CRD: two steps of the memory on two batches; N examples, K negatives, feat_dim F.
  n, k, f = 20, 5, 6
  opt = type("Opt", (), dict(s_dim=d, t_dim=d, feat_dim=f, nce_k=k, nce_t=0.07, nce_m=0.5,
                             n_data=n))()
  criterion = CRDLoss(opt)
  g.update(crd_N=n, crd_K=k, crd_F=f)
  g["crd_embed_s_w"] = criterion.embed_s.linear.weight.detach().numpy().copy()
  g["crd_embed_s_b"] = criterion.embed_s.linear.bias.detach().numpy().copy()
  g["crd_embed_t_w"] = criterion.embed_t.linear.weight.detach().numpy().copy()
  g["crd_embed_t_b"] = criterion.embed_t.linear.bias.detach().numpy().copy()
  g["crd_memory_s0"] = criterion.contrast.memory_v1.numpy().copy()
  g["crd_memory_t0"] = criterion.contrast.memory_v2.numpy().copy()
  for step in (1, 2):
    index = rng.permutation(n)[:b]
    contrast = np.stack([np.concatenate([[i], rng.choice(np.delete(np.arange(n), i), k,
                                                         replace=False)]) for i in index])
    fs = torch.tensor(g["fs"] if step == 1 else rng.randn(b, d).astype(np.float32),
                      requires_grad=True)
    ft = torch.tensor(g["ft"] if step == 1 else rng.randn(b, d).astype(np.float32))
    criterion.zero_grad()
    loss = criterion(fs, ft, torch.tensor(index), torch.tensor(contrast))
    loss.backward()
    p = f"crd{step}_"
    g[p + "fs"], g[p + "ft"] = fs.detach().numpy(), ft.numpy()
    g[p + "index"], g[p + "contrast_index"] = index.astype(np.int32), contrast.astype(np.int32)
    g[p + "loss"] = loss.detach().numpy().astype(np.float32)
    g[p + "grad_fs"] = fs.grad.numpy()
    g[p + "grad_embed_s_w"] = criterion.embed_s.linear.weight.grad.numpy().copy()
    g[p + "grad_embed_t_w"] = criterion.embed_t.linear.weight.grad.numpy().copy()
    g[p + "memory_s"] = criterion.contrast.memory_v1.numpy().copy()
    g[p + "memory_t"] = criterion.contrast.memory_v2.numpy().copy()
    g[p + "z_s"] = np.float32(criterion.contrast.params[2].item())
    g[p + "z_t"] = np.float32(criterion.contrast.params[3].item())
  np.savez(out_path, **{k: np.asarray(v) for k, v in g.items()})


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
