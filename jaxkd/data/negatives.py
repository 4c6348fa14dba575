"""Negative examples for contrastive distillation (CRD's 'exact' sampling), drawn in the pipeline.

For training example i of class c, the negatives are K training examples of other classes,
drawn uniformly without replacement (with replacement only when fewer than K exist), as the
reference's dataset does per example. They are a pure function of the example's key, so a
resumed run draws the same ones.
"""

import numpy as np
import tensorflow as tf

from jaxkd import errors


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
    self.order = tf.constant(np.argsort(labels, kind='stable'), tf.int64)
    self.start = tf.constant(np.cumsum(counts) - counts, tf.int64)
    self.count = tf.constant(counts, tf.int64)

  def __call__(self, index: tf.Tensor, label: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """int32 [K + 1]: `index`, then K examples of classes other than `label`."""
    k = self.num_negatives
    label = tf.cast(label, tf.int64)
    start, count = self.start[label], self.count[label]
    others = self.num_data - count
    positions = tf.cond(
        k <= others,
        lambda: tf.random.experimental.index_shuffle(tf.range(k, dtype=tf.int64), key,
                                                     others - 1),
        lambda: tf.random.stateless_uniform([k], key, 0, others, dtype=tf.int64))
    positions = tf.where(positions < start, positions, positions + count)
    negatives = tf.gather(self.order, positions)
    return tf.cast(tf.concat([tf.reshape(tf.cast(index, tf.int64), [1]), negatives], 0),
                   tf.int32)
