"""Stateless randomness of the input pipeline: every draw is a pure function of a key.

A key is a tuple of non-negative ints; an example's is (seed, epoch, its index in the split).
`rng(key)` is a NumPy Generator on the Philox counter-based bit generator, seeded from the key
through SeedSequence, so what it draws depends on the key alone: not on the process, the worker
or the order in which examples are read. `split(key, n)` gives n independent keys;
`strong_view_key(key)` the key of the strong view of views 'weak_strong' (its weak view draws
from `key` itself, as views 'none' does).

The order of an epoch is `permuted(r, n, seed, epoch)`: position r of a permutation of range(n)
that (seed, epoch) alone pick (grain's index_shuffle, computed per position in O(1), so nothing
of size n is held).
"""

import grain
import numpy as np

Key = tuple[int, ...]
# Rounds of the Feistel network behind grain's index_shuffle (grain's own shuffle uses 4).
_SHUFFLE_ROUNDS = 4
# Appended to an example's key for the strong view of views 'weak_strong'.
STRONG_VIEW_STREAM = 1 << 21


def _word(value) -> int:
  """A non-negative int for SeedSequence (a negative seed wraps around 2**64)."""
  return int(value) % (1 << 64)


def example_key(seed, epoch, index) -> Key:
  """The key of one example (its index in the split) in one epoch."""
  return (_word(seed), _word(epoch), _word(index))


def split(key: Key, num: int) -> list[Key]:
  """`num` keys, independent of each other and of `key`'s own draws."""
  return [key + (i,) for i in range(num)]


def strong_view_key(key: Key) -> Key:
  """The key of an example's strong view (views 'weak_strong'), apart from `key`'s own draws,
  from `split(key, n)` and from the example's negatives (jaxkd.data.stream.NEGATIVES_STREAM)."""
  return key + (STRONG_VIEW_STREAM,)


def rng(key: Key) -> np.random.Generator:
  """The Generator of `key` (Philox, seeded by SeedSequence(key))."""
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))


def epoch_seed(seed, epoch) -> int:
  """The 32-bit seed of epoch `epoch`'s permutation (its own stream of SeedSequence)."""
  return int(np.random.SeedSequence((_word(seed), _word(epoch))).generate_state(1)[0])


def permuted(position: int, num: int, seed, epoch) -> int:
  """perm_(seed, epoch)(position): a permutation of range(num), one position at a time."""
  if num == 1:
    return 0
  return int(grain.experimental.index_shuffle(int(position), num - 1, epoch_seed(seed, epoch),
                                              _SHUFFLE_ROUNDS))
