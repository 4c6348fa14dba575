"""Negative examples for contrastive distillation (CRD's 'exact' sampling), drawn in the pipeline.

For training example i of class c, the negatives are K training examples of other classes,
drawn uniformly without replacement (with replacement only when fewer than K exist), as the
reference's dataset does per example. They are a pure function of the example's key, so a
resumed run draws the same ones.
"""

import numpy as np

from jaxkd import errors
from jaxkd.data import keys


class OtherClassSampler:
  """contrast_index(i, c, key) = [i, K indices of training examples whose class is not c].

  The training set is sorted by class: class c occupies positions [start_c, start_c + n_c) of
  `order`, so position p < N − n_c of "everything but c" is p, or p + n_c past the block.
  """

  def __init__(self, labels: np.ndarray, num_negatives: int):
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels)
    if np.any(len(labels) - counts[labels] == 0):
      raise errors.UserError(
          'contrastive negatives need training examples of at least two classes; this '
          'training set has one')
    self.num_data = len(labels)
    self.num_negatives = num_negatives
    self.order = np.argsort(labels, kind='stable')
    self.start = np.cumsum(counts) - counts
    self.count = counts

  def __call__(self, index: int, label: int, key: keys.Key) -> np.ndarray:
    """int32 [K + 1]: `index`, then K examples of classes other than `label`."""
    k, label = self.num_negatives, int(label)
    start, count = self.start[label], self.count[label]
    others = self.num_data - count
    rng = keys.rng(key)
    if k <= others:
      positions = rng.choice(others, k, replace=False, shuffle=False)
    else:
      positions = rng.integers(0, others, k)
    positions = np.where(positions < start, positions, positions + count)
    return np.concatenate([[int(index)], self.order[positions]]).astype(np.int32)
